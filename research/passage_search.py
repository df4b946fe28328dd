"""Passage search alone: which blocks of memory a question's tokens bring into the window.

For recall items (single needle and multi-key, whose three distractors have the fact's form and
sit a few sentences from it), the search of longmem/memory/passages.py runs over what lies before
a 2,048-token window, and each rule of which blocks to read is scored by:

- fact: the asked fact's value lies inside the passages read;
- distractor: a distractor's value does too (the model may copy it);
- control: the same prompt with every planted fact taken out still brings some block in.

Two item sets: the training side (training templates, key words and values, a training novel),
on which the passage settings are chosen, and the held-out evaluation side, reported only.
No model runs; only the tokenizer.

    python research/passage_search.py --backbone smollm2-135m-instruct
    python research/passage_search.py --backbone gemma3-270m --lengths 16384 32768 65536 --trials 20

A research driver; nothing here is part of the product.
"""

import argparse
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import AUSTEN  # noqa: E402

from longmem import facts  # noqa: E402
from longmem.config import PassageConfig  # noqa: E402
from longmem.evaluation import recall  # noqa: E402
from longmem.evaluation.tasks import EvalSettings  # noqa: E402
from longmem.generation import PASSAGE_SHARE  # noqa: E402
from longmem.loading import load_model  # noqa: E402
from longmem.memory.passages import find_passages  # noqa: E402

WINDOW = 2048
VALUE_SPAN = 28  # tokens from a fact sentence's start that hold its value, for every template


@contextmanager
def training_side():
    """Recall items built from the training templates, key words and values."""
    saved = recall.EVAL_TEMPLATES, recall.ADJECTIVES, recall.NOUNS, recall.WORDS
    recall.EVAL_TEMPLATES, recall.ADJECTIVES = facts.TRAIN_TEMPLATES, facts.TRAIN_ADJECTIVES
    recall.NOUNS, recall.WORDS = facts.TRAIN_NOUNS, facts.TRAIN_WORDS
    try:
        yield
    finally:
        recall.EVAL_TEMPLATES, recall.ADJECTIVES, recall.NOUNS, recall.WORDS = saved


def score(items, config: PassageConfig) -> dict:
    room = WINDOW // PASSAGE_SHARE  # the product's share of the window
    out = {"fact": 0, "distractor": 0, "control": 0, "tokens": 0, "items": len(items)}
    for it in items:
        x = np.asarray(it["prompt"])
        past, question = x[: len(x) - (WINDOW - room)], x[-config.query_tokens:]
        ranges = find_passages(past, question, config, room)
        inside = lambda p: any(a <= p + VALUE_SPAN // 2 < b for a, b in ranges)  # noqa: E731
        out["fact"] += inside(it["fact_positions"][0])
        out["distractor"] += any(inside(p) for p in it["fact_positions"][1:])
        out["tokens"] += sum(b - a for a, b in ranges)
        blank = past.copy()
        for p in it["fact_positions"]:
            blank[p : p + VALUE_SPAN] = -1  # the facts taken out
        out["control"] += bool(find_passages(blank, question, config, room))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--styles", nargs="*", default=["restate", "paraphrase", "chat"])
    ap.add_argument("--near-best", type=float, nargs="*", default=[0.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--blocks", type=int, nargs="*", default=[1, 2, 4])
    args = ap.parse_args()

    tok = load_model(backbone=args.backbone).tokenizer
    tokenize = lambda s: np.asarray(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    settings = EvalSettings(task="recall", window=WINDOW, recall_tasks=("single", "multikey"),
                            recall_lengths=tuple(args.lengths), recall_trials=args.trials,
                            recall_styles=tuple(args.styles))
    chat = recall.chat_turn(tok)
    with training_side():
        train = recall.recall_items([("emma.txt", (AUSTEN / "emma.txt").read_text())], tokenize,
                                    replace(settings, seed=settings.seed + 1), chat=chat)[0]
    held_out = recall.recall_items([("persuasion.txt", (AUSTEN / "persuasion.txt").read_text())], tokenize,
                                   settings, chat=chat)[0]
    print(f"{len(train)} training-side and {len(held_out)} held-out items; {args.backbone}'s tokens\n")
    print("blocks  near_best |  training side: fact  distractor  control  tokens "
          "|  held out: fact  distractor  control  tokens")
    for blocks in args.blocks:
        for near in args.near_best:
            config = PassageConfig(blocks=blocks, near_best=near)
            cells = []
            for items in (train, held_out):
                s = score(items, config)
                n = s["items"]
                cells.append(f"{s['fact']:>4}/{n:<4} {s['distractor']:>5}/{n:<4} {s['control']:>4}/{n:<4} "
                             f"{s['tokens'] / n:>6.0f}")
            print(f"{blocks:>6}  {near:>9.2f} |  {cells[0]}          |  {cells[1]}")


if __name__ == "__main__":
    main()
