"""The first searches of a built memory just opened, cold and after `MemoryStore.prewarm`.

    python benchmarks/bench_memory_scale.py          # builds the 1M and 10M memories it caches
    python benchmarks/bench_prewarm.py --memory ~/.cache/longmem/bench/scale/*/synthetic-10485760-*

A shard is memory-mapped: right after it opens, every search reads the pages it touches from disk.
For each memory: its pages are dropped from the page cache (POSIX_FADV_DONTNEED), the store is
opened and --searches single-token searches are timed (cold); the pages are dropped again, the
store opened and prewarmed, and as many other searches timed (prewarmed); then the first queries
again (warm). Prints ms per search for each and the ratio cold / prewarmed, and what prewarming
read and took. Searches are one generated token's: every query head, k chunks, with the next
tokens, as a shard replica answers them.
"""

import argparse
import gc
import glob
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from longmem.memory.store import MemoryStore


def drop_from_page_cache(folder: Path) -> None:
    """Drop a memory's finished (never dirty) files from the page cache; pages still mapped stay."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def queries_like(store: MemoryStore, n: int, rng: np.random.Generator, query_heads: int) -> list[torch.Tensor]:
    """n single-token queries (1, 1, Hq, D) near keys the memory holds: a stored key of each query
    head's KV head plus noise, as a query that finds something does."""
    shard = store.shards[0]
    H = store.spec.num_kv_heads
    rows = np.sort(rng.choice(shard.num_chunks, size=n, replace=False))
    keys = np.asarray(shard.keys[rows][:, :, 0], np.float32)  # (n, H, D)
    keys = np.repeat(keys, query_heads // H, axis=1)
    keys += rng.standard_normal(keys.shape).astype(np.float32) * keys.std()
    return [torch.as_tensor(q)[None, None] for q in keys]


def timed(store: MemoryStore, queries, k: int) -> list[float]:
    out = []
    for q in queries:
        t0 = time.perf_counter()
        store.search(q, k, with_next=True)
        out.append(1000 * (time.perf_counter() - t0))
    return out


def summary(ms: list[float]) -> dict:
    return {"median_ms": round(statistics.median(ms), 2), "mean_ms": round(statistics.fmean(ms), 2),
            "max_ms": round(max(ms), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", nargs="+", required=True, help="built memory folders (globs allowed)")
    ap.add_argument("--searches", type=int, default=40)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--query-heads", type=int, default=9, help="query heads per token (SmolLM2: 9)")
    args = ap.parse_args()
    folders = [Path(p) for pattern in args.memory for p in sorted(glob.glob(os.path.expanduser(pattern)))]
    if not folders:
        ap.error(f"no memory folder matches {args.memory}")
    rng = np.random.default_rng(0)
    for folder in folders:
        store = MemoryStore.open(folder)
        first = queries_like(store, args.searches, rng, args.query_heads)
        other = queries_like(store, args.searches, rng, args.query_heads)
        tokens = store.num_chunks * store.spec.chunk_size

        del store  # unmapped, so that its pages can be dropped
        gc.collect()
        drop_from_page_cache(folder)
        store = MemoryStore.open(folder)
        cold = timed(store, first, args.k)
        del store
        gc.collect()
        drop_from_page_cache(folder)
        store = MemoryStore.open(folder)
        warmed = store.prewarm()
        prewarmed = timed(store, other, args.k)
        warm = timed(store, first, args.k)
        row = {"memory": str(folder), "tokens": tokens, "searches": args.searches, "k": args.k,
               "cold": summary(cold), "prewarmed": summary(prewarmed), "warm": summary(warm), "prewarm": warmed,
               "cold_over_prewarmed": round(statistics.fmean(cold) / statistics.fmean(prewarmed), 2)}
        print(json.dumps(row), flush=True)
        print(f"{tokens:>11,} tokens: first searches cold {row['cold']['mean_ms']:.1f} ms, after prewarm "
              f"{row['prewarmed']['mean_ms']:.1f} ms ({row['cold_over_prewarmed']:.1f}x), warm {row['warm']['mean_ms']:.1f} ms;"
              f" prewarm read {warmed['bytes'] / 2**30:.2f} of {warmed['of_bytes'] / 2**30:.2f} GiB in {warmed['seconds']:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
