"""Where a recipe training step spends its time: one worker's step in this process, 1 thread (as a
1-CPU Ray Train worker runs it), on the recipe's settings (jobs/configs/train_sidenet.yaml), with
a distractor pool; then the frozen write of an episode's memory segments in float32 and in
bfloat16 autocast.

    python research/step_profile.py [--steps 3] [--profile]
"""

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import AUSTEN  # noqa: E402

from longmem.loading import load_model  # noqa: E402
from longmem.training import (DistractorMemory, TrainConfig, distractor_segments, episode_stream,  # noqa: E402
                              make_optimizer, train_step)

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pool-segments", type=int, default=32, help="distractor pool (the job encodes 128)")
    ap.add_argument("--profile", action="store_true", help="cProfile one more step (cumulative times)")
    ap.add_argument("--frozen-dtype", default=None, help="TrainConfig.frozen_dtype (default: the recipe's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = TrainConfig(**yaml.safe_load((ROOT / "jobs/configs/train_sidenet.yaml").read_text())["job"]["train"])
    if args.frozen_dtype:
        cfg.frozen_dtype = args.frozen_dtype
    cfg.validate()
    print(f"frozen passes: {cfg.frozen_precision(torch.device('cpu')) or 'float32'}")
    model = load_model()
    tok, W = model.tokenizer, model.config.memory.window
    doc = np.asarray(tok((AUSTEN / "emma.txt").read_text(), add_special_tokens=False).input_ids)
    episodes = episode_stream(lambda: [("emma", doc)], W, cfg, tok)
    t = time.time()
    pool = DistractorMemory(model, distractor_segments([doc], W, cfg)[: args.pool_segments], cfg.distractor_tokens,
                            cfg.frozen_precision(model.device))
    print(f"distractor pool: {args.pool_segments} segments encoded in {time.time() - t:.1f} s")
    optimizer, scheduler = make_optimizer(model.sidenet, cfg)
    per = cfg.grad_accum * cfg.batch_size

    def step():
        batch = [next(episodes) for _ in range(per)]
        return train_step(model, [batch[i : i + cfg.batch_size] for i in range(0, per, cfg.batch_size)],
                          optimizer, scheduler, cfg, distractors=pool)

    for i in range(args.steps):
        t = time.time()
        step()
        print(f"step {i}: {time.time() - t:.2f} s ({cfg.segments_per_episode} segments an episode, "
              f"{cfg.train_segments} trained, {per} episode(s))", flush=True)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        step()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)

    model.eval()
    ids = model.encode((AUSTEN / "emma.txt").read_text()[:20000])[:, : (cfg.segments_per_episode - cfg.train_segments) * W]

    def write(bf16: bool) -> float:
        bank = model.new_bank(1)
        t = time.time()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.write_memory(ids, bank)
        return time.time() - t

    write(False), write(True)
    f32, bf16 = min(write(False) for _ in range(3)), min(write(True) for _ in range(3))
    print(f"frozen write of {ids.shape[1]} tokens: float32 {f32:.2f} s, bfloat16 autocast {bf16:.2f} s")


if __name__ == "__main__":
    main()
