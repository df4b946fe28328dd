"""The memory shard server, the client side that fans a search out to every shard, and the
memory a model replica searches itself (a built memory too small to be worth the round trips)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve


# ------------------------------------------------------------------------------ memory shards
def search_device(device: str) -> str:
    """ "auto": a GPU where the process sees one and faiss can search there (the gpu extra)."""
    if device != "auto":
        return device
    import torch

    from longmem.memory.base import import_faiss

    # a replica sees only the GPUs it asked for; faiss-cpu searches on the CPU
    return "cuda" if torch.cuda.is_available() and hasattr(import_faiss(), "StandardGpuResources") else "cpu"


class Prewarm:
    """Reads a store's files into the page cache on a daemon thread (`MemoryStore.prewarm`), so a
    replica that just started does not pay for every cold page in its first searches. Searches
    run meanwhile. `state()` is what `info()` reports."""

    def __init__(self, store, enabled: bool = True):
        self.result, self.error, self.thread = None, None, None
        if enabled:
            self.thread = threading.Thread(target=self._run, args=(store,), name="prewarm", daemon=True)
            self.thread.start()

    def _run(self, store):
        try:
            self.result = store.prewarm()
        except OSError as e:  # a file that cannot be read fails its searches too, with the error
            self.error = str(e)

    def state(self) -> dict:
        if self.thread is None:
            return {"prewarm": "off"}
        if self.error is not None:
            return {"prewarm": "failed", "prewarm_error": self.error}
        if self.result is None:
            return {"prewarm": "running"}
        return {"prewarm": "done", "prewarmed_bytes": self.result["bytes"], "prewarm_seconds": self.result["seconds"]}


@serve.deployment(max_ongoing_requests=64)
class MemoryShardServer:
    """One shard of a built memory; concurrent searches are batched into one faiss call."""

    def __init__(self, memory_dir: str, shard: int, nprobe: int | None = None, device: str = "auto",
                 prewarm: bool = True):
        from longmem.memory.store import MemoryStore, read_manifest

        self.device = device = search_device(device)
        self.store = MemoryStore.open(memory_dir, shards=[shard], nprobe=nprobe, device=device)
        self.shard = self.store.shards[0]
        self.prewarm = Prewarm(self.store, prewarm)
        self.offset = sum(s["chunks"] for s in read_manifest(memory_dir)["shards"][:shard])
        self.latency = _histogram("longmem_shard_search_seconds", "one batched faiss search of a shard", ("shard",))
        self.tags = {"shard": f"{memory_dir.rstrip('/').rsplit('/', 1)[-1]}-{shard}"}

    # A model replica already sends one search a step for all its rows: join searches that are
    # already queued (from several model replicas), but never wait for more.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0)
    async def search(self, requests: list[tuple]):
        """Phase 1. requests: (queries (n, Hq, D) float32, k) -> (scores float32, rows int32) (n, Hq, k)
        each; concurrent requests share one faiss call per k."""
        import numpy as np

        start = time.perf_counter()
        results = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, (_, k) in enumerate(requests):
            groups.setdefault(k, []).append(i)
        for k, members in groups.items():
            scores, rows = self.shard.search(np.concatenate([requests[i][0] for i in members]), k)
            cuts = np.cumsum([len(requests[i][0]) for i in members])[:-1]
            for i, s, r in zip(members, np.split(scores, cuts), np.split(rows, cuts)):
                results[i] = (s, r.astype(np.int32))
        if self.latency is not None:
            self.latency.observe(time.perf_counter() - start, tags=self.tags)
        return results

    async def gather(self, rows, kv_heads, with_next: bool) -> dict:
        """Phase 2: the entries this shard won, (N,) rows and KV heads -> their keys, values, ids and
        neighbours, in the memory's dtype (`MemoryShard.gather_at`)."""
        return self.shard.gather_at(rows, kv_heads, with_next)

    def info(self) -> dict:
        return {"chunks": self.shard.num_chunks, "offset": self.offset, "device": self.device, **self.prewarm.state()}


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
        self.offsets = [sum(s["chunks"] for s in self.manifest["shards"][:i]) for i in range(len(handles))]
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"search-{name}")
        self.latency = _retrieval_histogram()

    def check_model(self, spec) -> None:
        self.spec.require_compatible(spec, f"memory {self.name!r}")

    def add(self, keys, values, token_ids=None, streams=None, skip_first: int = 0) -> None:
        from longmem.memory import StoreError

        raise StoreError(f"memory {self.name!r} is a built memory and read-only")

    def reset(self, streams=None) -> None:
        """Shared by every stream: nothing of one stream's own to forget."""

    def search(self, queries, k: int, streams=None, with_next: bool = False):
        """Called from the generation thread: the two phases of a sharded search (memory/store.py)."""
        return self.submit(queries, k, with_next)()

    def submit(self, queries, k: int, with_next: bool = False):
        """Start the search now; returns a function that waits for the merged result. Both phases run
        on a helper thread, so the model computes while the shards answer (a batch reading several
        memories starts all their searches before waiting for any)."""
        from longmem.memory.store import search_queries

        q = search_queries(queries)
        pending = self.pool.submit(self._search, q, k, with_next)

        def collect():
            from longmem.memory.store import assemble_retrieval

            scores, owner, rows, parts, start = pending.result()
            merged = assemble_retrieval(queries, scores, owner, rows, parts, self.offsets, self.spec, with_next)
            if self.latency is not None:
                self.latency.observe(time.perf_counter() - start, tags={"memory": self.name})
            return merged

        return collect

    def _search(self, q, k: int, with_next: bool):
        from longmem.memory.store import entries_of, pick_winners

        start = time.perf_counter()
        found = [p.result(timeout_s=60) for p in [h.search.remote((q, k)) for h in self.handles]]
        scores, owner, rows = pick_winners(found, k)
        asked = {i: entries_of(owner, rows, i, self.num_kv_heads) for i in range(len(self.handles))}
        pending = {i: self.handles[i].gather.remote(r, h, with_next) for i, (r, h) in asked.items() if len(r)}
        parts = [pending[i].result(timeout_s=60) if i in pending else None for i in range(len(self.handles))]
        self.traffic["bytes"] += _nbytes(found) + _nbytes(parts)
        self.traffic["query_tokens"] += q.shape[0]
        return scores, owner, rows, parts, start

    def info(self) -> dict:
        t = self.traffic
        per_token = t["bytes"] / t["query_tokens"] if t["query_tokens"] else None
        return {"name": self.name, "shards": len(self.handles), "searched_in": "shard replicas",
                **self.manifest["totals"], "bytes_received_per_query_token": per_token}


