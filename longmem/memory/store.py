"""Persistent, sharded memory on disk: the format, and searching it. No Ray here.

    <memory dir>/
      manifest.json            written last, atomically: spec, generation, shard list, totals, checksums
      shard-00000-<digest>/    named by content: a rebuild writes new folders beside the old ones
        shard.json             this shard's files with sha256, index kind, its two edges
        chunks.parquet         one row per chunk: doc_id, position, token_ids
        keys.npy, values.npy   (N, Hkv, csz, D) memory dtype, memory-mapped
        edges.npy              (Hkv, D) the value of the token after the last chunk, when the
                               document goes on in the next shard
        index/head-<h>.npy     exact index of KV head h: (N, D) float32 chunk keys (mean of the
                               chunk's token keys; unit length for cosine), memory-mapped
        index/head-<h>.faiss   or an IVF (float16 codes) / IVF-PQ index over the same vectors,
          + head-<h>.ivfdata   its inverted lists on disk beside it (memory-mapped)

A memory is one sequence of windows (documents in id order) cut into shards by token ranges, so a
long document spreads over several shards. Chunks are cut exactly as a MemoryBank cuts one
document's stream: every token of every encoding window (each encoded after its context,
`LongMem.memory_context`), in order, cut into chunks of `chunk_size`; a document's last partial
chunk is dropped. So a store holds the same chunks as a bank fed each document, and searching it
returns them in the same format (`MemoryRetrieval`), with `next_values` for the next-token read
(across shard boundaries too: each shard keeps its edges). Memories of the first layout (one
`.faiss` file per head, documents whole in one shard) read the same.

    store = MemoryStore.open("memory/")
    hits = store.search(queries, k=16)        # queries (B, T, Hq, D) -> MemoryRetrieval

A store implements the `Memory` contract (memory/base.py), read-only. Writing: memory/writer.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .base import MemoryRetrieval, MemorySpec, StoreError, import_faiss, neighbour_tokens

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_META = "shard.json"
INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq")
_NP_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.float32}  # numpy has no bf16


# ---------------------------------------------------------------------------------------- reading
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()



def read_npy_rows(path: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a .npy file, read (not memory-mapped: bounded memory for any file)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran:
            raise StoreError(f"{path}: Fortran-ordered arrays are not memory files")
        row = int(np.prod(shape[1:], dtype=np.int64))
        stop = min(stop, shape[0])
        f.seek(start * row * dtype.itemsize, 1)
        data = np.fromfile(f, dtype=dtype, count=max(0, stop - start) * row)
    return data.reshape(-1, *shape[1:])


class ExactKeys:
    """Exact inner-product search over a memory-mapped (N, D) float32 matrix: an index whose RAM
    is the page cache's, not the process's."""

    def __init__(self, path: Path):
        self.vectors = np.load(path, mmap_mode="r")
        self.ntotal = self.vectors.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        n = queries.shape[0]
        scores, rows = np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        if self.ntotal:
            kk = min(k, self.ntotal)
            s, i = faiss.knn(queries, self.vectors, kk, metric=faiss.METRIC_INNER_PRODUCT)
            scores[:, :kk], rows[:, :kk] = s, i
        return scores, rows

    def on_device(self, device: str):
        faiss = import_faiss()
        index = faiss.IndexFlatIP(self.vectors.shape[1])
        index.add(np.ascontiguousarray(self.vectors))
        return _to_device(index, device)


def open_head_index(directory: Path, h: int, device: str):
    """KV head h's index in a shard's index folder: exact (memory-mapped matrix) or faiss."""
    faiss = import_faiss()
    exact = directory / f"head-{h}.npy"
    if exact.is_file():
        index = ExactKeys(exact)
        return index if not str(device).startswith("cuda") else index.on_device(device)
    path = directory / f"head-{h}.faiss"
    if (directory / f"head-{h}.ivfdata").is_file():  # inverted lists on disk, found beside the index
        with _quiet_stdout():  # faiss prints the data file's new path on stdout
            index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        # By default every search starts 32 threads that touch the probed lists' pages ahead of the
        # scan: for one decode step's query that costs several times the scan itself. The lists
        # are read where the scan touches them.
        faiss.downcast_InvertedLists(index.invlists).prefetch_nthread = 0
    else:
        index = faiss.read_index(str(path))
    return _to_device(index, device)


# ------------------------------------------------------------------------------------ prewarming
# A shard is memory-mapped, so the first searches after it opens read from disk every page they
# touch: one probed list, one rescored key row at a time (at 10M tokens several times a warm
# search). Reading the files through once, in order, fills the page cache at the disk's
# sequential speed instead: what pg_prewarm does for a database. A search reads its index first
# and its keys to rescore; values only for the winners, so they come last.
PREWARM_SHARE = 0.5  # of the memory the system has available when prewarming starts


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def prewarm_files(paths: list[Path], budget_bytes: int) -> int:
    """Read `paths` in order, sequentially, until `budget_bytes` are read; returns the bytes read.
    The page cache keeps them while memory allows."""
    done, buf = 0, memoryview(bytearray(8 << 20))
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while done < budget_bytes:
                n = f.readinto(buf[: min(len(buf), budget_bytes - done)])
                if not n:
                    break
                done += n
        if done >= budget_bytes:
            break
    return done


@contextlib.contextmanager
def _quiet_stdout():
    """Send what C code prints on stdout to /dev/null for a moment (output that is JSON must stay JSON)."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def rerank_exact(vectors_of, queries: np.ndarray, scores: np.ndarray, rows: np.ndarray, k: int):
    """Re-score approximate candidates exactly and keep the best k.

    queries (m, D); scores/rows (m, k') from an approximate index (rows -1 = none);
    vectors_of(rows (r,)) -> (r, D) the exact indexed vectors. Returns scores, rows (m, k)."""
    valid = rows >= 0
    exact = np.full(rows.shape, -np.inf, np.float32)
    if valid.any():
        vecs = vectors_of(rows[valid])  # (r, D)
        exact[valid] = np.einsum("rd,rd->r", vecs, np.repeat(queries, valid.sum(1), axis=0))
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    top_rows = np.take_along_axis(rows, order, 1)
    top = np.take_along_axis(exact, order, 1)
    top_rows[~np.isfinite(top)] = -1
    return top, top_rows


