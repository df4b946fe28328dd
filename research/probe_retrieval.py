"""Copy-probe retrieval hit rate at initialisation: can top-k chunk search find a repeated span?

    python research/probe_retrieval.py [--gap-segments 2] [--segments 8]

For held-out text, segment A is written to memory, then `gap` other segments, then A is repeated.
For each token of the repeat (position p, original occurrence p0) a hit means the chunk holding
p0 (or p0 + 1, what an induction-style read would want) is among the retrieved chunks of a head.
Reported for the SideNet's query (paper init) and for the frozen backbone's own query.
"""

import argparse
import json
import sys
from pathlib import Path


import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import machine, real_text_ids
from longmem.loading import load_model


def hit_rates(positions: torch.Tensor, originals: torch.Tensor, chunk: int) -> dict:
    # positions (Hq, T, k) chunk start positions; originals (T,) original token position p0
    starts = positions[..., None]
    inside = lambda p: ((starts <= p[None, :, None, None]) & (p[None, :, None, None] < starts + chunk)).any(-1).any(-1)  # noqa: E731
    same, nxt = inside(originals), inside(originals + 1)  # (Hq, T)
    return {
        "own_chunk_mean_over_heads": round(same.float().mean().item(), 4),
        "own_chunk_any_head": round(same.any(0).float().mean().item(), 4),
        "next_token_chunk_any_head": round(nxt.any(0).float().mean().item(), 4),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gap-segments", type=int, default=2)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--metric", default="ip", choices=["ip", "cosine"])
    ap.add_argument("--queries", nargs="+", default=["side", "backbone", "backbone_key"])
    args = ap.parse_args()
    W = args.window
    ids = None
    report = {"machine": machine(), "window": W, "gap_segments": args.gap_segments, "chunk_size": args.chunk_size,
              "sink_tokens": args.sink_tokens}
    report["metric"] = args.metric
    for query in args.queries:
        model = load_model(preset="paper", overrides={
            "memory.window": W, "memory.query": query, "memory.chunk_size": args.chunk_size,
            "memory.sink_tokens": args.sink_tokens, "memory.metric": args.metric, "memory.dtype": "float32"}).eval()
        if ids is None:
            ids = real_text_ids(model.tokenizer, W * (args.gap_segments + 1), "persuasion.txt")
        bank = model.new_bank(1)
        with torch.no_grad():
            model.write_memory(ids, bank)
            out = model(ids[:, :W], bank=bank)  # the first segment again
        retrieval = out.readout.retrieval
        pos = retrieval.positions[0].repeat_interleave(model.adapter.num_heads // retrieval.num_heads, 0)  # (Hq, T, k)
        report[f"{query}_query"] = hit_rates(pos, torch.arange(W), model.config.memory.chunk_size)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
