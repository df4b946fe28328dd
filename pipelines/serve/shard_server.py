"""The memory shard server, and the client side that fans a search out to every shard."""

from __future__ import annotations

from ray import serve


# ------------------------------------------------------------------------------ memory shards
@serve.deployment(max_ongoing_requests=64)
class MemoryShardServer:
    """One shard of a built memory; concurrent searches are batched into one faiss call."""

    def __init__(self, memory_dir: str, shard: int, nprobe: int = 32, device: str = "auto"):
        import torch

        from longmem.memory.store import MemoryStore, read_manifest

        if device == "auto":  # a replica sees only the GPUs it asked for; faiss-cpu searches on the CPU
            from longmem.memory.base import import_faiss

            gpu_faiss = hasattr(import_faiss(), "StandardGpuResources")
            device = "cuda" if torch.cuda.is_available() and gpu_faiss else "cpu"
        self.device = device
        self.store = MemoryStore.open(memory_dir, shards=[shard], nprobe=nprobe, device=device)
        self.dtype = torch.float16 if self.store.spec.dtype == "float16" else torch.float32
        self.shard = self.store.shards[0]
        self.offset = sum(s["chunks"] for s in read_manifest(memory_dir)["shards"][:shard])
        self.latency = _histogram("longmem_shard_search_seconds", "one batched faiss search of a shard", ("shard",))
        self.tags = {"shard": f"{memory_dir.rstrip('/').rsplit('/', 1)[-1]}-{shard}"}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def search(self, requests: list[tuple]):
        """requests: (queries (1, T, Hq, D) float32, k, with_next) -> MemoryRetrieval each."""
        import torch

        from longmem.memory import split_retrieval
        from longmem.memory.store import shard_retrieval

        import time

        start = time.perf_counter()
        results = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (_, k, with_next) in enumerate(requests):
            groups.setdefault((k, with_next), []).append(i)
        for (k, with_next), members in groups.items():
            queries = torch.cat([requests[i][0] for i in members], dim=1)  # (1, sum T, Hq, D)
            # The reply is lean: keys and values in the memory's dtype, the queries not echoed back.
            merged = shard_retrieval(self.shard, queries, k, with_next, self.offset, dtype=self.dtype)
            merged.queries = None
            for i, part in zip(members, split_retrieval(merged, [requests[i][0].shape[1] for i in members])):
                results[i] = part
        if self.latency is not None:
            self.latency.observe(time.perf_counter() - start, tags=self.tags)
        return results

    def info(self) -> dict:
        return {"chunks": self.shard.num_chunks, "offset": self.offset, "device": self.device}


class RemoteMemory:
    """A built memory whose shards live in MemoryShardServer replicas: the `Memory` contract
    (longmem/memory/base.py), read-only, like the MemoryStore it serves."""

    read_only = True

    def __init__(self, name: str, directory: str, handles: list):
        import torch

        from longmem.memory import MemorySpec
        from longmem.memory.store import read_manifest

        self.name, self.directory, self.handles = name, directory, handles
        self.manifest = read_manifest(directory)
        self.spec = MemorySpec.from_dict(self.manifest["spec"])
        self.num_kv_heads, self.head_dim, self.chunk_size = self.spec.num_kv_heads, self.spec.head_dim, self.spec.chunk_size
        self.device = torch.device("cpu")
        # bytes the shards sent back, and for how many query tokens (a decoding step: one a row)
        self.traffic = {"bytes": 0, "query_tokens": 0}
        self.latency = _histogram("longmem_retrieval_seconds", "a search of every shard of a memory, as the model "
                                  "replica waits for it", ("memory",))

    def check_model(self, spec) -> None:
        self.spec.require_compatible(spec, f"memory {self.name!r}")

    def add(self, keys, values, token_ids=None, streams=None, skip_first: int = 0) -> None:
        from longmem.memory import StoreError

        raise StoreError(f"memory {self.name!r} is a built memory and read-only")

    def reset(self, streams=None) -> None:
        """Shared by every stream: nothing of one stream's own to forget."""

    def search(self, queries, k: int, streams=None, with_next: bool = False):
        """Called from the generation thread: every shard is asked at once, then merged by score."""
        return self.submit(queries, k, with_next)()

    def submit(self, queries, k: int, with_next: bool = False):
        """Send the search to every shard now; returns a function that waits for the merged result
        (a batch reading several memories sends all their searches before waiting for any)."""
        from longmem.memory import merge_retrievals

        import time

        start = time.perf_counter()
        q = queries.detach().float().cpu()
        pending = [h.search.remote((q, k, with_next)) for h in self.handles]

        def collect():
            parts = [p.result(timeout_s=60) for p in pending]
            self.traffic["bytes"] += sum(_nbytes(p) for p in parts)
            self.traffic["query_tokens"] += queries.shape[0] * queries.shape[1]
            merged = merge_retrievals(parts, k)
            merged.queries = queries.detach().transpose(1, 2)  # (B, H, T, D): the shards do not send them back
            if self.latency is not None:
                self.latency.observe(time.perf_counter() - start, tags={"memory": self.name})
            return merged if queries.device.type == "cpu" else merged.to(queries.device)

        return collect

    def info(self) -> dict:
        t = self.traffic
        per_token = t["bytes"] / t["query_tokens"] if t["query_tokens"] else None
        return {"name": self.name, "shards": len(self.handles), **self.manifest["totals"],
                "bytes_received_per_query_token": per_token}


def _histogram(name: str, description: str, tags: tuple):
    """A Serve metric, or None outside a Ray worker."""
    try:
        from ray.serve import metrics

        return metrics.Histogram(name, description=description, tag_keys=tags,
                                 boundaries=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2])
    except Exception:  # noqa: BLE001 - metrics are optional; searching is not
        return None


def _nbytes(retrieval) -> int:
    import dataclasses

    import torch

    return sum(v.numel() * v.element_size() for f in dataclasses.fields(retrieval)
               for v in [getattr(retrieval, f.name)] if torch.is_tensor(v))
