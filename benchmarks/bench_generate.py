"""Greedy KV-cached decoding: LongMem (with a full memory, and without) vs the frozen backbone's
own HF `generate`, same prompt and number of new tokens.

    python benchmarks/bench_generate.py [--prompt 128] [--new 128] [--memory-tokens 65536]

Prints tokens/s for each and the ratio LongMem / backbone (target >= 0.55).
"""

import argparse
import json

import torch

from common import as_trained, fill_bank_with_real_keys, interleaved, machine, real_text_ids
from longmem.loading import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--memory-tokens", type=int, default=65_536)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: a fresh model shaped like one)")
    ap.add_argument("--backbone", help="the fresh model's backbone (default: smollm2-135m-instruct), e.g. gemma3-270m")
    args = ap.parse_args()

    settings = {"memory.capacity_tokens": args.memory_tokens}
    if args.checkpoint:
        model = load_model(checkpoint=args.checkpoint, overrides=settings).eval()
    else:  # the defaults (the recipe), shaped like a trained model
        model = as_trained(load_model(backbone=args.backbone, overrides=settings)).eval()
    bank = model.new_bank(1)
    fill_bank_with_real_keys(model, bank, args.memory_tokens)
    prompt = real_text_ids(model.tokenizer, args.prompt, "emma.txt")
    n = args.new

    def backbone():
        plain = model.adapter.with_start(prompt)  # the context as the plain model reads it
        out = model.backbone.generate(plain, attention_mask=torch.ones_like(plain), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
        assert out.shape[1] == plain.shape[1] + n

    def longmem(with_bank):
        def run():
            snapshot = bank.num_tokens(0)
            out = model.generate(prompt, bank=bank if with_bank else None, max_new_tokens=n)
            assert len(out.token_ids[0]) == n or out.finish_reasons[0] == "eos"
            assert bank.num_tokens(0) == snapshot  # window not exceeded: memory unchanged
            return out

        return run

    # EOS would end LongMem early and make the comparison unfair: decode without it.
    model.tokenizer.eos_token_id, eos = None, model.tokenizer.eos_token_id
    with torch.no_grad():
        t = interleaved({"backbone": backbone, "no_memory": longmem(False), "memory": longmem(True)}, rounds=args.rounds)
    model.tokenizer.eos_token_id = eos
    tps = {k: n / v for k, v in t.items()}
    print(json.dumps({
        "machine": machine(),
        "prompt_tokens": args.prompt,
        "new_tokens": n,
        "memory_tokens": bank.num_tokens(0),
        "backbone_tokens_per_s": round(tps["backbone"], 1),
        "longmem_no_memory_tokens_per_s": round(tps["no_memory"], 1),
        "longmem_memory_tokens_per_s": round(tps["memory"], 1),
        "ratio_memory_vs_backbone": round(tps["memory"] / tps["backbone"], 3),
        "ratio_no_memory_vs_backbone": round(tps["no_memory"] / tps["backbone"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