def read_shard_meta(directory: str | Path) -> dict | None:
    """A finished shard's metadata, or None when the shard is missing or was never finished."""
    path = Path(directory) / SHARD_META
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def shard_files_intact(directory: str | Path, meta: dict, checksums: bool = False) -> bool:
    directory = Path(directory)
    for name, info in meta.get("files", {}).items():
        p = directory / name
        if not p.is_file() or p.stat().st_size != info["bytes"]:
            return False
        if checksums and sha256_file(p) != info["sha256"]:
            return False
    return True


class MemoryShard:
    """One shard: memory-mapped keys/values and one faiss index per KV head."""

    def __init__(self, directory: str | Path, spec: MemorySpec, meta: dict | None = None, nprobe: int | None = None,
                 mmap: bool = True, device: str = "cpu", rerank: int = 4):
        import pyarrow.parquet as pq

        self.directory = Path(directory)
        self.spec = spec
        self.meta = meta or read_shard_meta(self.directory)
        if self.meta is None:
            raise StoreError(f"{self.directory} is not a finished memory shard (no {SHARD_META})")
        if not shard_files_intact(self.directory, self.meta):
            raise StoreError(f"{self.directory}: files are missing or of the wrong size; rebuild the memory")
        mode = "r" if mmap else None
        self.keys = np.load(self.directory / "keys.npy", mmap_mode=mode)  # (N, Hkv, c, D)
        self.values = np.load(self.directory / "values.npy", mmap_mode=mode)
        # doc ids as dictionary codes: a few bytes a chunk, however many chunks
        table = pq.read_table(self.directory / "chunks.parquet", read_dictionary=["doc_id"])
        doc = table.column("doc_id").unify_dictionaries().combine_chunks()
        doc_codes = np.asarray(doc.indices) if len(doc) else np.zeros(0, np.int32)
        self.doc_codes, self.doc_names = doc_codes, doc.dictionary.to_pylist() if len(doc) else []
        self.positions = table.column("position").to_numpy()
        self.token_ids = np.asarray(table.column("token_ids").combine_chunks().values).reshape(-1, spec.chunk_size)
        self.num_chunks = len(self.positions)
        del table, doc
        if self.keys.shape[0] != self.num_chunks:
            raise StoreError(f"{self.directory}: keys hold {self.keys.shape[0]} chunks, chunks.parquet {self.num_chunks}")
        # next_joined[i]: chunk i + 1 continues chunk i in the same document (the next-token read);
        # at the shard's ends, its edges say whether the document goes on in the next/previous shard.
        edges = self.meta.get("edges") or {}
        self.next_joined = np.zeros(self.num_chunks, dtype=bool)
        if self.num_chunks > 1:
            self.next_joined[:-1] = (doc_codes[1:] == doc_codes[:-1]) & (
                self.positions[1:] == self.positions[:-1] + spec.chunk_size)
        self.prev_joined = np.zeros(self.num_chunks, dtype=bool)  # chunk i - 1 precedes chunk i
        self.prev_joined[1:] = self.next_joined[:-1]
        self.edge_next_id = edges.get("next_token_id")
        self.edge_prev_id = edges.get("prev_token_id")
        self.edge_next_values = None
        if self.num_chunks and self.edge_next_id is not None:
            self.edge_next_values = np.load(self.directory / "edges.npy")  # (Hkv, D)
            self.next_joined[-1] = True
        if self.num_chunks and self.edge_prev_id is not None:
            self.prev_joined[0] = True
        self.indexes = []
        for h in range(spec.num_kv_heads):
            index = open_head_index(self.directory / "index", h, device)
            if hasattr(index, "nprobe"):  # the probes measured to keep the target recall, unless asked
                index.nprobe = min(nprobe or self.meta.get("nprobe", 32), index.nlist)
            self.indexes.append(index)
        # Product-quantised scores are coarse (recall@16 ~0.35 on real keys, docs/results.md): fetch
        # rerank x k candidates and score them exactly from the memory-mapped keys. Lists of
        # float16 codes find the right chunks but round their scores: rescore the k found, so every
        # index kind returns exact scores (shards and memories are merged by score).
        # (Shards written before the codes have float32 lists and no "codes" entry.)
        self.rerank = rerank if self.meta.get("index") == "ivfpq" else int(self.meta.get("codes") == "float16")

    def search_files(self) -> list[list[Path]]:
        """The files a search reads, in the order it needs them: the index (exact matrices or IVF
        lists; an IVF index's own file is read whole when it opens), the keys it rescores from,
        the values of the winners."""
        index = self.directory / "index"
        lists = [p for h in range(self.spec.num_kv_heads) for p in (index / f"head-{h}.npy", index / f"head-{h}.ivfdata")
                 if p.is_file()]
        return [lists, [p for p in (self.directory / "keys.npy",) if p.is_file()],
                [p for p in (self.directory / "values.npy",) if p.is_file()]]

    @property
    def doc_ids(self) -> list[str]:
        """The document of every row (a list as long as the shard: for inspection, not serving)."""
        return [self.doc_names[c] for c in self.doc_codes]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (n, Hq, D) float32 -> scores, rows (n, Hq, k); rows -1 (score -inf) where empty."""
        n, Hq, D = queries.shape
        Hkv = self.spec.num_kv_heads
        if Hq % Hkv:
            raise StoreError(f"{Hq} query heads cannot share {Hkv} KV heads evenly")
        G = Hq // Hkv
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.spec.metric == "cosine":
            q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
        scores = np.full((n, Hq, k), -np.inf, np.float32)
        rows = np.full((n, Hq, k), -1, np.int64)
        if self.num_chunks == 0:
            return scores, rows
        for h in range(Hkv):
            block = np.ascontiguousarray(q[:, h * G : (h + 1) * G].reshape(n * G, D))  # query head -> KV head h // G
            if self.rerank:
                s, i = self.indexes[h].search(block, k * self.rerank)
                s, i = rerank_exact(lambda r, h=h: self._chunk_vectors(r, h), block, s, i, k)
            else:
                s, i = self.indexes[h].search(block, k)
            s[i < 0] = -np.inf
            scores[:, h * G : (h + 1) * G] = s.reshape(n, G, k)
            rows[:, h * G : (h + 1) * G] = i.reshape(n, G, k)
        return scores, rows

    def _chunk_vectors(self, rows: np.ndarray, h: int) -> np.ndarray:
        """The vectors the index of KV head h holds for these rows (as write_shard built them)."""
        order = np.argsort(rows, kind="stable")  # sorted reads from the memory map
        v = np.empty((len(rows), self.spec.head_dim), np.float32)
        v[order] = self.keys[rows[order], h].astype(np.float32).mean(axis=1)
        if self.spec.metric == "cosine":
            v /= np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
        return v

    def gather(self, rows: np.ndarray, with_next: bool = False) -> dict:
        """rows (n, Hq, k) -> keys/values (n, Hq, k, c, D) of each chunk from its query head's KV
        head, positions and token ids, and (with_next) what `neighbour_tokens` needs of the rows
        beside each (see `gather_at`)."""
        n, Hq, k = rows.shape
        flat = self.gather_at(rows.reshape(-1), kv_heads_of(rows.shape, self.spec.num_kv_heads).reshape(-1), with_next)
        return {name: None if v is None else v.reshape(n, Hq, k, *v.shape[1:]) for name, v in flat.items()}

    def gather_at(self, rows: np.ndarray, kv_heads: np.ndarray, with_next: bool = False) -> dict:
        """rows, kv_heads (N,) -> per entry: keys/values (N, c, D) of the row from that KV head,
        positions (N,) and token ids (N, c) (-1 where the row is -1), and (with_next) the rows
        beside it: a shard's rows are its documents' chunks in order, so row r + 1 continues row r
        when `next_joined[r]`."""
        valid = rows >= 0
        r = np.where(valid, rows, 0)
        if not self.num_chunks:
            return {"keys": None, "values": None, "positions": np.full(rows.shape, -1), "token_ids": None}
        out = {
            "keys": np.asarray(self.keys[r, kv_heads]),
            "values": np.asarray(self.values[r, kv_heads]),
            "positions": np.where(valid, self.positions[r], -1),
            "token_ids": np.where(valid[:, None], self.token_ids[r], -1),
        }
        if with_next:
            following, preceding = np.minimum(r + 1, self.num_chunks - 1), np.maximum(r - 1, 0)
            next_values = np.asarray(self.values[following, kv_heads, 0])  # (N, D)
            next_ids, prev_ids = self.token_ids[following, 0].copy(), self.token_ids[preceding, -1].copy()
            last, first = r == self.num_chunks - 1, r == 0
            if self.edge_next_values is not None and last.any():  # the document goes on in the next shard
                next_values[last] = self.edge_next_values[kv_heads[last]]
                next_ids[last] = self.edge_next_id
            if self.edge_prev_id is not None:
                prev_ids[first] = self.edge_prev_id
            out.update(next_first_values=next_values, next_first_ids=next_ids, next_joined=self.next_joined[r],
                       prev_last_ids=prev_ids, prev_joined=self.prev_joined[r])
        return out


# ------------------------------------------------------------------ searching several shards
# A search of a sharded memory runs in two phases, so that only the winners' keys and values move:
#   1. every shard returns its top-k scores and rows (`MemoryShard.search`),
#   2. `pick_winners` keeps the top k over all shards, and each shard returns the entries it won
#      (`MemoryShard.gather_at` of `entries_of(...)`), which `assemble_retrieval` puts in place.
# The store runs both phases in process; the serving layer sends each to shard replicas.

def pick_winners(found: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each shard's (scores, rows), (n, Hq, k) -> the top k over all shards: scores, owner (which
    shard; -1 for an empty slot) and rows, (n, Hq, k). Ties keep the earlier shard first."""
    if len(found) == 1:
        scores, rows = found[0][0], found[0][1].astype(np.int64, copy=False)
        owner = np.zeros(rows.shape, np.int64)
    else:
        scores = np.concatenate([s for s, _ in found], axis=-1)
        rows = np.concatenate([r for _, r in found], axis=-1).astype(np.int64, copy=False)
        owner = np.concatenate([np.full(r.shape, i, np.int64) for i, (_, r) in enumerate(found)], axis=-1)
        order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
        scores, rows, owner = (np.take_along_axis(x, order, -1) for x in (scores, rows, owner))
    empty = ~np.isfinite(scores)
    return scores, np.where(empty, -1, owner), np.where(empty, -1, rows)


