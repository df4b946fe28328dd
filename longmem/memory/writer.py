"""Writing the on-disk memory format (memory/store.py describes it): plans, shards, manifest.

A memory is one sequence of windows (every document's windows, documents in id order) cut into
shards by token ranges, so a long document spreads over several shards. A shard is written as a
stream: its windows arrive in order, their keys and values go straight to the files, and its
indexes are built from those files in blocks, so the RAM a shard takes to write does not grow with
its size. Files first, each shard's shard.json after its files, the manifest last and atomically:
a reader never sees a manifest that names a half-written shard. No Ray here;
pipelines/build_memory.py runs these steps as Ray tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .base import MemorySpec, StoreError, import_faiss
from .store import (_NP_DTYPES, FORMAT_VERSION, INDEX_KINDS, MANIFEST, SHARD_META, read_npy_rows, sha256_file)

# Below this many chunks a shard's index is exact; above it, IVF (`index="auto"`, the default).
# Exact search costs grow with the shard, IVF's with its square root (docs/results.md).
AUTO_IVF_CHUNKS = 262_144
MAX_IVF_LISTS = 16_384  # caps the quantizer's cost
# k-means trains on 40 vectors a list, at most TRAIN_SAMPLE in all: the sample is what a shard's
# writer holds, so it must not grow with the shard (above 6,554 lists a list gets fewer than 40).
TRAIN_PER_LIST = 40
TRAIN_SAMPLE = 262_144
KMEANS_ITERATIONS = 10
# An IVF shard is probed with the fewest lists that keep this recall@64 against exact search,
# measured on the shard's own keys when it is written (the serving default; an explicit nprobe wins).
TARGET_RECALL = 0.95
IVF_CODES = "float16"  # what an IVF list stores of each vector (recorded in shard.json as "codes")
NPROBE_STEPS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
BLOCK_ROWS = 65_536  # rows read, converted and indexed at a time while a shard is finished


# ------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Piece:
    """One encoding window of a document: tokens [start, start + length)."""

    doc_id: str
    start: int
    length: int

    def chunks(self, chunk_size: int) -> int:
        return self.length // chunk_size  # only a document's last window can leave a partial chunk


def document_windows(doc_id: str, num_tokens: int, window: int) -> list[Piece]:
    return [Piece(doc_id, s, min(window, num_tokens - s)) for s in range(0, num_tokens, window)]


def plan_shards(docs: list[tuple[str, int]], window: int, shards: int | None = None,
                shard_tokens: int | None = None) -> list[list[Piece]]:
    """Documents (doc_id, tokens) -> shards of consecutive windows with balanced token counts.

    Documents are laid out in id order and cut at window boundaries, so a document may span
    shards. `shards` fixes the count; otherwise it is ceil(tokens / shard_tokens). Deterministic:
    the same documents give the same plan. More shards than windows leaves the extra ones empty."""
    pieces = [p for doc_id, n in sorted(docs) for p in document_windows(doc_id, n, window)]
    total = sum(p.length for p in pieces)
    if shards is None:
        if not shard_tokens or shard_tokens < 1:
            raise StoreError("give a shard count or a positive target shard size in tokens")
        shards = max(1, math.ceil(total / shard_tokens))
    if shards < 1:
        raise StoreError(f"shards must be >= 1, got {shards}")
    out: list[list[Piece]] = [[] for _ in range(shards)]
    done, i = 0, 0
    for p in pieces:
        # the first shard whose share of the tokens this window's middle falls in
        i = max(i, min(shards - 1, int((done + p.length / 2) * shards // max(1, total))))
        out[i].append(p)
        done += p.length
    return out


def plan_digest(pieces: list[Piece], keys: list[str], spec: MemorySpec, index_kind: str) -> str:
    """What a shard holds (its windows' content keys), for which model and index: a finished shard
    is reused only when this matches."""
    blob = json.dumps([asdict(spec), index_kind, [[p.doc_id, p.start, p.length] for p in pieces], keys])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def shard_name(i: int, digest: str) -> str:
    """Shard folders are named by content, so a rebuild that changes a shard writes a new folder
    and the one an older manifest names stays readable until it is collected."""
    return f"shard-{i:05d}-{digest[:10]}"


# ---------------------------------------------------------------------------------- .npy streams
class NpyWriter:
    """A .npy file written front to back in pieces: the header first (its shape is known), then
    rows as they come. Plain writes, not a memory map, so written pages never count as the
    writer's memory."""

    def __init__(self, path: Path, shape: tuple, dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.f = open(self.path, "wb")
        np.lib.format.write_array_header_2_0(self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": self.shape})
        self.rows = 0

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise StoreError(f"{self.path.name}: rows {rows.shape} do not fit {self.shape} at row {self.rows}")
        self.f.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        if self.rows != self.shape[0]:
            self.f.close()
            raise StoreError(f"{self.path.name}: {self.rows} rows written, {self.shape[0]} expected")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


# ----------------------------------------------------------------------------------------- indexes
def _ivf_lists(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // TRAIN_PER_LIST, MAX_IVF_LISTS))


def index_kind_for(kind: str, n: int, head_dim: int) -> str:
    """The index a shard of n chunks gets when `kind` is asked for: `auto` is exact below
    AUTO_IVF_CHUNKS and IVF above; IVF needs >= 39 vectors a list and PQ >= 9,984 training vectors,
    so smaller shards fall back."""
    if kind not in INDEX_KINDS:
        raise StoreError(f"index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if kind == "auto":
        kind = "ivf" if n >= AUTO_IVF_CHUNKS else "flat"
    if kind == "ivfpq" and (n < 39 * 256 or head_dim % 8):
        kind = "ivf"
    if kind == "ivf" and n < 2 * 39:
        kind = "flat"
    return kind


def _empty_ivf(kind: str, d: int, n: int, seed: int = 0):
    faiss = import_faiss()
    quantizer = faiss.IndexFlatIP(d)
    nlist = _ivf_lists(n)
    if kind == "ivf":
        # Lists hold float16 codes: the keys are stored in 16 bits, so float32 lists would only
        # double what a probe reads; a shard rescores its hits from the stored keys (MemoryShard).
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT, False)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, d // 4, 8, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = seed  # deterministic training: a rebuilt shard is byte-identical
    index.cp.seed = seed
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.min_points_per_centroid = 16  # the sample is capped (TRAIN_SAMPLE)
    index.own_fields = True
    quantizer.this.disown()
    return index


def build_index(vectors: np.ndarray, kind: str, seed: int = 0):
    """An in-memory faiss inner-product index over (N, D) float32 vectors (small sets: tests, probes).
    Returns (index, kind actually built). Shards are indexed by `write_head_index`."""
    faiss = import_faiss()

    n, d = vectors.shape
    kind = index_kind_for(kind, n, d)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        index = _empty_ivf(kind, d, n, seed)
        index.train(vectors)
    index.add(vectors)
    return index, kind


def _training_sample(path: Path, n: int, size: int) -> np.ndarray:
    """Every (n // size)-th row of a (n, D) .npy file: deterministic, and read a block (or, when
    the rows are far apart, a row) at a time, so memory is the sample's, never the file's."""
    step = max(1, n // size)
    wanted = np.arange(0, n, step)[:size]
    out = np.empty((len(wanted), *np.load(path, mmap_mode="r").shape[1:]), np.float32)
    if step > 64:  # far apart: read the rows themselves
        for i, r in enumerate(wanted):
            out[i] = read_npy_rows(path, r, r + 1)[0]
        return out
    filled = 0
    for a in range(0, n, BLOCK_ROWS):
        rows = wanted[(wanted >= a) & (wanted < a + BLOCK_ROWS)]
        if len(rows):
            out[filled : filled + len(rows)] = read_npy_rows(path, a, min(n, a + BLOCK_ROWS))[rows - a]
            filled += len(rows)
    return out


def write_head_index(vectors_path: Path, directory: Path, h: int, kind: str, n: int, d: int) -> dict:
    """Index the (n, d) float32 vectors in `vectors_path` for KV head h, in bounded RAM.

    flat: the vectors are the index (`head-h.npy`, searched exactly and memory-mapped);
    ivf / ivfpq: trained on a strided sample, filled block by block, and merged into inverted
    lists on disk (`head-h.faiss` + `head-h.ivfdata`, memory-mapped when read); then the fewest
    probes that keep TARGET_RECALL are found on a sample of the shard's own keys. Returns what
    was measured ({} for flat)."""
    faiss = import_faiss()
    if kind == "flat":
        os.replace(vectors_path, directory / f"head-{h}.npy")
        return {}
    from faiss.contrib.ondisk import merge_ondisk

    trained = _empty_ivf(kind, d, n)
    trained.train(_training_sample(vectors_path, n, min(TRAIN_SAMPLE, TRAIN_PER_LIST * trained.nlist)))
    blocks = []
    for b, a in enumerate(range(0, n, 4 * BLOCK_ROWS)):
        part = faiss.clone_index(trained)
        rows = read_npy_rows(vectors_path, a, min(n, a + 4 * BLOCK_ROWS))
        part.add_with_ids(rows, np.arange(a, a + len(rows), dtype=np.int64))
        blocks.append(str(directory / f".head-{h}.block-{b}.faiss"))
        faiss.write_index(part, blocks[-1])
        del part, rows
    # merge_ondisk names the data file as given; stores read it with IO_FLAG_ONDISK_SAME_DIR
    cwd = os.getcwd()
    try:
        os.chdir(directory)
        merge_ondisk(trained, [os.path.basename(p) for p in blocks], f"head-{h}.ivfdata")
        faiss.write_index(trained, f"head-{h}.faiss")
    finally:
        os.chdir(cwd)
    for p in blocks:
        os.remove(p)
    measured = calibrate_nprobe(trained, vectors_path, n)
    del trained
    os.remove(vectors_path)
    return measured


def calibrate_nprobe(index, vectors_path: Path, n: int, queries: int = 256, k: int = 64) -> dict:
    """The fewest probes (of NPROBE_STEPS) whose recall@k against exact search reaches
    TARGET_RECALL, with a strided sample of the indexed vectors as queries (each query's own row
    left out of both lists)."""
    q = _training_sample(vectors_path, n, queries)
    rows_of_q = np.arange(0, n, max(1, n // queries))[: len(q)]
    best_s = np.full((len(q), k + 1), -np.inf, np.float32)
    best_r = np.full((len(q), k + 1), -1, np.int64)
    step = BLOCK_ROWS // 4
    for a in range(0, n, step):  # exact top-(k+1), a block at a time
        s = q @ read_npy_rows(vectors_path, a, min(n, a + step)).T  # (queries, block)
        kk = min(k + 1, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        s_all = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        r_all = np.concatenate([best_r, top + a], 1)
        keep = np.argpartition(-s_all, k, axis=1)[:, : k + 1]
        best_s, best_r = np.take_along_axis(s_all, keep, 1), np.take_along_axis(r_all, keep, 1)

    def recall(found: np.ndarray) -> float:
        hits = [len((set(e) - {r}) & (set(f) - {r})) / k for e, f, r in zip(best_r, found, rows_of_q)]
        return float(np.mean(hits))

    nprobe, got = NPROBE_STEPS[-1], 0.0
    for step in NPROBE_STEPS:
        index.nprobe = min(step, index.nlist)
        got = recall(index.search(q, k + 1)[1])
        if got >= TARGET_RECALL or step >= index.nlist:
            nprobe = min(step, index.nlist)
            break
    return {"nprobe": int(nprobe), f"recall@{k}": round(got, 4), "nlist": int(index.nlist)}


# ------------------------------------------------------------------------------------ one shard
class ShardWriter:
    """Writes one shard from its windows in order (`add`), then indexes it (`finish`).

    Chunks are cut exactly as a MemoryBank cuts one document's stream: the window's tokens in
    order, cut into chunks of `chunk_size`; a document's last partial chunk is dropped."""

    def __init__(self, directory: str | Path, spec: MemorySpec, num_chunks: int, index_kind: str = "auto"):
        import pyarrow as pa

        self.directory, self.spec, self.n = Path(directory), spec, int(num_chunks)
        self.requested = index_kind
        self.kind = index_kind_for(index_kind, self.n, spec.head_dim)
        if self.directory.exists():
            shutil.rmtree(self.directory)  # an unfinished attempt at the same content
        (self.directory / "index").mkdir(parents=True)
        c, H, D = spec.chunk_size, spec.num_kv_heads, spec.head_dim
        dtype = _NP_DTYPES[spec.dtype]
        self.keys = NpyWriter(self.directory / "keys.npy", (self.n, H, c, D), dtype)
        self.values = NpyWriter(self.directory / "values.npy", (self.n, H, c, D), dtype)
        self.heads = [NpyWriter(self.directory / "index" / f".head-{h}.vectors.npy", (self.n, D), np.float32)
                      for h in range(H)]
        self.table = {"doc_id": [], "position": [], "token_ids": []}
        self.schema = pa.schema([("doc_id", pa.string()), ("position", pa.int64()),
                                 ("token_ids", pa.list_(pa.int32(), c))])
        import pyarrow.parquet as pq

        self.parquet = pq.ParquetWriter(self.directory / "chunks.parquet", self.schema)
        self.documents: set[str] = set()

    def add(self, doc_id: str, keys: np.ndarray, values: np.ndarray, token_ids: np.ndarray, positions: np.ndarray):
        """One window's tokens: keys/values (N, Hkv, D), token_ids, positions (N,)."""
        c = self.spec.chunk_size
        n = keys.shape[0] // c
        if n == 0:
            return
        k = keys[: n * c].reshape(n, c, *keys.shape[1:]).transpose(0, 2, 1, 3)  # (n, Hkv, c, D)
        v = values[: n * c].reshape(n, c, *values.shape[1:]).transpose(0, 2, 1, 3)
        self.keys.write(k)
        self.values.write(v)
        chunk_keys = k.astype(np.float32).mean(axis=2)  # (n, Hkv, D)
        if self.spec.metric == "cosine":
            chunk_keys /= np.maximum(np.linalg.norm(chunk_keys, axis=-1, keepdims=True), 1e-12)
        for h, head in enumerate(self.heads):
            head.write(chunk_keys[:, h])
        self.table["doc_id"] += [doc_id] * n
        self.table["position"].append(np.asarray(positions[: n * c : c], np.int64))
        self.table["token_ids"].append(np.asarray(token_ids[: n * c], np.int32))
        self.documents.add(doc_id)
        if len(self.table["doc_id"]) >= BLOCK_ROWS:
            self._flush_table()

    def _flush_table(self, always: bool = False) -> None:
        """Write the buffered rows as one row group (`always`: even none, so an empty shard's
        table is readable)."""
        import pyarrow as pa

        if not self.table["doc_id"] and not always:
            return
        ids = np.concatenate(self.table["token_ids"]) if self.table["token_ids"] else np.zeros(0, np.int32)
        positions = np.concatenate(self.table["position"]) if self.table["position"] else np.zeros(0, np.int64)
        batch = pa.table({
            "doc_id": pa.array(self.table["doc_id"], pa.string()),
            "position": pa.array(positions, pa.int64()),
            "token_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids, pa.int32()), self.spec.chunk_size),
        }, schema=self.schema)
        self.parquet.write_table(batch)
        self.table = {"doc_id": [], "position": [], "token_ids": []}

    def finish(self, digest: str = "", edges: dict | None = None) -> dict:
        """Close the arrays, index every KV head, write shard.json last. `edges` holds what the
        next-token read needs across the shard's two ends (see `MemoryShard`): `prev_token_id`
        (the token before the first chunk, in the same document) and `next_token_id` with
        `next_values` (Hkv, D) (the token after the last chunk). Returns the shard's metadata."""
        self._flush_table(always=not self.keys.rows)
        self.parquet.close()
        for w in (self.keys, self.values, *self.heads):
            w.close()
        probes = [write_head_index(head.path, self.directory / "index", h, self.kind, self.n, self.spec.head_dim)
                  for h, head in enumerate(self.heads)]
        edges = dict(edges or {})
        meta_edges = {"prev_token_id": edges.get("prev_token_id"), "next_token_id": edges.get("next_token_id")}
        if edges.get("next_values") is not None:
            np.save(self.directory / "edges.npy", np.asarray(edges["next_values"], _NP_DTYPES[self.spec.dtype]))
        files = sorted(p.relative_to(self.directory).as_posix() for p in self.directory.rglob("*") if p.is_file())
        for f in files:  # on disk before shard.json says the shard is whole
            fsync_file(self.directory / f)
        meta = {
            "format_version": FORMAT_VERSION,
            "chunks": self.n,
            "tokens": self.n * self.spec.chunk_size,
            "documents": len(self.documents),
            "documents_digest": digest,
            "index": self.kind,
            "index_requested": self.requested,
            **({"codes": IVF_CODES} if self.kind == "ivf" else {}),
            "edges": meta_edges,
            # the probes a search uses by default, and the recall they kept on this shard's keys
            **({"nprobe": max(p["nprobe"] for p in probes), "nlist": probes[0]["nlist"],
                "recall@64": min(p["recall@64"] for p in probes)} if probes and probes[0] else {}),
            "files": {f: {"bytes": (self.directory / f).stat().st_size, "sha256": sha256_file(self.directory / f)}
                      for f in files},
        }
        _atomic_write_json(self.directory / SHARD_META, meta)
        return meta


def write_shard(directory: str | Path, spec: MemorySpec, windows: Iterable[dict], num_chunks: int,
                index_kind: str = "auto", digest: str = "", edges: dict | None = None) -> dict:
    """Write one shard from its windows in order: dicts of doc_id, keys, values (N, Hkv, D),
    token_ids, positions (N,). Returns the shard's metadata."""
    writer = ShardWriter(directory, spec, num_chunks, index_kind)
    for w in windows:
        writer.add(w["doc_id"], w["keys"], w["values"], w["token_ids"], w["positions"])
    return writer.finish(digest, edges)


def fsync_file(path: Path) -> None:
    """Flush a written file to the disk (a crash after its rename then leaves it whole)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_task_memory(tokens: int, spec: MemorySpec) -> int:
    """Bytes a shard-finishing task holds at its peak: a block of rows in flight (one encoded part,
    its chunks and chunk keys, an index block of 4 x BLOCK_ROWS vectors) and an IVF training sample,
    never the shard itself, with room for the rest: what the task asks Ray for."""
    per_token = 2 * spec.num_kv_heads * spec.chunk_size * spec.head_dim * 4
    rows = min(max(1, tokens // spec.chunk_size), 4 * BLOCK_ROWS)
    sample = min(max(1, tokens // spec.chunk_size), TRAIN_SAMPLE) * spec.head_dim * 4
    return 3 * rows * per_token + 4 * sample + (256 << 20)


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(directory: str | Path, spec: MemorySpec, shards: list[dict], build: dict,
                   generation: int = 1, documents: int | None = None) -> dict:
    """The manifest names every shard with its totals and checksums; written last, atomically
    (a reader holding the previous one keeps reading the shards it names). It holds no
    timestamps, so rebuilding the same corpus gives the same manifest."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "generation": generation,
        "spec": asdict(spec),
        "build": build,
        "shards": shards,
        "totals": {
            # a document spread over shards counts once
            "documents": documents if documents is not None else sum(s["documents"] for s in shards),
            "chunks": sum(s["chunks"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": sum(f["bytes"] for s in shards for f in s["files"].values()),
        },
    }
    _atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def collect_old_shards(directory: str | Path, keep: set[str]) -> list[str]:
    """Remove shard folders named by neither the current manifest nor the one before it (`keep`):
    a server that opened the previous generation keeps working until it reloads."""
    removed = []
    for p in sorted(Path(directory).glob("shard-*")):
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed
