"""Continuous batching in one process (no Serve, no HTTP): generated tokens/s with B rows decoding
together ÷ one row, for decoding alone and for whole requests (prompt read + decoding), so the
serving benchmark's ratios can be set against what the model itself allows on this machine.

    python benchmarks/bench_batching.py [--checkpoint DIR] [--rows 1,8,32] [--prompt 64] [--new 32]

Every row has its own fresh bank, as a one-off request to the server has. Prints one summary line
per figure, then one JSON object.
"""

import argparse
import json
import sys
import time

import torch

from common import AUSTEN, machine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a serving replica's default: 1)")
    ap.add_argument("--dtype", default="auto", help="float32, bfloat16, or auto: what a server picks on this CPU")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from longmem.batching import BatchDecoder, Sampling
    from longmem.loading import inference_dtype, load_model

    dtype = inference_dtype("cpu") if args.dtype == "auto" else args.dtype
    print(f"dtype {dtype}")
    model = load_model(checkpoint=args.checkpoint, dtype=dtype).eval()
    ids = model.encode((AUSTEN / "emma.txt").read_text()[:200_000])

    def run(rows: int) -> dict:
        decoder = BatchDecoder(model, max_rows=max(rows, 1))
        start = time.perf_counter()
        for i in range(rows):
            decoder.submit(ids[:, 500 * i : 500 * i + args.prompt], model.new_bank(1),
                           Sampling(max_new_tokens=args.new))
        decoder.step()  # every prompt read, the first token of each
        decode_start, steps = time.perf_counter(), 0
        while decoder.busy:
            decoder.step()
            steps += 1
        end = time.perf_counter()
        tokens = rows * args.new
        return {"rows": rows, "ms_per_step": 1000 * (end - decode_start) / max(1, steps),
                "decode_tokens_per_s": rows * (args.new - 1) / (end - decode_start),
                "request_tokens_per_s": tokens / (end - start)}

    # RAM a session memory holds: storage grows as it fills (a replica holds up to 64 loaded)
    sizes = {}
    for tokens in (0, 2048, 16384):
        bank = model.new_bank(1)
        if tokens:
            model.write_memory(ids[:, :tokens], bank)
        sizes[tokens] = bank.nbytes()
    full = model.config.memory.capacity_tokens * (2 * bank.keys[0, :, 0].numel() * bank.keys.element_size()
                                                   + bank.chunk_keys[0, :, 0].numel() * 4 + 8) // model.config.memory.chunk_size
    print("RAM of a session memory: " + ", ".join(f"{n:,} tokens {b / 2**20:.1f} MiB" for n, b in sizes.items())
          + f", full ({model.config.memory.capacity_tokens:,} tokens) {full / 2**20:.0f} MiB")

    run(1)  # warm-up
    results = {n: run(n) for n in [int(x) for x in args.rows.split(",")]}
    one = results.get(1)
    for n, r in results.items():
        if one and n != 1:
            r["decode_over_1_row"] = r["decode_tokens_per_s"] / one["decode_tokens_per_s"]
            r["request_over_1_row"] = r["request_tokens_per_s"] / one["request_tokens_per_s"]
        ratio = (f"; {r['decode_over_1_row']:.2f}x decoding, {r['request_over_1_row']:.2f}x whole requests"
                 if "decode_over_1_row" in r else "")
        print(f"{n} rows: {r['ms_per_step']:.1f} ms a step, {r['decode_tokens_per_s']:.1f} tokens/s decoding, "
              f"{r['request_tokens_per_s']:.1f} with the prompt read{ratio}")
    print(json.dumps({"machine": machine(), "threads": args.threads, "dtype": dtype, "prompt_tokens": args.prompt,
                      "new_tokens": args.new, "results": results, "session_bytes": sizes, "full_session_bytes": full},
                     indent=2))


if __name__ == "__main__":
    sys.exit(main())
