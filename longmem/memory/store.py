"""Persistent, sharded memory on disk: the format, and searching it. No Ray here.

    <memory dir>/
      manifest.json            written last, atomically: spec, shard list, totals, checksums
      shard-00000/
        shard.json             this shard's files with sha256, documents digest, index kind
        chunks.parquet         one row per chunk: doc_id, position, token_ids
        keys.npy, values.npy   (N, Hkv, csz, D) memory dtype, memory-mappable
        index/head-<h>.faiss   per KV head, a faiss index over chunk keys (mean of the chunk's token
                               keys; unit length for cosine): flat, IVF or IVF-PQ

Chunks are cut exactly as a MemoryBank cuts one document's stream: every encoding window drops
its first `sink_tokens` tokens, the remaining tokens of all windows are concatenated in order and
cut into chunks of `chunk_size`; a document's last partial chunk is dropped. So a store holds the
same chunks as a bank fed each document, and searching it returns them in the same format
(`MemoryRetrieval`), with `next_values` for the next-token read.

    store = MemoryStore.open("memory/")
    hits = store.search(queries, k=16)        # queries (B, T, Hq, D) -> MemoryRetrieval
    store.chunk_text(hits, tokenizer, ...)    # what was retrieved, as text
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .bank import MemoryRetrieval, merge_retrievals

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_META = "shard.json"
INDEX_KINDS = ("flat", "ivf", "ivfpq")
_NP_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.float32}  # numpy has no bf16


class StoreError(ValueError):
    """A memory directory that cannot be used as asked; the message says why."""


@dataclass(frozen=True)
class MemorySpec:
    """What produced a memory; a model may read it only if its own spec matches."""

    backbone: str
    backbone_fingerprint: str
    model_type: str
    memory_layer: int
    num_kv_heads: int
    head_dim: int
    chunk_size: int
    window: int
    sink_tokens: int
    dtype: str
    metric: str
    backbone_revision: str | None = None
    key_center: str | None = None  # digest of LongMemConfig.key_center (None: raw keys)

    @classmethod
    def from_config(cls, config, num_kv_heads: int, head_dim: int) -> "MemorySpec":
        return cls(
            backbone=config.backbone, backbone_fingerprint=config.backbone_fingerprint,
            model_type=config.model_type, memory_layer=config.resolved_memory_layer,
            num_kv_heads=num_kv_heads, head_dim=head_dim, chunk_size=config.chunk_size,
            window=config.window, sink_tokens=config.sink_tokens,
            dtype="float32" if config.memory_dtype == "bfloat16" else config.memory_dtype,
            metric=config.retrieval_metric, backbone_revision=config.backbone_revision,
            key_center=config.key_center_digest(),
        )

    @classmethod
    def from_dict(cls, data: dict) -> "MemorySpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def differences(self, other: "MemorySpec") -> list[str]:
        """Fields that make two specs incompatible (the backbone's name may differ, its weights not)."""
        ignore = {"backbone", "backbone_revision"}
        return [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in fields(self)
            if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)
        ]

    def require_compatible(self, other: "MemorySpec", what: str) -> None:
        diff = self.differences(other)
        if diff:
            raise StoreError(f"{what} was built for a different model: " + "; ".join(diff))


# ---------------------------------------------------------------------------------------- writing
def chunk_document(keys, values, token_ids, positions, chunk_size: int):
    """Stored tokens of one document in order -> whole chunks.

    keys/values (N, Hkv, D); token_ids, positions (N,). Returns keys/values (n, Hkv, c, D),
    token_ids (n, c), chunk positions (n,) = position of each chunk's first token.
    """
    c = chunk_size
    n = keys.shape[0] // c
    keys = keys[: n * c].reshape(n, c, *keys.shape[1:]).transpose(0, 2, 1, 3)
    values = values[: n * c].reshape(n, c, *values.shape[1:]).transpose(0, 2, 1, 3)
    return keys, values, token_ids[: n * c].reshape(n, c), positions[: n * c : c]


def assign_shards(docs: list[tuple[str, int]], shards: int) -> list[list[tuple[str, int]]]:
    """Documents (doc_id, tokens) -> shards balanced by tokens; deterministic; each list sorted by id."""
    load = [0] * shards
    out: list[list[tuple[str, int]]] = [[] for _ in range(shards)]
    for doc_id, n in sorted(docs, key=lambda d: (-d[1], d[0])):
        i = min(range(shards), key=lambda s: (load[s], s))
        load[i] += n
        out[i].append((doc_id, n))
    return [sorted(s) for s in out]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def documents_digest(docs: list[tuple[str, int]]) -> str:
    """A digest of (doc_id, num_tokens) pairs: a finished shard is reused only for the same documents."""
    return hashlib.sha256(json.dumps(docs).encode()).hexdigest()[:32]


