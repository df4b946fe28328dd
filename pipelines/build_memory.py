"""Build a persistent, sharded memory from corpora with Ray Data.

    corpus files --Ray Data readers--> documents --Tokenize (batched, tasks)--> token arrays
      -> one sequence of windows (documents in id order), cut into shards by token ranges
      -> windows (doc_id, start, tokens) --EncodeWindows (actor pool, frozen backbone)--> keys/values
      -> part files written by the actors (one per actor batch) --> per shard, streamed in window
         order: chunks + an index per KV head (Ray tasks, bounded memory)
      -> manifest.json, last and atomically; shard folders no manifest names are collected

Resumable at two grains: a finished shard (its folder is named by what it holds) is reused, and
every window whose part file exists is not encoded again (parts are written to a temp name and
renamed; a window's key is a digest of the model's memory spec, its document's tokens and its
start). A killed build never leaves a manifest that names a half-written shard, and encoding is
batch-invariant, so a resumed build gives the same manifest as an uninterrupted one. A rebuild
(other corpus, shard count or index) writes new shard folders, swaps the manifest and keeps the
previous generation's folders, so a server that opened the old manifest keeps reading until it
reloads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from longmem.backbone import resolve_backbone
from longmem.loading import ModelSource
from longmem.memory import MemorySpec, StoreError
from longmem.memory.store import FORMAT_VERSION, INDEX_KINDS, MANIFEST, read_shard_meta, shard_files_intact
from longmem.memory.writer import (Piece, ShardWriter, collect_old_shards, plan_digest, plan_shards, shard_name,
                                   shard_task_memory, write_manifest)

BUILD_STATE = "build.json"
PARTS = ".parts"
DEFAULT_SHARD_TOKENS = 4_194_304


@dataclass
class BuildJob:
    corpus: list[str]
    out: str
    # The model whose keys memory holds: a trained checkpoint (its key centre and memory settings),
    # or a fresh model on a backbone.
    model: ModelSource | dict = field(default_factory=ModelSource)
    shards: int | None = None  # None: as many as shard_tokens asks for
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # target tokens per shard (documents may span shards)
    index: str = "auto"  # exact below writer.AUTO_IVF_CHUNKS chunks a shard, IVF above
    min_actors: int = 1
    max_actors: int = 1
    batch_size: int = 8  # windows per encoder call
    part_windows: int = 64  # windows per actor task, and per part file
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    text_field: str = "text"
    max_doc_tokens: int | None = 50_000_000  # longer documents are skipped (counted), not truncated

    def __post_init__(self):
        self.model = ModelSource.from_dict(self.model)

    def validate(self) -> "BuildJob":
        if not self.corpus:
            raise StoreError("give at least one corpus path")
        if self.shards is not None and self.shards < 1:
            raise StoreError(f"shards must be >= 1, got {self.shards}")
        if self.shard_tokens < 1:
            raise StoreError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
        if self.index not in INDEX_KINDS:
            raise StoreError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
        if not 1 <= self.min_actors <= self.max_actors:
            raise StoreError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}..{self.max_actors}")
        if self.batch_size < 1 or self.part_windows < 1:
            raise StoreError(f"batch_size and part_windows must be >= 1, got {self.batch_size}, {self.part_windows}")
        self.model.validate()
        return self


def window_key(spec_digest: str, doc_digest: str, start: int) -> str:
    """A window's identity: the model's memory spec, its document's tokens, its start."""
    return hashlib.sha1(f"{spec_digest}:{doc_digest}:{start}".encode()).hexdigest()[:24]


def spec_digest(spec: MemorySpec) -> str:
    return hashlib.sha1(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:16]


class EncodeWindows:
    """Actor: the frozen backbone as a memory encoder (one model per actor, loaded once). Each
    actor batch is encoded `batch_size` windows at a time and written as one part file here, in
    the actor: keys and values (~1 KB per token) never travel through the object store, and no
    extra tasks compete with the actors for CPUs."""

    def __init__(self, model: dict, out: str, num_threads: int, use_gpu: bool, batch_size: int):
        import torch

        from longmem.loading import load_source
        from longmem.memory.encoder import MemoryEncoder

        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.encoder = MemoryEncoder(load_source(model, device=device))
        self.out = Path(out)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        encoded = []
        for a in range(0, n, self.batch_size):
            encoded += self.encoder.encode(list(batch["tokens"][a : a + self.batch_size]),
                                           [int(s) for s in batch["start"][a : a + self.batch_size]],
                                           list(batch["before"][a : a + self.batch_size]))
        name = f"part-{batch['key'][0]}-{n}.npz"
        lengths = np.array([len(e["token_ids"]) for e in encoded], dtype=np.int64)
        write_part(self.out / PARTS / name, list(batch["key"]), encoded)
        return {"key": batch["key"], "part": np.array([name] * n, dtype=object),
                "offset": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
                "length": lengths, "rss_mb": np.full(n, _peak_rss_mb())}


