"""Can the recipe's SideNet learn to read the passages that passage recall puts in its window?

With passage recall on, the shipped model answers fewer held-out questions than without it, while
its own backbone, reading the same passages, answers more (docs/research-log.md § Passage recall:
distractors kept out, and who reads the passage). This run continues the shipped model's training for a few steps with the
recipe's curriculum, except that every facts episode is read as the product reads a prompt with
passage recall on: the passages its question finds in the earlier segments (the product's search,
longmem/memory/passages.py) are put at the front of the trained segment, unscored. Then
`research/context_recall.py` measures the held-out items on the result:

    python research/passage_training.py --steps 150 --out ~/.cache/longmem/runs/passage-read
    python research/context_recall.py --checkpoint ~/.cache/longmem/runs/passage-read --window 2048 \\
        --trials 10 --set passages.blocks=4

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

from longmem.config import PassageConfig  # noqa: E402
from longmem.generation import PASSAGE_SHARE  # noqa: E402
from longmem.loading import load_model  # noqa: E402
from longmem.memory.passages import find_passages  # noqa: E402
from longmem.training import (DistractorMemory, Episode, EpisodeSampler, TrainConfig, distractor_segments,  # noqa: E402
                              make_optimizer, train_step)

HELD_OUT = "persuasion.txt"


class PassageEpisodes(EpisodeSampler):
    """The recipe's episodes; a facts episode's trained segment opens with the passages its question
    finds in the segments before it."""

    def __init__(self, *args, passages: PassageConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.passages = passages
        self.found = self.facts_episodes = 0

    def sample(self) -> Episode:
        episode = super().sample()
        if episode.kind != "facts":
            return episode
        self.facts_episodes += 1
        W, region = self.window, (self.segments - 1) * self.window
        ids = episode.ids
        asked = int(np.flatnonzero(episode.answer.numpy())[0])  # the question ends here
        question = ids[:asked][-self.passages.query_tokens:].numpy()
        ranges = find_passages(ids[:region].numpy(), question, self.passages, W // PASSAGE_SHARE)
        if not ranges:
            return episode
        self.found += 1
        passage = torch.cat([ids[a:b] for a, b in ranges])
        ids, labels = ids.clone(), episode.labels.clone()
        ids[region : region + passage.numel()] = passage
        labels[region : region + passage.numel()] = -100  # read, not scored
        return Episode(ids, labels, episode.kind, episode.answer)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/sidenet")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--window", type=int, default=512, help="the training window (the recipe's)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(checkpoint=args.checkpoint, overrides={"memory.window": args.window})
    tok = model.tokenizer
    books = [tok((p).read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
             for p in sorted(AUSTEN.glob("*.txt")) if p.name != HELD_OUT]
    cfg = TrainConfig(steps=args.steps, lr=args.lr, seed=1).validate()
    sampler = PassageEpisodes(books, args.window, cfg.segments_per_episode, cfg.curriculum, cfg.seed, tok,
                              passages=PassageConfig(blocks=4))
    distractors = DistractorMemory(model, distractor_segments(books, args.window, cfg), cfg.distractor_tokens,
                                   cfg.frozen_precision(model.device))
    optimizer, scheduler = make_optimizer(model.sidenet, cfg)
    t0 = time.time()
    for step in range(cfg.steps):
        episodes = [[sampler.sample() for _ in range(cfg.batch_size)]]
        metrics = train_step(model, episodes, optimizer, scheduler, cfg, distractors=distractors)
        if step % 10 == 0 or step == cfg.steps - 1:
            print(json.dumps({"step": step, "elapsed_s": round(time.time() - t0), "loss": round(metrics["loss"], 4),
                              "facts_with_passages": f"{sampler.found}/{sampler.facts_episodes}"}), flush=True)
    model.save_pretrained(args.out)
    print(f"saved {args.out} after {time.time() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
