"""Held-out novel: does memory help on fresh text? Perplexity of the first N tokens of Persuasion
(never trained on) four ways: backbone with a 512 window, backbone with a 2,048 window, LongMem
with memory off, LongMem reading the memory of the book's own past (512 window).

    python research/heldout_table.py --checkpoint DIR [--tokens 32768]

Also reports the share of the backbone's 512 -> 2,048 gap that LongMem closes, and the share that
memory alone closes (memory on vs off). Prints one JSON object.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import AUSTEN, machine
from longmem.evaluation import perplexity_report
from longmem.loading import load_model


@torch.no_grad()
def backbone_ppl(model, ids, window):
    total, n = 0.0, 0
    for seg in model.segments(ids, window):
        if seg.shape[1] < 2:
            continue
        logits = model.backbone_logits(seg)
        total += F.cross_entropy(logits[0, :-1].float(), seg[0, 1:], reduction="sum").item()
        n += seg.shape[1] - 1
    return math.exp(total / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--book", default="persuasion.txt")
    args = ap.parse_args()
    model = load_model(checkpoint=args.checkpoint)
    ids = model.encode((AUSTEN / args.book).read_text())[:, : args.tokens]
    report = perplexity_report(model, ids, progress=lambda d, n: print(f"\r{d}/{n}", end="", file=sys.stderr))
    print(file=sys.stderr)
    p = report["perplexity"]
    wide = backbone_ppl(model, ids, 2048)
    gap = p["backbone"] - wide
    out = {
        "machine": machine(), "checkpoint": args.checkpoint, "book": args.book, "tokens": int(ids.shape[1]),
        "backbone_512": p["backbone"], "backbone_2048": wide,
        "longmem_no_memory_512": p["longmem_no_memory"], "longmem_memory_512": p["longmem_memory"],
        "memory_gain": 1 - p["longmem_memory"] / p["longmem_no_memory"],
        "gap_closed_by_longmem": (p["backbone"] - p["longmem_memory"]) / gap if gap > 0 else None,
        "gap_closed_by_memory": (p["longmem_no_memory"] - p["longmem_memory"]) / gap if gap > 0 else None,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
