"""Exact chunk search: the MemoryBank's torch top-k vs faiss IndexFlatIP, at 16k and 1M chunks.

    python benchmarks/bench_search.py [--chunks 16384 1048576] [--queries 512]

One KV head, head_dim 64, top-16 chunks, batches of `--queries` query vectors. Flat search is
exact and data-independent in cost, so random vectors time it fairly; recall of approximate
indexes on real keys belongs to the sharded-memory benchmarks.
"""

import argparse
import json

import faiss
import numpy as np
import torch

from common import interleaved, machine
from longmem.memory import MemoryBank
from longmem.memory.bank import exact_topk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, nargs="+", default=[16_384, 1_048_576])
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    faiss.omp_set_num_threads(torch.get_num_threads())
    g = torch.Generator().manual_seed(0)
    rows = []
    for chunks in args.chunks:
        bank = MemoryBank(1, 1, args.dim, capacity_tokens=4 * chunks, chunk_size=4, dtype=torch.float16)
        for start in range(0, 4 * chunks, 1 << 20):  # fill in slices to bound peak memory
            n = min(1 << 20, 4 * chunks - start)
            bank.add(torch.randn(1, n, 1, args.dim, generator=g), torch.randn(1, n, 1, args.dim, generator=g))
        keys = bank.chunk_keys[0, 0].contiguous()  # (chunks, D) float32
        index = faiss.IndexFlatIP(args.dim)
        index.add(keys.numpy())
        q = torch.randn(1, args.queries, 1, args.dim, generator=g)
        qn = np.ascontiguousarray(q[0, :, 0].numpy())

        def torch_topk():
            return exact_topk(q[0, :, 0] @ keys.T, args.k)

        t = interleaved({
            "torch_topk": torch_topk,
            "bank_search": lambda: bank.search(q, args.k),
            "faiss_flat": lambda: index.search(qn, args.k),
        }, rounds=5)
        # same answers: faiss and torch agree on the top-k sets
        _, fi = index.search(qn, args.k)
        ti = torch_topk()[1].numpy()
        agree = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(fi, ti)]))
        rows.append({
            "chunks": chunks,
            "queries_per_batch": args.queries,
            **{f"{name}_queries_per_s": round(args.queries / sec) for name, sec in t.items()},
            "faiss_vs_torch_topk_agreement": round(agree, 4),
        })
    print(json.dumps({"machine": machine(), "k": args.k, "dim": args.dim, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
