"""Train a SideNet in-process on five Austen novels, then probe whether it reads its memory on the
sixth (held out). Every probe figure stands next to memory-off and the backbone alone.

    python benchmarks/memory_probes.py --steps 600 --out ~/.cache/longmem/runs/copy \\
        --side-init zero --memory-scale-init 0 --retrieval-query backbone --curriculum plain:0.5,repeat:0.5
    python benchmarks/memory_probes.py --eval-only --checkpoint ~/.cache/longmem/runs/copy

Prints one JSON line per logged step and a final JSON report (also written to OUT/probes.json).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import AUSTEN, machine
from longmem.model import LongMem
from longmem.probes import copy_probe, passkey_probe
from longmem.sidenet import MemoryCopy
from longmem.training import (DistractorMemory, EpisodeSampler, TrainConfig, distractor_segments, make_optimizer,
                              train_step)

HELD_OUT = "persuasion.txt"


def tokenize(tokenizer, path: Path) -> torch.Tensor:
    return tokenizer(path.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--side-init", default="zero")
    ap.add_argument("--retrieval-query", default="backbone")
    ap.add_argument("--memory-scale-init", type=float, default=None)
    ap.add_argument("--retrieval-metric", default="ip", choices=["ip", "cosine"])
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--memory-read", default="attend", choices=["attend", "next"])
    ap.add_argument("--memory-temperature-init", type=float, default=20.0)
    ap.add_argument("--memory-confidence", action="store_true")
    ap.add_argument("--curriculum", default="plain:0.5,repeat:0.5")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--memory-lr", type=float, default=3e-3)
    ap.add_argument("--answer-weight", type=float, default=1.0)
    ap.add_argument("--distractor-tokens", type=int, default=0,
                    help="tokens of other corpus text in every training episode's memory")
    ap.add_argument("--segments", type=int, default=3)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--probe-episodes", type=int, default=4)
    ap.add_argument("--passkey-distances", type=int, nargs="*", default=[4096])
    ap.add_argument("--passkey-trials", type=int, default=4)
    ap.add_argument("--passkey-seed", type=int, default=0, help="draws keys and places (another seed: other trials)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, help="memory chunk size (search granularity); 1 searches single tokens")
    ap.add_argument("--prev-bonus", type=float, help="memory_prev_bonus_init (two-token match in the next read)")
    ap.add_argument("--copy-gate", type=float, help="memory_copy_init (copy distribution mixed into the output)")
    ap.add_argument("--copy-match", type=float, help="memory_copy_match_init (the copy gate opens on exact reads)")
    ap.add_argument("--copy-confidence", type=float,
                    help="memory_copy_confidence_init (the copy gate sees the model's own peak probability)")
    ap.add_argument("--copy-gate-evidence-only", action="store_true",
                    help="memory_copy_gate_hidden=False: the copy gate sees the read's evidence, not the hidden state")
    ap.add_argument("--fresh-copy", action="store_true",
                    help="continue a checkpoint with its copy head (gate, head weights) back at init")
    ap.add_argument("--copy-head-only", action="store_true",
                    help="train only the copy head, with the memory read's values kept out of the hidden state")
    ap.add_argument("--center-keys", type=int, default=0,
                    help="set key_center from this many tokens of the first training book (0: leave it)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    overrides = {k: v for k, v in {"chunk_size": args.chunk_size, "memory_prev_bonus_init": args.prev_bonus,
                                 "memory_copy_init": args.copy_gate, "memory_copy_match_init": args.copy_match,
                                 "memory_copy_confidence_init": args.copy_confidence,
                                 "memory_copy_gate_hidden": False if args.copy_gate_evidence_only else None}.items()
                 if v is not None}
    if args.checkpoint:
        model = LongMem.from_pretrained(args.checkpoint, overrides=overrides)
    else:
        scale = {} if args.memory_scale_init is None else {"memory_scale_init": args.memory_scale_init}
        model = LongMem.from_backbone(side_init=args.side_init, retrieval_query=args.retrieval_query,
                                      retrieval_metric=args.retrieval_metric, sink_tokens=args.sink_tokens,
                                      window=args.window, memory_read=args.memory_read,
                                      memory_temperature_init=args.memory_temperature_init,
                                      memory_confidence=args.memory_confidence, **scale, **overrides)
    if args.fresh_copy:
        if model.config.memory_copy_init is None:
            sys.exit("--fresh-copy needs a copy head (--copy-gate)")
        model.sidenet.memory_copy = MemoryCopy(model.adapter.hidden_size, model.adapter.num_heads,
                                               model.config.memory_copy_init, model.config.memory_copy_match_init,
                                               model.config.memory_copy_gate_hidden,
                                               model.config.memory_copy_confidence_init)
    tok = model.tokenizer
    if args.center_keys:
        first_book = tokenize(tok, next(p for p in sorted(AUSTEN.glob("*.txt")) if p.name != HELD_OUT))
        model.calibrate_key_center(first_book[None, : args.center_keys])
    report = {"machine": machine(), "config": model.config.to_dict()}
    t_start = time.time()
    if not args.eval_only:
        cfg = TrainConfig(steps=args.steps, lr=args.lr, memory_lr=args.memory_lr, curriculum=args.curriculum,
                          answer_weight=args.answer_weight, distractor_tokens=args.distractor_tokens,
                          segments_per_episode=args.segments, seed=args.seed,
                          copy_head_only=args.copy_head_only).validate()
        books = [tokenize(tok, p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != HELD_OUT]
        sampler = EpisodeSampler(books, args.window, cfg.segments_per_episode, cfg.curriculum, cfg.seed, tok)
        distractors = None
        if cfg.distractor_tokens:
            distractors = DistractorMemory(model, distractor_segments(books, args.window, cfg), cfg.distractor_tokens)
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
    report["copy_probe"] = copy_probe(model, held[:, : (3 * args.window) * args.probe_episodes], episodes=args.probe_episodes)
    report["passkey"] = [passkey_probe(model, held, d, trials=args.passkey_trials, seed=args.passkey_seed)
                         for d in args.passkey_distances]
    print(json.dumps(report, indent=2), flush=True)
    out_dir = args.out or args.checkpoint
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "probes.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
