"""Why a passkey was missed: feed the true answer (teacher forcing) and show, per answer digit,
how many heads retrieved the planted digit's predecessor-match, how much of the best head's read
lands on it, the copy head's gate, and the probability the model alone and the output give it.

    python research/passkey_diagnose.py --checkpoint ~/.cache/longmem/runs/balanced --distance 32768

The same trials as `memory_probes.py --passkey-distances D --passkey-trials N --passkey-seed S`.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import AUSTEN  # noqa: E402
from longmem.evaluation.probes import passkey_prompts
from longmem.model import LongMem
from longmem.sidenet import retrieval_cosine
from longmem.training import PASSKEY_FACT


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--distance", type=int, default=16384)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keys", nargs="*", help="only these keys (default: every trial)")
    ap.add_argument("--retrieve-tokens", type=int, help="tokens read per query and head (default: the checkpoint's)")
    ap.add_argument("--show-read", type=int, default=0, metavar="N",
                    help="also show, per digit, every planted token each head retrieved and the best head's top N reads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    overrides = {"memory.retrieve_tokens": args.retrieve_tokens} if args.retrieve_tokens else None
    model = LongMem.from_pretrained(args.checkpoint, overrides=overrides).eval()
    if model.config.memory.chunk_size != 1:
        sys.exit("the diagnosis follows single memory tokens: it needs a checkpoint with chunk_size 1")
    tok = model.tokenizer
    encode = lambda s: tok(s, add_special_tokens=False, return_tensors="pt").input_ids[0]  # noqa: E731
    held = encode((AUSTEN / "persuasion.txt").read_text())[None]
    copy_head, copy_inputs = model.sidenet.memory_copy, []
    if copy_head is not None:
        copy_head.register_forward_hook(lambda m, a, out: copy_inputs.append(a))
    rows = []
    for key, prompt in passkey_prompts(model, held, args.distance, args.trials, args.seed):
        if args.keys and key not in args.keys:
            continue
        answer = encode(" " + key).to(model.device)
        full = torch.cat([prompt, answer[None]], 1)
        start = model.local_start(prompt.shape[1])
        bank = model.new_bank(1)
        copy_inputs.clear()
        with torch.no_grad():
            model.write_memory(full[:, :start], bank)
            out = model(full[:, start:], bank=bank, previous_ids=full[:, start - 1])
            if copy_inputs:
                log_model, _, _, _ = copy_head.parts(*copy_inputs[-1])
            else:
                log_model = torch.log_softmax(out.logits.float(), -1)
        read, ids = out.readout, full[0]
        read.retrieval = per_query_head(read.retrieval, read.weights.shape[1])
        fact = (64, 64 + len(encode(PASSKEY_FACT.format(key=key))))  # the prompt opens with 64 tokens of prose
        T = full.shape[1] - start
        digits = []
        for j in range(1, len(answer)):  # answer[0] is the space the question is followed by
            t = T - len(answer) - 1 + j  # the position that predicts answer[j]
            target = int(answer[j])
            planted = torch.tensor([p for p in range(*fact) if int(ids[p + 1]) == target], device=model.device)
            hits = (read.retrieval.positions[0, :, t, :, None] == planted).any(-1)  # (Hq, k)
            shares = [float(read.weights[0, h, t][hits[h]].sum()) for h in range(hits.shape[0])]
            share = max(shares)
            digits.append({
                "digit": tok.decode([target]), "predicted": tok.decode([int(out.logits[0, t].argmax())]),
                "heads_retrieving": int(hits.any(-1).sum()), "best_head_share": round(share, 3),
                "copy_gate": None if read.copy_gate is None else round(float(read.copy_gate[0, t]), 3),
                "p_model": round(float(log_model[0, t, target].exp()), 3),
                "p_output": round(float(torch.softmax(out.logits[0, t].float(), -1)[target]), 3),
            })
            if args.show_read:
                digits[-1]["reads"] = show_read(read, t, shares.index(share), planted, tok, args.show_read)
        rows.append({"key": key, "digits": digits})
        if not args.json and args.show_read:
            print(key, *(json.dumps(d) for d in digits), sep="\n", flush=True)
        elif not args.json:
            print(key, " | ".join(f"{d['digit']}->{d['predicted']} heads {d['heads_retrieving']}/{hits.shape[0]} "
                                  f"read {d['best_head_share']:.2f} g {d['copy_gate']} p_model {d['p_model']:.2f} "
                                  f"p {d['p_output']:.2f}" for d in digits), flush=True)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "distance": args.distance, "trials": rows}, indent=2))


def per_query_head(r, heads: int):
    """A retrieval searched once per KV head, broadcast to the query heads that share each search."""
    group = heads // r.num_heads
    fields = ("keys", "queries", "positions", "token_ids", "prev_token_ids", "next_token_ids", "token_mask", "next_mask")
    return dataclasses.replace(r, **{f: getattr(r, f).repeat_interleave(group, 1) for f in fields
                                     if getattr(r, f) is not None})


def show_read(read, t: int, best: int, planted: torch.Tensor, tok, top: int) -> dict:
    """At position t: per head, the planted tokens it retrieved (stream position, cosine to the
    query, read weight); and the best head's top reads as "prev|token|next"."""
    r = read.retrieval
    cos = retrieval_cosine(r)[0, :, t]  # (Hq, K)
    word = lambda i: tok.decode([int(i)]) if int(i) >= 0 else "?"  # noqa: E731
    planted_reads = {}
    for h in range(cos.shape[0]):
        found = (r.positions[0, h, t, :, None] == planted).any(-1).nonzero().flatten().tolist()
        planted_reads[h] = [[int(r.positions[0, h, t, i]), round(float(cos[h, i]), 3), round(float(read.weights[0, h, t, i]), 3)]
                            for i in found]
    weights = read.weights[0, best, t]
    tops = [{"at": int(r.positions[0, best, t, i]), "cosine": round(float(cos[best, i]), 3),
             "weight": round(float(weights[i]), 3),
             "text": f"{word(r.prev_token_ids[0, best, t, i])}|{word(r.token_ids[0, best, t, i, 0])}|"
                     f"{word(r.next_token_ids[0, best, t, i])}"}
            for i in weights.topk(min(top, weights.numel())).indices.tolist()]
    return {"planted_by_head": planted_reads, "best_head": best, "best_head_top": tops}


if __name__ == "__main__":
    sys.exit(main())
