"""Memory encoding throughput: the Ray Data pipeline vs a plain in-process loop on the same windows.

    python benchmarks/bench_build_memory.py [--tokens 65536] [--batch-size 8]

Baseline: MemoryEncoder.encode (the frozen backbone up to the memory layer) called in a loop over
the same windows and batch size, in this process, with as many torch threads as one actor gets.
Pipeline: `build_memory` on the same text, timed over its encoding stage (actor start included),
with 1 actor, then 2 actors of 1 CPU each. Also reports bytes on disk per token at chunk sizes 1
and 4 (the index is exact at this size) and the encoder actor's peak RSS. Prints one JSON object.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import AUSTEN, machine
from longmem.loading import load_model
from longmem.memory.encoder import MemoryEncoder


def plain_loop(model, ids: np.ndarray, batch: int, threads: int) -> float:
    torch.set_num_threads(threads)
    enc = MemoryEncoder(model)
    W = model.config.memory.window
    windows = [ids[i : i + W] for i in range(0, len(ids), W)]
    sink = model.config.memory.sink_tokens
    before = lambda i: ids[max(0, i * W - sink) : i * W]  # noqa: E731 - the tokens a window's encoder reads first
    enc.encode(windows[:batch], [0] * batch, [before(0)] * batch)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        enc.encode(chunk, [j * W for j in range(i, i + len(chunk))], [before(j) for j in range(i, i + len(chunk))])
    return len(ids) / (time.perf_counter() - t0)


def pipeline(corpus: Path, batch: int, actors: int, threads: int, chunk_size: int | None = None) -> dict:
    from pipelines.build_memory import BuildJob, build_memory

    out = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        model = {"overrides": {"memory.chunk_size": chunk_size}} if chunk_size else {}
        job = BuildJob(corpus=[str(corpus)], out=str(out / "m"), batch_size=batch, min_actors=actors,
                       max_actors=actors, num_cpus_per_actor=threads, model=model)
        summary = build_memory(job, progress=lambda m: print(m, file=sys.stderr))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    model = load_model()
    tok = model.tokenizer
    text = (AUSTEN / "emma.txt").read_text()
    ids = np.asarray(tok(text, add_special_tokens=False).input_ids[: args.tokens], dtype=np.int64)
    corpus = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    (corpus / "emma.txt").write_text(tok.decode(ids.tolist()))
    report = {"machine": machine(), "tokens": int(len(ids)), "batch_size": args.batch_size}
    report["plain_loop_tokens_per_s_1_thread"] = plain_loop(model, ids, args.batch_size, 1)
    one = pipeline(corpus, args.batch_size, 1, 1)
    report["pipeline_1_actor_tokens_per_s"] = one["encode_tokens_per_s"]
    report["pipeline_1_actor_ratio"] = one["encode_tokens_per_s"] / report["plain_loop_tokens_per_s_1_thread"]
    two = pipeline(corpus, args.batch_size, 2, 1)
    report["pipeline_2_actors_tokens_per_s"] = two["encode_tokens_per_s"]
    report["two_over_one_actor"] = two["encode_tokens_per_s"] / one["encode_tokens_per_s"]
    report["plain_loop_tokens_per_s_2_threads"] = plain_loop(model, ids, args.batch_size, 2)
    report[f"bytes_per_token_chunk_size_{model.config.memory.chunk_size}"] = one["bytes_per_token"]
    for c in (1, 4):
        if c != model.config.memory.chunk_size:
            report[f"bytes_per_token_chunk_size_{c}"] = pipeline(corpus, args.batch_size, 2, 1, chunk_size=c)["bytes_per_token"]
    report["encoder_peak_rss_mb"] = one["encoder_peak_rss_mb"]
    shutil.rmtree(corpus, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
