"""Train a SideNet in-process on five Austen novels, then probe whether it reads its memory on the
sixth (held out). Every probe figure stands next to memory-off and the backbone alone. A research
driver: the product's training is `jobs/train_sidenet.py` (Ray Train).

    python research/memory_probes.py --steps 600 --out ~/.cache/longmem/runs/copy
    python research/memory_probes.py --steps 100 --preset paper --set memory.chunk_size=2
    python research/memory_probes.py --eval-only --checkpoint ~/.cache/longmem/runs/copy

Prints one JSON line per logged step and a final JSON report (also written to OUT/probes.json).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import AUSTEN, machine  # noqa: E402
from longmem.evaluation.probes import copy_probe, passkey_probe  # noqa: E402
from longmem.loading import load_model  # noqa: E402
from longmem.training import (DistractorMemory, EpisodeSampler, TrainConfig, distractor_segments,  # noqa: E402
                              make_optimizer, train_step)

HELD_OUT = "persuasion.txt"


def tokenize(tokenizer, path: Path) -> torch.Tensor:
    return tokenizer(path.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--preset", default="default", choices=["default", "paper"])
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SETTING=VALUE",
                    help="a model setting, e.g. --set memory.chunk_size=4 (repeatable)")
    defaults = TrainConfig()
    ap.add_argument("--curriculum", default=defaults.curriculum)
    ap.add_argument("--lr", type=float, default=defaults.lr)
    ap.add_argument("--memory-lr", type=float, default=defaults.memory_lr)
    ap.add_argument("--answer-weight", type=float, default=defaults.answer_weight)
    ap.add_argument("--distractor-tokens", type=int, default=defaults.distractor_tokens,
                    help="tokens of other corpus text in every training episode's memory")
    ap.add_argument("--segments", type=int, default=defaults.segments_per_episode)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--probe-episodes", type=int, default=4)
    ap.add_argument("--passkey-distances", type=int, nargs="*", default=[4096])
    ap.add_argument("--passkey-trials", type=int, default=4)
    ap.add_argument("--passkey-seed", type=int, default=0, help="draws keys and places (another seed: other trials)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copy-head-only", action="store_true",
                    help="train only the copy head, with the memory read's values kept out of the hidden state")
    ap.add_argument("--center-keys", type=int, default=8192,
                    help="a fresh model's key centre from this many tokens of the first training book (0: leave it)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    overrides = {}
    for item in args.overrides:
        key, _, raw = item.partition("=")
        overrides[key] = yaml.safe_load(raw)
    model = load_model(checkpoint=args.checkpoint, overrides=overrides, preset=args.preset)
    window = model.config.memory.window
    tok = model.tokenizer
    if args.center_keys and model.config.memory.center_keys and not args.checkpoint:
        first_book = tokenize(tok, next(p for p in sorted(AUSTEN.glob("*.txt")) if p.name != HELD_OUT))
        model.calibrate_key_center(first_book[None, : args.center_keys])
    report = {"machine": machine(), "config": model.config.to_dict()}
    t_start = time.time()
    if not args.eval_only:
        cfg = TrainConfig(steps=args.steps, lr=args.lr, memory_lr=args.memory_lr, curriculum=args.curriculum,
                          answer_weight=args.answer_weight, distractor_tokens=args.distractor_tokens,
                          segments_per_episode=args.segments, seed=args.seed,
                          copy_head_only=args.copy_head_only,
                          frozen_dtype="float32").validate()  # as the recorded runs trained
        books = [tokenize(tok, p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != HELD_OUT]
        sampler = EpisodeSampler(books, window, cfg.segments_per_episode, cfg.curriculum, cfg.seed, tok)
        distractors = None
        if cfg.distractor_tokens:
            distractors = DistractorMemory(model, distractor_segments(books, window, cfg), cfg.distractor_tokens)
            print(json.dumps({"distractor_pool_segments": len(distractors.ids),
                              "elapsed_s": round(time.time() - t_start)}), flush=True)
        optimizer, scheduler = make_optimizer(model.sidenet, cfg)
        seen = 0
        for step in range(cfg.steps):
            metrics = train_step(model, [[sampler.sample() for _ in range(cfg.batch_size)]], optimizer, scheduler, cfg,
                                 distractors=distractors)
            seen += metrics["tokens"]
            if step % args.log_every == 0 or step == cfg.steps - 1:
                print(json.dumps({"step": step, "elapsed_s": round(time.time() - t_start), **{
                    k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}}), flush=True)
        report.update(train=cfg.to_dict(), train_seconds=round(time.time() - t_start), trained_tokens=seen)
        if args.out:
            model.save_pretrained(args.out)
    held = tokenize(tok, AUSTEN / HELD_OUT)[None]
    report["copy_probe"] = copy_probe(model, held[:, : (3 * window) * args.probe_episodes], episodes=args.probe_episodes)
    report["passkey"] = [passkey_probe(model, held, d, trials=args.passkey_trials, seed=args.passkey_seed)
                         for d in args.passkey_distances]
    print(json.dumps(report, indent=2), flush=True)
    out_dir = args.out or args.checkpoint
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "probes.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