def kv_heads_of(shape: tuple, num_kv_heads: int) -> np.ndarray:
    """(n, Hq, k) -> the KV head each entry's query head reads (query heads share KV heads in order)."""
    Hq = shape[1]
    return np.broadcast_to((np.arange(Hq) // (Hq // num_kv_heads))[None, :, None], shape)


def entries_of(owner: np.ndarray, rows: np.ndarray, shard: int, num_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """The entries shard `shard` won: its rows and their KV heads, (N,) each, in (n, Hq, k) order."""
    mine = owner == shard
    return rows[mine], kv_heads_of(rows.shape, num_kv_heads)[mine]


def assemble_retrieval(queries: torch.Tensor, scores: np.ndarray, owner: np.ndarray, rows: np.ndarray,
                       parts: list[dict | None], offsets: list[int], spec: MemorySpec,
                       with_next: bool = False) -> MemoryRetrieval:
    """The winners of `pick_winners` and each shard's `gather_at` of them -> one MemoryRetrieval of
    queries (B, T, Hq, D), in the queries' dtype and on their device (slots = shard offset + row)."""
    n, Hq, k = rows.shape
    c, D = spec.chunk_size, spec.head_dim
    # field -> (its shape after (n, Hq, k), what an empty slot holds, its dtype when no shard sent it)
    fields = {"keys": ((c, D), 0, np.float32), "values": ((c, D), 0, np.float32), "positions": ((), -1, np.int64),
              "token_ids": ((c,), -1, np.int64)}
    if with_next:
        fields.update(next_first_values=((D,), 0, np.float32), next_first_ids=((), -1, np.int64),
                      next_joined=((), False, bool), prev_last_ids=((), -1, np.int64), prev_joined=((), False, bool))
    won = [owner == i for i in range(len(parts))]
    got = {}
    for name, (tail, fill, default) in fields.items():
        sent = [(i, part[name]) for i, part in enumerate(parts) if part is not None and part.get(name) is not None]
        # in the dtype the shards sent (the memory's): no float32 copy of float16 keys
        full = np.full((n, Hq, k, *tail), fill, dtype=sent[0][1].dtype if sent else default)
        for shard, entries in sent:
            full[won[shard]] = entries
        got[name] = full
    slots = np.where(owner >= 0, np.asarray(offsets, np.int64)[np.maximum(owner, 0)] + rows, -1)
    return _retrieval(queries, scores, slots, got, c, with_next)


def _retrieval(queries: torch.Tensor, scores: np.ndarray, slots: np.ndarray, got: dict, c: int,
               with_next: bool) -> MemoryRetrieval:
    """Gathered entries (n = B * T, Hq, k, ...) -> a MemoryRetrieval (B, Hq, T, ...)."""
    B, T, Hq, D = queries.shape
    kk = scores.shape[-1]
    dtype, device = queries.dtype, queries.device

    def to(x) -> torch.Tensor:  # (B*T, Hq, ...) -> (B, Hq, T, ...)
        t = torch.as_tensor(np.ascontiguousarray(x))
        return t.reshape(B, T, *t.shape[1:]).transpose(1, 2)

    hit = to(np.isfinite(scores))
    ids = to(got["token_ids"].astype(np.int64))
    values = to(got["values"]).to(dtype)  # (B, Hq, T, k, c, D)
    next_values = next_mask = prev_ids = next_ids = None
    if with_next:
        next_values, next_mask, prev_ids, next_ids = neighbour_tokens(
            values, ids, hit, to(got["next_first_values"]).to(dtype), to(got["next_first_ids"].astype(np.int64)),
            to(got["next_joined"]), to(got["prev_last_ids"].astype(np.int64)), to(got["prev_joined"]))
    retrieval = MemoryRetrieval(
        keys=to(got["keys"]).to(dtype).reshape(B, Hq, T, kk * c, D),
        values=values.reshape(B, Hq, T, kk * c, D),
        token_mask=hit.repeat_interleave(c, dim=-1),
        scores=to(scores),
        slots=to(slots),
        positions=to(got["positions"]),
        streams=torch.zeros(B, dtype=torch.long),
        queries=queries.detach().transpose(1, 2).cpu(),
        token_ids=ids,
        next_values=next_values,
        next_mask=next_mask,
        prev_token_ids=prev_ids,
        next_token_ids=next_ids,
    )
    return retrieval if device.type == "cpu" else retrieval.to(device)


def search_queries(queries: torch.Tensor) -> np.ndarray:
    """queries (B, T, Hq, D) -> what a shard searches: float32 (B * T, Hq, D)."""
    B, T, Hq, D = queries.shape
    return np.ascontiguousarray(queries.detach().float().cpu().numpy().reshape(B * T, Hq, D))


def _to_device(index, device: str):
    if not str(device).startswith("cuda"):
        return index
    faiss = import_faiss()

    if not hasattr(faiss, "StandardGpuResources"):
        raise StoreError("a CUDA device was asked for but this faiss has no GPU support; install the 'gpu' extra")
    resources = faiss.StandardGpuResources()
    index = faiss.index_cpu_to_gpu(resources, torch.device(device).index or 0, index)
    index._resources = resources  # keep alive with the index
    return index


class MemoryStore:
    """A built memory: the manifest and its shards, searched together (top-k merged by score)."""

    def __init__(self, directory: Path, manifest: dict, shards: list[MemoryShard]):
        self.directory, self.manifest, self.shards = directory, manifest, shards
        self.spec = MemorySpec.from_dict(manifest["spec"])
        self._tokens = None  # passage_tokens, read once

    @classmethod
    def open(cls, directory: str | Path, verify: bool = False, nprobe: int | None = None, shards: list[int] | None = None,
             device: str = "cpu") -> "MemoryStore":
        """Open a built memory. `verify` checks every file's sha256; `shards` opens only those;
        `nprobe` overrides the IVF probes each shard measured when it was written."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        spec = MemorySpec.from_dict(manifest["spec"])
        chosen = range(len(manifest["shards"])) if shards is None else shards
        opened = []
        for i in chosen:
            if not 0 <= i < len(manifest["shards"]):
                raise StoreError(f"{directory} has {len(manifest['shards'])} shards; there is no shard {i}")
            entry = manifest["shards"][i]
            path = directory / entry["name"]
            if verify and not shard_files_intact(path, entry, checksums=True):
                raise StoreError(f"{path}: a file does not match its checksum; rebuild the memory")
            opened.append(MemoryShard(path, spec, entry, nprobe=nprobe, device=device))
        return cls(directory, manifest, opened)

    @property
    def num_chunks(self) -> int:
        return sum(s.num_chunks for s in self.shards)

    def prewarm(self, budget_bytes: int | None = None) -> dict:
        """Read the shards' files into the page cache, every shard's index first, then keys, then
        values, up to `budget_bytes` (default: PREWARM_SHARE of the memory available now).
        Searches may run meanwhile; they only get faster. Returns bytes read, of how many, seconds."""
        start = time.perf_counter()
        tiers = [[p for shard in self.shards for p in shard.search_files()[t]] for t in range(3)]
        total = sum(p.stat().st_size for tier in tiers for p in tier)
        if budget_bytes is None:
            available = available_memory_bytes()
            budget_bytes = total if available is None else int(PREWARM_SHARE * available)
        done = prewarm_files([p for tier in tiers for p in tier], min(budget_bytes, total))
        return {"bytes": done, "of_bytes": total, "complete": done >= total,
                "seconds": round(time.perf_counter() - start, 2)}

    def passage_tokens(self, stream: int = 0) -> np.ndarray:
        """Every shard's token ids in the order they were built (passage recall; shared by every
        stream)."""
        if self._tokens is None:
            ids = np.concatenate([s.token_ids.reshape(-1) for s in self.shards]) if self.shards else np.zeros(0, np.int64)
            self._tokens = ids[ids >= 0]
        return self._tokens

    def check_model(self, spec: MemorySpec) -> None:
        """Refuse a model whose backbone, memory layer or chunking differ from the memory's."""
        self.spec.require_compatible(spec, f"memory {self.directory}")

    def add(self, keys, values, token_ids=None, streams=None, skip_first: int = 0) -> None:
        raise StoreError(f"memory {self.directory} is a built memory and read-only; write to a bank")

    def reset(self, streams=None) -> None:
        """A built memory is shared by every stream: there is nothing of one stream's own to forget."""

    def search(self, queries: torch.Tensor, k: int, streams=None, with_next: bool = False) -> MemoryRetrieval:
        """queries (B, T, Hq, D) -> the top-k chunks over all shards, as a MemoryRetrieval.

        The store is shared by every stream, so `streams` is accepted and ignored. `slots` are
        global chunk numbers (shard offset + row)."""
        if queries.dim() != 4 or queries.shape[-1] != self.spec.head_dim:
            raise StoreError(f"queries must have shape (B, T, Hq, {self.spec.head_dim}), got {tuple(queries.shape)}")
        return self.assemble(queries, self.find(search_queries(queries), k, with_next), with_next)

    def find(self, q: np.ndarray, k: int, with_next: bool = False) -> tuple:
        """The two phases on numpy search vectors (`search_queries`): (scores, owner, rows, parts)."""
        scores, owner, rows = pick_winners([shard.search(q, k) for shard in self.shards], k)
        parts = [shard.gather_at(*entries_of(owner, rows, i, self.spec.num_kv_heads), with_next)
                 for i, shard in enumerate(self.shards)]
        return scores, owner, rows, parts

    def assemble(self, queries: torch.Tensor, found: tuple, with_next: bool = False) -> MemoryRetrieval:
        offsets = np.cumsum([0] + [s.num_chunks for s in self.shards])[:-1].tolist()
        return assemble_retrieval(queries, *found, offsets, self.spec, with_next)

    @property
    def num_kv_heads(self) -> int:
        return self.spec.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.spec.head_dim

    @property
    def chunk_size(self) -> int:
        return self.spec.chunk_size

    device = torch.device("cpu")  # results are returned on the queries' device
    read_only = True


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise StoreError(f"{directory}: no such memory directory")
    if not path.is_file():
        hint = " (a build was started here but has not finished; rerun it)" if (directory / "build.json").exists() else ""
        raise StoreError(f"{directory} holds no finished memory: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON: {e}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreError(f"{directory} has memory format {version!r}; this version reads format {FORMAT_VERSION}")
    for key in ("spec", "shards"):
        if key not in manifest:
            raise StoreError(f"{path} lacks '{key}'")
    return manifest


def list_shards(directory: str | Path) -> list[dict]:
    """Name, chunks, tokens, bytes and index kind of every shard of a built memory."""
    return [
        {"name": s["name"], "chunks": s["chunks"], "tokens": s["tokens"], "index": s["index"],
         "bytes": sum(f["bytes"] for f in s["files"].values())}
        for s in read_manifest(directory)["shards"]
    ]
