"""Per-shard search on real backbone keys: faiss flat vs IVF vs IVF-PQ vs exact torch.

    python benchmarks/bench_index.py [--vectors 1000000] [--queries 512] [--metric cosine]

Vectors are real memory-layer keys of SmolLM2 (KV head 0) over the Austen novels, one per token
(chunk_size 1 gives ~1M vectors from ~1M tokens; cached under the LongMem cache folder). Queries
are the keys of held-out text (Persuasion), as the backbone_key search uses them. Recall@16 is
measured against exact top-16. Index building uses the same code as `build-memory`.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch

from common import AUSTEN, machine
from longmem.backbone import cache_dir
from longmem.loading import load_model
from longmem.memory.encoder import MemoryEncoder
from longmem.memory.store import rerank_exact
from longmem.memory.writer import build_index


def real_keys(tokens: int, books, enc, tok) -> np.ndarray:
    out, n = [], 0
    W = enc.config.window
    for book in books:
        ids = np.asarray(tok((AUSTEN / book).read_text(), add_special_tokens=False).input_ids, dtype=np.int64)
        for i in range(0, len(ids), W * 8):
            windows = [ids[j : j + W] for j in range(i, min(i + W * 8, len(ids)), W)]
            starts = list(range(i, i + W * len(windows), W))
            befores = [ids[max(0, s - enc.config.sink_tokens) : s] for s in starts]
            for e in enc.encode(windows, starts, befores):
                out.append(e["keys"][:, 0].astype(np.float32))  # KV head 0
                n += len(e["keys"])
            print(f"\rencoded {n:,} keys", end="", file=sys.stderr)
            if n >= tokens:
                print(file=sys.stderr)
                return np.concatenate(out)[:tokens]
    print(file=sys.stderr)
    return np.concatenate(out)[:tokens]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--metric", default="cosine", choices=["cosine", "ip"])
    args = ap.parse_args()
    import faiss

    model = load_model()  # token-level keys (chunk_size 1), as the recipe stores them
    enc, tok = MemoryEncoder(model), model.tokenizer
    cache = cache_dir() / "bench" / f"keys-head0-{args.vectors}.npy"
    if cache.exists():
        keys = np.load(cache)
    else:
        books = sorted(p.name for p in AUSTEN.glob("*.txt") if p.name != "persuasion.txt")
        keys = real_keys(args.vectors, books, enc, tok)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, keys)
    queries = real_keys(args.queries, ["persuasion.txt"], enc, tok)
    if args.metric == "cosine":
        keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    keys, queries = np.ascontiguousarray(keys, np.float32), np.ascontiguousarray(queries, np.float32)
    k = args.k

    kt, qt = torch.from_numpy(keys), torch.from_numpy(queries)

    def exact():
        out = []
        for i in range(0, len(qt), 64):
            out.append((qt[i : i + 64] @ kt.T).topk(k, dim=-1).indices)
        return torch.cat(out).numpy()

    t0 = time.perf_counter()
    truth = exact()
    rows = [{"method": "exact torch (matmul + topk)", "build_s": 0.0,
             "queries_per_s": len(queries) / (time.perf_counter() - t0), "recall@16": 1.0}]
    for kind in ("flat", "ivf", "ivfpq"):
        t0 = time.perf_counter()
        index, built = build_index(keys, kind)
        build_s = time.perf_counter() - t0
        for nprobe in ([None] if built == "flat" else [8, 32]):
            if nprobe:
                index.nprobe = nprobe
            t0 = time.perf_counter()
            _, found = index.search(queries, k)
            qps = len(queries) / (time.perf_counter() - t0)
            runs = [("", found, qps)]
            if built == "ivfpq":  # what MemoryShard does for PQ: 4k candidates re-scored exactly
                t0 = time.perf_counter()
                s, cand = index.search(queries, 4 * k)
                _, reranked = rerank_exact(lambda r: keys[r], queries, s, cand, k)
                runs.append((" + exact rerank of 4k", reranked, len(queries) / (time.perf_counter() - t0)))
            for suffix, got, speed in runs:
                recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)])
                name = f"faiss {built}" + (f" nlist {index.nlist} nprobe {nprobe}" if nprobe else "") + suffix
                rows.append({"method": name, "build_s": round(build_s, 1), "queries_per_s": round(speed, 1),
                             "recall@16": round(float(recall), 4)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"machine": machine(), "faiss_threads": faiss.omp_get_max_threads(), "vectors": len(keys),
                      "dim": keys.shape[1], "queries": len(queries), "metric": args.metric, "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
