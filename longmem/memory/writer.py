"""Writing the on-disk memory format (memory/store.py describes it): chunks, shards, manifest.

Files first, each shard's shard.json after its files, the manifest last and atomically: a reader
never sees a manifest that names a half-written shard. No Ray here; pipelines/build_memory.py
runs these steps as Ray tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .base import MemorySpec, StoreError, import_faiss
from .store import _NP_DTYPES, FORMAT_VERSION, INDEX_KINDS, MANIFEST, SHARD_META, sha256_file


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


def documents_digest(docs: list[tuple[str, int]]) -> str:
    """A digest of (doc_id, num_tokens) pairs: a finished shard is reused only for the same documents."""
    return hashlib.sha256(json.dumps(docs).encode()).hexdigest()[:32]


def _ivf_lists(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list


def build_index(vectors: np.ndarray, kind: str, seed: int = 0):
    """A faiss inner-product index over (N, D) float32 vectors. Returns (index, kind actually built):
    IVF needs >= 39 vectors per list and PQ >= 9,984 training vectors; smaller shards fall back."""
    faiss = import_faiss()

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


def write_shard(directory: str | Path, spec: MemorySpec, documents: list[dict], index_kind: str = "flat",
                docs_digest: str = "") -> dict:
    """Write one shard from documents in order: dicts of doc_id, keys, values (N, Hkv, D),
    token_ids, positions (N,). Files first, shard.json last. Returns the shard's metadata."""
    faiss = import_faiss()
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
    for f in files:  # on disk before shard.json says the shard is whole
        fsync_file(directory / f)
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


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk (a crash after its rename then leaves it whole)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_task_memory(tokens: int, spec: MemorySpec) -> int:
    """Bytes a shard-finishing task holds at its peak for `tokens` tokens: the encoded parts (keys
    and values in float32), their concatenation, the stored copy in the memory's dtype and the
    float32 chunk keys, with room for the rest: what the task asks Ray for."""
    per_token = 2 * spec.num_kv_heads * spec.head_dim * 4
    return 4 * tokens * per_token + (256 << 20)


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


