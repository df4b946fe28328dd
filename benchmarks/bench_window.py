"""What a local window costs: LongMem at several windows with a full memory, against the backbone
reading its own longer windows, in one run.

    python benchmarks/bench_window.py --checkpoint checkpoints/sidenet [--windows 256 512 1024 2048]

Reading: ms per token of one forward over a whole window (a prompt, or a document scored window by
window), LongMem with memory at each window and the backbone at each of --backbone-windows.
Decoding: ms per generated token with the local context nearly full (window - new tokens in the KV
caches), with memory, and the backbone with as many tokens in its cache. LongMem's window slides
by half when full (the older half moves to memory, the rest is read again), which adds about one
token's read to every generated token: `decode_with_slides_ms_per_token`. Encoding: ms per token of
writing text into memory window by window (the frozen backbone up to the memory layer, what a
memory build runs per token; a memory is encoded at the window its model reads at). Ratios are
against LongMem at 512 (the default training window) measured in the same run. The quality side of the choice is
`longmem evaluate perplexity --window W` (docs/results.md § Choosing the local window).
"""

import argparse
import json
import statistics
import time

import torch

from common import as_trained, fill_bank_with_real_keys, interleaved, machine, real_text_ids
from longmem.generation import append, prefill
from longmem.loading import load_model

BASELINE = 512


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--backbone-windows", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--memory-tokens", type=int, default=65_536)
    ap.add_argument("--new", type=int, default=16, help="decode steps timed per reading and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--encode-tokens", type=int, default=8192, help="tokens written into memory per encoding reading")
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: a fresh model shaped like one)")
    args = ap.parse_args()
    if BASELINE not in args.windows:
        ap.error(f"--windows must include the default window {BASELINE}: every ratio is against it")

    torch.manual_seed(0)
    # One model at the longest window reads every shorter one: the window is a runtime setting.
    settings = {"memory.window": max(args.windows), "memory.capacity_tokens": args.memory_tokens}
    if args.checkpoint:
        model = load_model(checkpoint=args.checkpoint, overrides=settings).eval()
    else:
        model = as_trained(load_model(overrides=settings)).eval()
    bank = model.new_bank(1)
    fill_bank_with_real_keys(model, bank, args.memory_tokens)
    text = real_text_ids(model.tokenizer, max(args.windows + args.backbone_windows + [args.encode_tokens]), "emma.txt")
    n = args.new

    reading = {f"longmem_{w}": (lambda w=w: model(text[:, :w], bank=bank).logits) for w in args.windows}
    reading |= {f"backbone_{w}": (lambda w=w: model.backbone(model.adapter.with_start(text[:, :w - 1])).logits)
                for w in args.backbone_windows}

    def longmem_decode(w):
        # a prompt that fills the window but for the tokens generated, so it never slides
        state, logits = prefill(model, text[:, : w - n], bank, None, use_cache=True)
        t0 = time.perf_counter()
        for _ in range(n):
            state, logits = append(model, state, logits.argmax(-1, keepdim=True), bank, None, use_cache=True)
        return time.perf_counter() - t0

    def backbone_decode(w):
        out = model.backbone(model.adapter.with_start(text[:, : w - n - 1]), use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
        t0 = time.perf_counter()
        for _ in range(n):
            out = model.backbone(logits.argmax(-1, keepdim=True), cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
        return time.perf_counter() - t0

    def encode(w):
        for start in range(0, args.encode_tokens, w):
            model.memory_entries(text[:, start : start + w], model.memory_context(text, start))

    encoding = {f"longmem_{w}": (lambda w=w: encode(w)) for w in args.windows}
    decoding = {f"longmem_{w}": (lambda w=w: longmem_decode(w)) for w in args.windows}
    decoding |= {f"backbone_{w}": (lambda w=w: backbone_decode(w)) for w in args.backbone_windows}

    with torch.no_grad():
        read_s = interleaved(reading, rounds=args.rounds)
        encode_s = interleaved(encoding, rounds=args.rounds)
        # each call prefills its prompt untimed and returns the seconds of its n decode steps
        steps = {name: [] for name in decoding}
        for _ in range(args.rounds):
            for name, fn in decoding.items():
                steps[name].append(fn())

    tokens = {name: int(name.rsplit("_", 1)[1]) for name in reading}
    read_ms = {name: 1000 * s / tokens[name] for name, s in read_s.items()}
    # the prompt's read and the first token cancel out: what is left is (n - 1) decode steps
    decode_ms = {name: 1000 * statistics.median(ts) / n for name, ts in steps.items()}
    base_read, base_decode = read_ms[f"longmem_{BASELINE}"], decode_ms[f"longmem_{BASELINE}"]
    rows = {name: {"read_ms_per_token": round(read_ms[name], 3), "read_vs_longmem_512": round(read_ms[name] / base_read, 2),
                   "decode_ms_per_token": round(decode_ms[name], 1),
                   "decode_vs_longmem_512": round(decode_ms[name] / base_decode, 2)} for name in reading}
    base_encode = encode_s[f"longmem_{BASELINE}"]
    for name, row in rows.items():
        if name.startswith("longmem_"):
            row["decode_with_slides_ms_per_token"] = round(decode_ms[name] + read_ms[name], 1)
            row["encode_ms_per_token"] = round(1000 * encode_s[name] / args.encode_tokens, 3)
            row["encode_vs_longmem_512"] = round(encode_s[name] / base_encode, 2)
    print(json.dumps({"machine": machine(), "memory_tokens": bank.num_tokens(0), "new_tokens": n,
                      "rounds": args.rounds, "readings": rows}, indent=2))
    for name, row in rows.items():
        print(f"{name:>14}: read {row['read_ms_per_token']:.2f} ms/token ({row['read_vs_longmem_512']:.2f}x), "
              f"decode {row['decode_ms_per_token']:.1f} ms/token ({row['decode_vs_longmem_512']:.2f}x)"
              + (f", encode {row['encode_ms_per_token']:.2f} ms/token ({row['encode_vs_longmem_512']:.2f}x)"
                 if "encode_ms_per_token" in row else ""))


if __name__ == "__main__":
    main()