def write_part(path: Path, keys: list[str], encoded: list[dict]) -> None:
    """Encoded windows -> one .npz part file, atomically (temp name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    arrays = {k: np.concatenate([e[k] for e in encoded]) for k in ("keys", "values", "token_ids", "positions")}
    with open(tmp, "wb") as f:
        np.savez(f, window_keys=np.array(keys, dtype="U24"),
                 lengths=np.array([len(e["token_ids"]) for e in encoded], dtype=np.int64), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def scan_parts(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Windows already encoded: key -> (part file, offset, length). A part that cannot be read is
    removed (its windows are encoded again)."""
    found: dict[str, tuple[str, int, int]] = {}
    for path in sorted(folder.glob("part-*.npz")) if folder.is_dir() else []:
        try:
            with np.load(path) as part:
                keys, lengths = part["window_keys"], part["lengths"]
        except Exception:  # noqa: BLE001 - a damaged part is re-encoded, never trusted
            path.unlink(missing_ok=True)
            continue
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for k, o, n in zip(keys, offsets, lengths):
            found[str(k)] = (path.name, int(o), int(n))
    return found


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _objects(arrays: list) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


@dataclass
class WindowsOf:
    """map_batches: documents -> the windows in `wanted` (doc_id -> starts) that have no part yet."""

    window: int
    wanted: dict
    spec_digest: str
    sink: int  # tokens before each window its encoder reads first (memory_context)

    def __call__(self, batch: dict) -> dict:
        rows = {"key": [], "start": [], "tokens": [], "before": []}
        for doc_id, digest, tokens, skip in zip(batch["doc_id"], batch["digest"], batch["tokens"], batch["skip"]):
            starts = self.wanted.get(doc_id)
            if skip or not starts:
                continue
            for start in starts:
                rows["key"].append(window_key(self.spec_digest, digest, start))
                rows["start"].append(start)
                rows["tokens"].append(np.asarray(tokens[start : start + self.window], dtype=np.int32))
                rows["before"].append(np.asarray(tokens[max(0, start - self.sink) : start], dtype=np.int32))
        return {"key": np.array(rows["key"], dtype=object), "start": np.array(rows["start"], dtype=np.int64),
                "tokens": _objects(rows["tokens"]), "before": _objects(rows["before"])}


class _Parts:
    """Reads windows back from part files, keeping the last part open (windows come in order)."""

    def __init__(self, folder: Path):
        self.folder, self.name, self.arrays = folder, None, None

    def window(self, where: tuple[str, int, int]) -> dict:
        name, offset, length = where
        if name != self.name:
            with np.load(self.folder / name) as part:
                self.arrays = {k: part[k] for k in ("keys", "values", "token_ids", "positions")}
            self.name = name
        return {k: v[offset : offset + length] for k, v in self.arrays.items()}