class LocalMemory:
    """A built memory searched inside the model replica: the MemoryStore, memory-mapped, with the
    same `submit` as RemoteMemory, so its search runs on a helper thread while the layers above the
    memory layer compute (faiss and numpy release the GIL)."""

    read_only = True

    def __init__(self, name: str, directory: str, nprobe: int | None = None, device: str = "cpu", prewarm: bool = True):
        import torch

        from longmem.memory.store import MemoryStore

        self.name, self.directory = name, directory
        self.store = MemoryStore.open(directory, nprobe=nprobe, device=search_device(device))
        self.prewarm = Prewarm(self.store, prewarm)
        self.manifest, self.spec = self.store.manifest, self.store.spec
        self.num_kv_heads, self.head_dim, self.chunk_size = self.spec.num_kv_heads, self.spec.head_dim, self.spec.chunk_size
        self.device = torch.device("cpu")
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"search-{name}")
        self.latency = _retrieval_histogram()

    def check_model(self, spec) -> None:
        self.store.check_model(spec)

    def add(self, keys, values, token_ids=None, streams=None, skip_first: int = 0) -> None:
        self.store.add(keys, values)

    def passage_tokens(self, stream: int = 0):
        return self.store.passage_tokens(stream)

    def reset(self, streams=None) -> None:
        """Shared by every stream: nothing of one stream's own to forget."""

    def search(self, queries, k: int, streams=None, with_next: bool = False):
        return self.submit(queries, k, with_next)()

    def submit(self, queries, k: int, with_next: bool = False):
        from longmem.memory.store import search_queries

        start = time.perf_counter()
        pending = self.pool.submit(self.store.find, search_queries(queries), k, with_next)

        def collect():
            merged = self.store.assemble(queries, pending.result(), with_next)
            if self.latency is not None:
                self.latency.observe(time.perf_counter() - start, tags={"memory": self.name})
            return merged

        return collect

    def info(self) -> dict:
        return {"name": self.name, "shards": len(self.store.shards), "searched_in": "model replica",
                **self.manifest["totals"], "bytes_received_per_query_token": 0, **self.prewarm.state()}


def _retrieval_histogram():
    """The model replica's wait for a memory's search, remote or in the replica alike."""
    return _histogram("longmem_retrieval_seconds", "a search of every shard of a memory, as the model replica "
                      "waits for it", ("memory",))


def _histogram(name: str, description: str, tags: tuple):
    """A Serve metric, or None outside a Ray worker."""
    try:
        from ray.serve import metrics

        return metrics.Histogram(name, description=description, tag_keys=tags,
                                 boundaries=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2])
    except Exception:  # noqa: BLE001 - metrics are optional; searching is not
        return None


def _nbytes(x) -> int:
    """Bytes of the arrays in a reply (nested lists, tuples and dicts of numpy arrays)."""
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    return getattr(x, "nbytes", 0)
