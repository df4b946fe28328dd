"""Where found passages sit in the window, and how much prose comes with them: does the reader
answer more often?

For recall items (single needle and multi-key), the product's passage search
(longmem/memory/passages.py, near_best 0.8, four blocks, `--margin` tokens each side) runs over
what lies before the window, and the frozen backbone reads one of:

- front512: the passages, then the prompt's last tokens, 512 in all (what the product reads);
- near512: the same tokens, the passages moved to just before the question;
- front256 / near256: the same in a 256-token window (less prose between passage and question);
- only: the passages and the question, nothing else.

`--side train` takes the training templates, key words and values and *Emma*; `--side heldout`
the evaluation's own and *Persuasion*. Choose on the first, report the second.

    python research/passage_placement.py --side train --margin 48 --variants front512 near512 only
    python research/passage_placement.py --side heldout

A research driver; nothing here is part of the product.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import AUSTEN  # noqa: E402
from context_recall import backbone_answer  # noqa: E402
from passage_search import training_side  # noqa: E402

from longmem.config import PassageConfig  # noqa: E402
from longmem.evaluation import recall  # noqa: E402
from longmem.evaluation.tasks import EvalSettings  # noqa: E402
from longmem.loading import load_model  # noqa: E402
from longmem.memory.passages import find_passages  # noqa: E402

ROOM = 128  # passage tokens: a quarter of the 512 window, as the product gives them


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="gemma3-270m")
    ap.add_argument("--side", choices=("train", "heldout"), default="heldout")
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--margin", type=int, default=PassageConfig.margin)
    ap.add_argument("--variants", nargs="*", default=["front512", "near512", "front256", "near256", "only"])
    args = ap.parse_args()

    model = load_model(backbone=args.backbone, overrides={"memory.window": 512}).eval()
    tok = model.tokenizer
    question_tokens = []  # the planted question's length, item by item
    plant = recall._plant

    def recording_plant(sentences, facts, question, *rest):
        question_tokens.append(len(question))
        return plant(sentences, facts, question, *rest)

    recall._plant = recording_plant
    settings = EvalSettings(task="recall", window=512, recall_tasks=("single", "multikey"),
                            recall_lengths=tuple(args.lengths), recall_trials=args.trials,
                            recall_styles=("restate", "paraphrase"))
    tokenize = lambda s: np.asarray(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    chat = recall.chat_turn(tok)
    if args.side == "train":
        with training_side():
            items, _ = recall.recall_items([("emma.txt", (AUSTEN / "emma.txt").read_text())], tokenize, settings, chat=chat)
    else:
        items, _ = recall.recall_items([("persuasion.txt", (AUSTEN / "persuasion.txt").read_text())], tokenize,
                                       settings, chat=chat)
    config = PassageConfig(blocks=4, margin=args.margin, stand_out=1.0)
    totals, t0 = dict.fromkeys(args.variants, 0.0), time.time()
    with torch.no_grad():
        for it, q in zip(items, question_tokens):
            x = torch.as_tensor(it["prompt"])[None]
            scores = {}
            for v in args.variants:
                window = 256 if v.endswith("256") else 512
                past = x[:, : x.shape[1] - (window - ROOM)]
                ranges = find_passages(past[0].numpy(), x[0, -config.query_tokens:].numpy(), config, ROOM)
                found = torch.cat([past[:, a:b] for a, b in ranges], dim=1) if ranges else x[:, :0]
                tail = x[:, x.shape[1] - (window - found.shape[1]):]
                if v.startswith("front"):
                    ids = torch.cat([found, tail], dim=1)
                elif v.startswith("near"):
                    ids = torch.cat([tail[:, :-q], found, tail[:, -q:]], dim=1)
                else:
                    ids = torch.cat([found, x[:, -q:]], dim=1)
                scores[v] = recall.recall_score(backbone_answer(model, ids, it["max_new_tokens"]), it["answers"])
                totals[v] += scores[v]
            print(it["id"], it["style"], scores, f"{time.time() - t0:.0f}s", flush=True)
    print(args.side, f"margin {args.margin}", {v: f"{s:.0f}/{len(items)}" for v, s in totals.items()})


if __name__ == "__main__":
    main()