def finish_shard(out: str, name: str, pieces: list[tuple[str, tuple]], spec: dict, index: str, digest: str,
                 before: tuple | None, after: tuple | None) -> dict:
    """One shard's windows, in order ((doc_id, part location) each), streamed from their parts into
    chunks, arrays and indexes. `before`/`after`: the parts of the windows beside the shard in the
    same document (its edges for the next-token read), or None."""
    spec = MemorySpec.from_dict(spec)
    parts = _Parts(Path(out) / PARTS)
    num_chunks = sum(where[2] // spec.chunk_size for _, where in pieces)
    writer = ShardWriter(Path(out) / name, spec, num_chunks, index)
    for doc_id, where in pieces:
        w = parts.window(where)
        writer.add(doc_id, w["keys"], w["values"], w["token_ids"], w["positions"])
    edges = {}
    if before is not None:
        edges["prev_token_id"] = int(parts.window(before)["token_ids"][-1])
    if after is not None:
        w = parts.window(after)
        edges.update(next_token_id=int(w["token_ids"][0]), next_values=w["values"][0])
    return writer.finish(digest, edges)


def _check_out_dir(out: Path, state: dict) -> dict | None:
    """Refuse to build over something else: another model's memory, or a folder that is not a
    LongMem memory at all. Returns the memory's current manifest, if it has one."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise StoreError(f"{out} exists and is not a folder")
    for name in (MANIFEST, BUILD_STATE):
        path = out / name
        if path.exists():
            try:
                found = json.loads(path.read_text())
            except json.JSONDecodeError:
                raise StoreError(f"{path} is corrupt; remove {out} to rebuild") from None
            spec = MemorySpec.from_dict(found.get("spec", {})) if found.get("spec") else None
            if spec is None:
                raise StoreError(f"{path} has no memory spec; remove {out} to rebuild")
            spec.require_compatible(MemorySpec.from_dict(state["spec"]), f"{out}")
            return found if name == MANIFEST else None
    if any(out.iterdir()):
        raise StoreError(f"{out} is not empty and holds no LongMem memory; choose an empty or new folder")
    return None


def _encode_missing(ray, docs_ds, job: BuildJob, out: Path, wanted: dict, sdigest: str, config,
                    located: dict, progress) -> tuple[int, float, float]:
    """Encode the windows in `wanted` on the actor pool; their part locations go into `located`.
    Returns tokens encoded, seconds and the encoders' peak RSS."""
    from ray.data import ActorPoolStrategy

    # One block per actor batch (a streaming repartition): a long document becomes many actor
    # tasks, which is what lets the pool grow past one actor and keep every actor busy. The
    # windowing (fused with the repartition) runs as 1-CPU tasks, so it is finished
    # (materialised) before any encoder actor starts: otherwise actors that take every CPU of the
    # cluster wait forever on windows that can never be cut. Windows hold token ids only, about
    # the size of the tokenised corpus already held.
    # A small build still gets a few blocks per actor, so every actor has work; a large one gets
    # part_windows a block (few part files).
    total = sum(len(v) for v in wanted.values())
    per_block = max(1, min(job.part_windows, math.ceil(total / (4 * job.max_actors))))
    windows = docs_ds.map_batches(WindowsOf(config.window, wanted, sdigest, config.sink_tokens), batch_size=1
                                  ).repartition(target_num_rows_per_block=per_block).materialize()
    encoded = windows.map_batches(
        EncodeWindows,
        fn_constructor_kwargs={"model": job.model.to_dict(), "out": str(out),
                               "num_threads": math.ceil(job.num_cpus_per_actor),
                               "use_gpu": job.num_gpus_per_actor > 0, "batch_size": job.batch_size},
        compute=ActorPoolStrategy(min_size=job.min_actors, max_size=job.max_actors),
        batch_size=per_block,
        num_gpus=job.num_gpus_per_actor,
        num_cpus=job.num_cpus_per_actor,
    )
    tokens, peak_rss = 0, 0.0
    t0 = last = time.time()
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        for k, part, offset, length in zip(batch["key"], batch["part"], batch["offset"], batch["length"]):
            located[str(k)] = (str(part), int(offset), int(length))
        tokens += int(batch["length"].sum())
        peak_rss = max(peak_rss, float(batch["rss_mb"].max()))
        if time.time() - last > 30:
            last = time.time()
            progress(f"[build-memory] encoded {len(located):,} windows so far ({tokens / (last - t0):,.0f} tokens/s, "
                     f"{total:,} to encode this run)")
    return tokens, time.time() - t0, peak_rss


def build_memory(job: BuildJob, address: str | None = None, progress=print) -> dict:
    """Build (or finish building, or rebuild) the memory described by `job`; returns the summary."""
    job.validate()
    t0 = time.time()
    from longmem.loading import load_source

    model = load_source(job.model)  # fail fast (bad backbone, settings) before any cluster work
    spec, config, backbone = model.memory_spec, model.config.memory, model.config.backbone.name
    del model
    out = Path(job.out).expanduser().resolve()
    build_settings = {"shards": job.shards, "shard_tokens": job.shard_tokens, "index": job.index}
    state = {"format_version": FORMAT_VERSION, "spec": asdict(spec), "build": build_settings}
    previous = _check_out_dir(out, state)
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")

    from pipelines.corpus import Tokenize, read_documents
    from pipelines.ray_env import init_ray

    ray = init_ray(address)
    progress(f"[build-memory] reading and tokenising {len(job.corpus)} corpus path(s)")
    docs_ds = read_documents(job.corpus, job.text_field).map_batches(
        Tokenize(resolve_backbone(backbone), job.max_doc_tokens), batch_size=16
    ).materialize()
    meta = docs_ds.select_columns(["doc_id", "num_tokens", "skip", "digest"]).take_all()
    skipped = Counter(r["skip"] for r in meta if r["skip"])
    usable, digests = [], {}
    for r in meta:
        if r["skip"]:
            continue
        if r["num_tokens"] < config.chunk_size:  # memory holds whole chunks
            skipped["too short"] += 1
            continue
        if r["doc_id"] in digests:
            skipped["duplicate id"] += 1
            continue
        usable.append((r["doc_id"], int(r["num_tokens"])))
        digests[r["doc_id"]] = r["digest"]
    if not usable:
        raise StoreError(f"no usable documents in {', '.join(job.corpus)}; skipped: {dict(skipped) or 'none'}")
    lengths = dict(usable)
    plan = plan_shards(usable, config.window, job.shards, job.shard_tokens)
    sdigest = spec_digest(spec)
    key_of = lambda p: window_key(sdigest, digests[p.doc_id], p.start)  # noqa: E731
    shards = []
    for i, pieces in enumerate(plan):
        digest = plan_digest(pieces, [key_of(p) for p in pieces], spec, job.index)
        name = shard_name(i, digest)
        found = read_shard_meta(out / name)
        done = bool(found and found.get("documents_digest") == digest and shard_files_intact(out / name, found))
        # the windows beside the shard in its documents: its edges for the next-token read
        before = Piece(pieces[0].doc_id, pieces[0].start - config.window, config.window) \
            if pieces and pieces[0].start > 0 else None
        last = pieces[-1] if pieces else None
        after_start = last.start + config.window if last else 0
        after = Piece(last.doc_id, after_start, min(config.window, lengths[last.doc_id] - after_start)) \
            if last and after_start < lengths[last.doc_id] else None
        shards.append({"name": name, "digest": digest, "pieces": pieces, "meta": found if done else None,
                       "before": before, "after": after})
    pending = [s for s in shards if s["meta"] is None]
    total_tokens = sum(n for _, n in usable)
    progress(f"[build-memory] {len(usable)} documents, {total_tokens:,} tokens -> {len(plan)} shard(s); "
             f"{len(plan) - len(pending)} already built, {len(pending)} to build; skipped {dict(skipped) or 'none'}")

    encoded_tokens, encode_seconds, peak_rss = 0, 0.0, 0.0
    if pending:
        needed = {p for s in pending for p in [*s["pieces"], s["before"], s["after"]] if p is not None}
        located = scan_parts(out / PARTS)
        wanted: dict[str, list[int]] = {}
        for p in sorted(needed, key=lambda p: (p.doc_id, p.start)):
            if key_of(p) not in located:
                wanted.setdefault(p.doc_id, []).append(p.start)
        reused = len(needed) - sum(len(v) for v in wanted.values())
        progress(f"[build-memory] {sum(len(v) for v in wanted.values()):,} windows to encode"
                 f"{f', {reused:,} already encoded' if reused else ''}")
        if wanted:
            encoded_tokens, encode_seconds, peak_rss = _encode_missing(ray, docs_ds, job, out, wanted, sdigest,
                                                                       config, located, progress)
        del docs_ds
        progress(f"[build-memory] encoded {encoded_tokens:,} memory tokens in {encode_seconds:.1f} s; "
                 f"writing {len(pending)} shard(s) (index {job.index})")
        finish = ray.remote(num_cpus=1)(finish_shard)
        # Each shard task asks for the memory it peaks at (bounded: shards are written as streams),
        # never more than the cluster has (a larger ask would never be scheduled).
        limit = int(ray.cluster_resources().get("memory", 0)) or None
        refs = {}
        for s in pending:
            ask = shard_task_memory(sum(p.length for p in s["pieces"]), spec)
            where = lambda p: located[key_of(p)] if p is not None else None  # noqa: E731
            refs[s["name"]] = (s, finish.options(memory=min(ask, limit) if limit else ask).remote(
                str(out), s["name"], [(p.doc_id, where(p)) for p in s["pieces"]], asdict(spec), job.index,
                s["digest"], where(s["before"]), where(s["after"])))
        for name, (s, ref) in refs.items():
            s["meta"] = ray.get(ref)
            progress(f"[build-memory] {name}: {s['meta']['chunks']:,} chunks, index {s['meta']['index']}")
    old_names = {s["name"] for s in (previous or {}).get("shards", [])}
    names = [s["name"] for s in shards]
    generation = int((previous or {}).get("generation", 1))
    if previous is not None and set(names) != old_names:
        generation += 1
    build = {"shards": len(plan), "shard_tokens": job.shard_tokens, "index": job.index}
    manifest = write_manifest(out, spec, [{"name": s["name"], **s["meta"]} for s in shards], build,
                              generation=generation, documents=len(usable))
    (out / BUILD_STATE).unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    removed = collect_old_shards(out, set(names) | old_names)
    seconds = time.time() - t0
    summary = {
        "out": str(out),
        "generation": generation,
        "documents": len(usable),
        "skipped": dict(skipped),
        "tokens": total_tokens,
        "memory_tokens": manifest["totals"]["tokens"],
        "chunks": manifest["totals"]["chunks"],
        "shards": len(plan),
        "shards_reused": len(plan) - len(pending),
        "shards_collected": len(removed),
        "bytes": manifest["totals"]["bytes"],
        "bytes_per_token": manifest["totals"]["bytes"] / max(1, manifest["totals"]["tokens"]),
        "seconds": round(seconds, 2),
        "encode_tokens_per_s": round(encoded_tokens / encode_seconds, 1) if encode_seconds else None,
        "encoder_peak_rss_mb": round(peak_rss) if peak_rss else None,
    }
    progress(f"[build-memory] done: {json.dumps(summary)}")
    return summary