def _ivf_lists(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list


def build_index(vectors: np.ndarray, kind: str, seed: int = 0):
    """A faiss inner-product index over (N, D) float32 vectors. Returns (index, kind actually built):
    IVF needs >= 39 vectors per list and PQ >= 9,984 training vectors; smaller shards fall back."""
    import faiss

    n, d = vectors.shape
    if kind == "ivfpq" and (n < 39 * 256 or d % 8):
        kind = "ivf"
    if kind == "ivf" and n < 2 * 39:
        kind = "flat"
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        nlist = _ivf_lists(n)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, nlist, d // 4, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        if kind == "ivfpq":
            index.pq.cp.seed = seed  # deterministic training: a rebuilt shard is byte-identical
        index.train(vectors)
    index.add(vectors)
    return index, kind


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


def write_shard(directory: str | Path, spec: MemorySpec, documents: list[dict], index_kind: str = "flat",
                docs_digest: str = "") -> dict:
    """Write one shard from documents in order: dicts of doc_id, keys, values (N, Hkv, D),
    token_ids, positions (N,). Files first, shard.json last. Returns the shard's metadata."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    if index_kind not in INDEX_KINDS:
        raise StoreError(f"index must be one of {INDEX_KINDS}, got {index_kind!r}")
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    (directory / "index").mkdir(parents=True)
    c, H, D = spec.chunk_size, spec.num_kv_heads, spec.head_dim
    dtype = _NP_DTYPES[spec.dtype]
    parts = {"keys": [], "values": [], "token_ids": [], "positions": [], "doc_ids": []}
    for doc in documents:
        k, v, ids, pos = chunk_document(doc["keys"], doc["values"], doc["token_ids"], doc["positions"], c)
        parts["keys"].append(k.astype(dtype))
        parts["values"].append(v.astype(dtype))
        parts["token_ids"].append(ids.astype(np.int32))
        parts["positions"].append(pos.astype(np.int64))
        parts["doc_ids"] += [doc["doc_id"]] * k.shape[0]
    if parts["keys"]:
        keys, values = np.concatenate(parts["keys"]), np.concatenate(parts["values"])
        token_ids, positions = np.concatenate(parts["token_ids"]), np.concatenate(parts["positions"])
    else:
        keys = values = np.zeros((0, H, c, D), dtype)
        token_ids, positions = np.zeros((0, c), np.int32), np.zeros(0, np.int64)
    n = keys.shape[0]
    chunk_keys = np.ascontiguousarray(keys.astype(np.float32).mean(axis=2).transpose(1, 0, 2))  # (H, N, D)
    if spec.metric == "cosine":
        chunk_keys /= np.maximum(np.linalg.norm(chunk_keys, axis=-1, keepdims=True), 1e-12)
    np.save(directory / "keys.npy", keys)
    np.save(directory / "values.npy", values)
    table = pa.table({
        "doc_id": pa.array(parts["doc_ids"], pa.string()),
        "position": pa.array(positions, pa.int64()),
        "token_ids": pa.FixedSizeListArray.from_arrays(pa.array(token_ids.reshape(-1), pa.int32()), c),
    })
    pq.write_table(table, directory / "chunks.parquet")
    built = "flat"
    for h in range(H):
        index, built = build_index(chunk_keys[h], index_kind) if n else (faiss.IndexFlatIP(D), "flat")
        faiss.write_index(index, str(directory / "index" / f"head-{h}.faiss"))
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    meta = {
        "format_version": FORMAT_VERSION,
        "chunks": n,
        "tokens": n * c,
        "documents": len(documents),
        "documents_digest": docs_digest,
        "index": built,
        "index_requested": index_kind,
        "files": {f: {"bytes": (directory / f).stat().st_size, "sha256": sha256_file(directory / f)} for f in files},
    }
    _atomic_write_json(directory / SHARD_META, meta)
    return meta


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def write_manifest(directory: str | Path, spec: MemorySpec, shards: list[dict], build: dict) -> dict:
    """The manifest names every shard with its totals and checksums; written last, atomically.
    It holds no timestamps, so rebuilding the same corpus gives the same manifest."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "spec": asdict(spec),
        "build": build,
        "shards": shards,
        "totals": {
            "documents": sum(s["documents"] for s in shards),
            "chunks": sum(s["chunks"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": sum(f["bytes"] for s in shards for f in s["files"].values()),
        },
    }
    _atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------- reading
class MemoryShard:
    """One shard: memory-mapped keys/values and one faiss index per KV head."""

    def __init__(self, directory: str | Path, spec: MemorySpec, meta: dict | None = None, nprobe: int = 32,
                 mmap: bool = True, device: str = "cpu", rerank: int = 4):
        import faiss
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
        table = pq.read_table(self.directory / "chunks.parquet")
        self.doc_ids = table.column("doc_id").to_pylist()
        self.positions = table.column("position").to_numpy()
        self.token_ids = np.asarray(table.column("token_ids").combine_chunks().values).reshape(-1, spec.chunk_size)
        self.num_chunks = len(self.positions)
        if self.keys.shape[0] != self.num_chunks:
            raise StoreError(f"{self.directory}: keys hold {self.keys.shape[0]} chunks, chunks.parquet {self.num_chunks}")
        # next_joined[i]: chunk i + 1 continues chunk i in the same document (the next-token read).
        same_doc = np.array([a == b for a, b in zip(self.doc_ids[:-1], self.doc_ids[1:])], dtype=bool)
        self.next_joined = np.zeros(self.num_chunks, dtype=bool)
        if self.num_chunks > 1:
            self.next_joined[:-1] = same_doc & (self.positions[1:] == self.positions[:-1] + spec.chunk_size)
        self.prev_joined = np.zeros(self.num_chunks, dtype=bool)  # chunk i - 1 precedes chunk i
        self.prev_joined[1:] = self.next_joined[:-1]
        # Product-quantised scores are coarse (recall@16 ~0.35 on real keys, docs/results.md): fetch
        # rerank x k candidates and score them exactly from the memory-mapped keys.
        self.rerank = rerank if self.meta.get("index") == "ivfpq" else 0
        self.indexes = []
        for h in range(spec.num_kv_heads):
            index = faiss.read_index(str(self.directory / "index" / f"head-{h}.faiss"))
            if hasattr(index, "nprobe"):
                index.nprobe = min(nprobe, index.nlist)
            self.indexes.append(_to_device(index, device))

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
        """rows (n, Hq, k) -> keys/values (n, Hq, k, c, D) of each chunk from its query head's KV head,
        positions, token ids, and (with_next) the values and ids of each token's successor, their
        mask, and the id of each token's predecessor (ids -1 where not stored)."""
        G = rows.shape[1] // self.spec.num_kv_heads
        valid = rows >= 0
        r = np.where(valid, rows, 0)
        heads = (np.arange(rows.shape[1]) // G)[None, :, None]
        out = {
            "keys": np.asarray(self.keys[r, heads]) if self.num_chunks else None,
            "values": np.asarray(self.values[r, heads]) if self.num_chunks else None,
            "positions": np.where(valid, self.positions[r] if self.num_chunks else 0, -1),
            "valid": valid,
        }
        if with_next and self.num_chunks:
            following = np.minimum(r + 1, self.num_chunks - 1)
            first_next = np.asarray(self.values[following, heads, :1])  # (n, Hq, k, 1, D)
            out["next_values"] = np.concatenate([out["values"][..., 1:, :], first_next], axis=-2)
            joined = valid & self.next_joined[r]
            mask = np.repeat(valid[..., None], self.spec.chunk_size, axis=-1)
            mask[..., -1] = joined
            out["next_values"][~mask] = 0  # no successor: a defined zero, never another document's token
            out["next_mask"] = mask
            ids = self.token_ids[r]  # (n, Hq, k, c)
            first_prev = np.where(valid & self.prev_joined[r], self.token_ids[np.maximum(r - 1, 0), -1], -1)
            prev = np.concatenate([first_prev[..., None], ids[..., :-1]], axis=-1)
            prev[~valid] = -1
            out["prev_token_ids"] = prev
            nxt = np.concatenate([ids[..., 1:], self.token_ids[following][..., :1]], axis=-1)
            nxt[~mask] = -1
            out["next_token_ids"] = nxt
        return out


def shard_retrieval(shard: "MemoryShard", queries: torch.Tensor, k: int, with_next: bool = False,
                    slot_offset: int = 0) -> MemoryRetrieval:
    """One shard's top-k for queries (B, T, Hq, D), as a MemoryRetrieval (slots = offset + row)."""
    B, T, Hq, D = queries.shape
    c = shard.spec.chunk_size
    scores, rows = shard.search(queries.detach().float().cpu().numpy().reshape(B * T, Hq, D), k)
    got = shard.gather(rows, with_next)
    kk = rows.shape[-1]
    hit = np.isfinite(scores)

    def to(x, dtype=None):  # (B*T, Hq, ...) -> (B, Hq, T, ...)
        t = torch.from_numpy(np.ascontiguousarray(x)).reshape(B, T, *x.shape[1:]).transpose(1, 2)
        return t.to(device=queries.device, dtype=dtype or t.dtype)

    def tokens(x, dtype):  # (B*T, Hq, k, c, D) -> (B, Hq, T, k*c, D)
        if x is None:
            x = np.zeros((B * T, Hq, kk, c, D), np.float32)
        return to(x, dtype).reshape(B, Hq, T, kk * c, D)

    def token_ids_or_unknown(name):  # (B*T, Hq, k, c) ids -> (B, Hq, T, k*c), -1 when the shard is empty
        if name not in got:
            return torch.full((B, Hq, T, kk * c), -1, dtype=torch.long, device=queries.device)
        return to(got[name].astype(np.int64)).reshape(B, Hq, T, kk * c)

    dtype = queries.dtype
    if shard.num_chunks:
        ids = np.where(hit[..., None], shard.token_ids[np.where(rows >= 0, rows, 0)], -1)
    else:
        ids = np.full((*rows.shape, c), -1, np.int64)
    return MemoryRetrieval(
        keys=tokens(got["keys"], dtype),
        values=tokens(got["values"], dtype),
        token_mask=to(np.repeat(hit, c, axis=-1)),
        scores=to(scores),
        slots=to(np.where(hit, rows + slot_offset, -1)),
        positions=to(got["positions"]),
        streams=torch.zeros(B, dtype=torch.long),
        queries=queries.transpose(1, 2),
        next_values=tokens(got.get("next_values"), dtype) if with_next else None,
        next_mask=(to(got["next_mask"]).reshape(B, Hq, T, kk * c) if "next_mask" in got
                   else torch.zeros(B, Hq, T, kk * c, dtype=torch.bool)) if with_next else None,
        token_ids=to(ids.astype(np.int64)),
        prev_token_ids=token_ids_or_unknown("prev_token_ids") if with_next else None,
        next_token_ids=token_ids_or_unknown("next_token_ids") if with_next else None,
    )


def _to_device(index, device: str):
    if not str(device).startswith("cuda"):
        return index
    import faiss

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

    @classmethod
    def open(cls, directory: str | Path, verify: bool = False, nprobe: int = 32, shards: list[int] | None = None,
             device: str = "cpu") -> "MemoryStore":
        """Open a built memory. `verify` checks every file's sha256; `shards` opens only those."""
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

    def check_model(self, config, num_kv_heads: int, head_dim: int) -> None:
        """Refuse a model whose backbone, memory layer or chunking differ from the memory's."""
        model_spec = MemorySpec.from_config(config, num_kv_heads, head_dim)
        self.spec.require_compatible(model_spec, f"memory {self.directory}")

    def search(self, queries: torch.Tensor, k: int, streams=None, with_next: bool = False) -> MemoryRetrieval:
        """queries (B, T, Hq, D) -> the top-k chunks over all shards, as a MemoryRetrieval.

        The store is shared by every stream, so `streams` is accepted and ignored. `slots` are
        global chunk numbers (shard offset + row)."""
        if queries.dim() != 4 or queries.shape[-1] != self.spec.head_dim:
            raise StoreError(f"queries must have shape (B, T, Hq, {self.spec.head_dim}), got {tuple(queries.shape)}")
        parts, offset = [], 0
        for shard in self.shards:
            parts.append(shard_retrieval(shard, queries, k, with_next, offset))
            offset += shard.num_chunks
        return merge_retrievals(parts, k)

    # The attributes a LongMem model checks before reading a memory.
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


class CombinedMemory:
    """A session bank (writable, per stream) read together with built memories (read-only, shared).

    What leaves the local window is written to the bank; a search returns the top-k over all of
    them by score, so a model reads its own past and a corpus memory in one softmax."""

    def __init__(self, bank=None, stores: list | None = None):
        self.bank, self.stores = bank, list(stores or [])
        parts = ([bank] if bank is not None else []) + self.stores
        if not parts:
            raise StoreError("CombinedMemory needs a bank or at least one built memory")
        shapes = {(p.num_kv_heads, p.head_dim, p.chunk_size) for p in parts}
        if len(shapes) > 1:
            raise StoreError(f"memories of different shapes (kv_heads, head_dim, chunk_size) cannot be combined: {shapes}")
        self.num_kv_heads, self.head_dim, self.chunk_size = shapes.pop()
        self.device = bank.device if bank is not None else torch.device("cpu")
        self.read_only = bank is None

    def add(self, *args, **kwargs) -> None:
        if self.bank is not None:
            self.bank.add(*args, **kwargs)

    def search(self, queries: torch.Tensor, k: int, streams=None, with_next: bool = False) -> MemoryRetrieval:
        parts = [] if self.bank is None else [self.bank.search(queries, k, streams, with_next=with_next)]
        parts += [store.search(queries, k, streams, with_next=with_next) for store in self.stores]
        return merge_retrievals(parts, k)
