"""LongMem forward over one segment with a full memory, against the frozen backbone's forward.

    python benchmarks/bench_forward.py [--memory-tokens 65536] [--segment 512]

Prints median seconds per forward and the ratio LongMem / backbone (target <= 1.8).
"""

import argparse
import json

import torch

from common import as_trained, fill_bank_with_real_keys, interleaved, machine, real_text_ids
from longmem.loading import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-tokens", type=int, default=65_536)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--memory-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: a fresh model shaped like one)")
    ap.add_argument("--backbone", help="the fresh model's backbone (default: smollm2-135m-instruct), e.g. gemma3-270m")
    args = ap.parse_args()

    torch.manual_seed(0)
    # The defaults (the recipe: token-level search, the copy head), on a full memory of real keys.
    settings = {"memory.window": args.segment, "memory.capacity_tokens": args.memory_tokens,
                "memory.dtype": args.memory_dtype}
    if args.checkpoint:
        model = load_model(checkpoint=args.checkpoint, overrides=settings).eval()
    else:
        model = as_trained(load_model(backbone=args.backbone, overrides=settings)).eval()
    bank = model.new_bank(1)
    fill_bank_with_real_keys(model, bank, args.memory_tokens)
    seg = real_text_ids(model.tokenizer, args.segment)
    plain = model.adapter.with_start(seg)

    with torch.no_grad():
        t = interleaved(
            {
                "backbone": lambda: model.backbone(plain).logits,  # the context as the plain model reads it
                "no_memory": lambda: model(seg).logits,
                "memory": lambda: model(seg, bank=bank).logits,
            },
            rounds=args.repeats,
        )
    backbone, no_memory, with_memory = t["backbone"], t["no_memory"], t["memory"]
    result = {
        "machine": machine(),
        "segment_tokens": args.segment,
        "memory_tokens": bank.num_tokens(0),
        "memory_dtype": args.memory_dtype,
        "backbone_s": round(backbone, 4),
        "longmem_no_memory_s": round(no_memory, 4),
        "longmem_memory_s": round(with_memory, 4),
        "ratio_memory_vs_backbone": round(with_memory / backbone, 3),
        "ratio_no_memory_vs_backbone": round(no_memory / backbone, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
