"""Context recall: can memory's keys find a fact asked in other words, and can the backbone then
answer it with the found passage in its window?

The product's read answers with the token after each query token's match (an induction head). A
question in other words only finds the fact through its content words; no read at the memory layer
turns that into the value (research-log § Runs 20–26). This probe tries the other half of the
division of labour: memory finds, the backbone reads. For each held-out recall item:

1. the prompt's past (everything before LongMem's local window) is written to memory as usual;
2. the question (the prompt's last `--query-tokens`) searches memory with its backbone keys; each
   query token's top hits vote for the blocks of memory they fall in, each vote weighted by how
   sharply that token's hits stand out (a word that matches everywhere votes for nothing), or
   (the default, `--search tokens`) its token ids vote as passage recall's do
   (longmem/memory/passages.py);
3. the best `--blocks` blocks, widened by `--margin` tokens each side and merged, are put in front
   of the local window, in the order they were written, and the model reads that.

Readings: the backbone over its local window (the baseline users have); the backbone over the
found passages + its local window; LongMem with memory as the product generates (its passage
recall included); and how often the asked fact lies inside the found passages.

    python research/context_recall.py --checkpoint checkpoints/sidenet --trials 10
    python research/context_recall.py --backbone gemma3-270m --context 2048 --trials 10 --styles restate paraphrase

The figures in docs/research-log.md § Context recall were measured at 57a19ba, whose token search
weighed a token by its count in memory (the product's, used here since, by the blocks holding it)
and read every block with a vote among the best four (`--near-best 0`; the product's default since
reads only those within 0.8 of the best block's vote).

A research driver; nothing here is part of the product.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import AUSTEN  # noqa: E402

from longmem.evaluation.recall import chat_turn, recall_items, recall_score  # noqa: E402
from longmem.evaluation.tasks import EvalSettings  # noqa: E402
from longmem.config import PassageConfig  # noqa: E402
from longmem.generation import PASSAGE_SHARE  # noqa: E402
from longmem.loading import load_model  # noqa: E402
from longmem.memory.passages import find_passages, merge_spans  # noqa: E402


def found_ranges(model, bank, local: torch.Tensor, query_tokens: int, memory_len: int, k: int, block: int,
                 blocks: int, margin: int, temperature: float) -> list[tuple[int, int]]:
    """Memory position ranges [a, b), in stream order, that the question's keys point at. The
    question is the local window's last `query_tokens`, keyed in the window's own pass."""
    states = model.adapter.run(local, [], model.memory_layer, stop_after_memory=True)
    keys = states.memory_keys[:, -query_tokens:]  # (1, Q, Hkv, D)
    r = bank.search(keys, k)
    scores, positions = r.scores[0], r.positions[0]  # (H, Q, k)
    ok = torch.isfinite(scores) & (positions >= 0)
    # a token's vote: softmax over its own top-k, so a word matching everywhere spreads its vote thin
    weights = torch.softmax(torch.where(ok, scores, torch.full_like(scores, -1e9)) / temperature, dim=-1)
    weights = weights * ok
    votes = torch.zeros(memory_len // block + 1)
    votes.index_add_(0, (positions.clamp(min=0) // block).flatten(), weights.flatten().float())
    best = torch.topk(votes, min(blocks, votes.numel())).indices.tolist()
    return merge_spans(sorted((max(0, b * block - margin), min(memory_len, (b + 1) * block + margin)) for b in best))


def backbone_answer(model, ids: torch.Tensor, max_new_tokens: int) -> str:
    tok = model.tokenizer
    ids = model.adapter.with_start(ids)
    out = model.backbone.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--backbone")
    ap.add_argument("--window", type=int, help="LongMem's local window (default: the model's)")
    ap.add_argument("--context", type=int, help="the backbone readings' window (default: LongMem's)")
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384])
    ap.add_argument("--tasks", nargs="*", default=["single", "multikey"])
    ap.add_argument("--styles", nargs="*", default=["restate", "paraphrase", "chat"])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--query-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=32, help="hits per query token and head")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--margin", type=int, default=48)
    ap.add_argument("--near-best", type=float, default=PassageConfig.near_best,
                    help="token search: a block is read only at this share of the best block's vote or more")
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--search", choices=("tokens", "keys"), default="tokens",
                    help="find passages by the question's rare tokens, or by its memory-layer keys")
    ap.add_argument("--no-longmem", action="store_true", help="skip LongMem's own read (slow)")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="SETTING=VALUE",
                    help="a model setting for LongMem's reading, e.g. passages.blocks=4")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    overrides = {"memory.window": args.window} if args.window else {}
    for item in args.settings:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    model = load_model(checkpoint=args.checkpoint, backbone=args.backbone, overrides=overrides).eval()
    tok = model.tokenizer
    settings = EvalSettings(task="recall", window=model.config.memory.window, recall_tasks=tuple(args.tasks),
                            recall_lengths=tuple(args.lengths), recall_trials=args.trials,
                            recall_styles=tuple(args.styles))
    text = (AUSTEN / "persuasion.txt").read_text()
    items, _ = recall_items([("persuasion.txt", text)], lambda s: np.asarray(tok(s, add_special_tokens=False).input_ids),
                            settings, chat=chat_turn(tok))
    rows, t0 = [], time.time()
    with torch.no_grad():
        for it in items:
            x = torch.as_tensor(it["prompt"])[None]
            window = args.context or model.config.memory.window
            start = model.local_start(x.shape[1]) if not args.context else x.shape[1] - args.context
            local = x[:, start:]
            # passages take at most a quarter of the window, as the product's do, and are searched
            # in everything their room pushes out of it
            budget = min(args.blocks * (args.block + 2 * args.margin), window // PASSAGE_SHARE)
            past = x[:, :x.shape[1] - (window - budget)]
            if args.search == "keys":
                bank = model.new_bank(1)
                model.write_memory(past, bank)
                ranges = found_ranges(model, bank, local, args.query_tokens, past.shape[1], args.k, args.block, args.blocks,
                                      args.margin, args.temperature)
            else:  # the product's passage search, every block above the background taking part
                config = PassageConfig(blocks=args.blocks, block=args.block, margin=args.margin, stand_out=1.0,
                                       near_best=args.near_best)
                ranges = find_passages(past[0].numpy(), x[0, -args.query_tokens:].numpy(), config, budget)
            found = torch.cat([past[:, a:b] for a, b in ranges], dim=1)
            facts = [(p, p + 8) for p in it["fact_positions"]]
            hit = any(a <= p and q <= b for p, q in facts[:1] for a, b in ranges)  # the asked fact (first)
            keep = window - found.shape[1]  # the same window: found passages + local tail
            hit = hit or facts[0][0] >= x.shape[1] - keep  # or it is in the window anyway
            n = it["max_new_tokens"]
            texts = {"backbone": backbone_answer(model, local, n),
                     "backbone_found": backbone_answer(model, torch.cat([found, local[:, -keep:]], dim=1), n)}
            if not args.no_longmem:  # the product's generation, passage recall included
                texts["longmem_memory"] = model.generate(x, bank=model.new_bank(1), max_new_tokens=n).texts[0]
            row = {"id": it["id"], "style": it["style"], "answers": it["answers"], "found": hit,
                   "found_tokens": int(found.shape[1]), "texts": texts,
                   "scores": {r: recall_score(t, it["answers"]) for r, t in texts.items()}}
            rows.append(row)
            print(json.dumps(row), f"{time.time() - t0:.0f}s", flush=True)
    print("\nreading            " + "  ".join(f"{s:>10}" for s in args.styles) + "       all")
    for reading in ["found"] + list(rows[0]["scores"]):
        cells = []
        for s in list(args.styles) + [None]:
            sel = [r for r in rows if s is None or r["style"] == s]
            vals = [float(r["found"]) if reading == "found" else r["scores"][reading] for r in sel]
            cells.append(f"{sum(vals):>4.0f}/{len(vals):<5}")
        print(f"{reading:<18} " + "  ".join(f"{c:>10}" for c in cells))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
