"""Build a persistent, sharded memory from corpora with Ray Data.

    corpus files --read_binary_files--> documents --Tokenize (tasks)--> token arrays
      -> documents assigned to shards (balanced by tokens, deterministic)
      -> windows (doc_id, start, tokens) --EncodeWindows (actor pool, frozen backbone)--> keys/values
      -> window parts written by the actors --> per shard: chunks + faiss index per KV head (Ray tasks)
      -> manifest.json, last and atomically

Resumable at two grains: a finished shard (its shard.json matches the documents assigned to it)
is skipped, and inside an unfinished shard every window whose part file exists is skipped
(parts are written to a temp name and renamed). A killed build never leaves a manifest that names a
half-written shard, and encoding is batch-invariant, so a resumed build gives the same manifest
as an uninterrupted one.
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
from longmem.memory.writer import assign_shards, documents_digest, shard_task_memory, write_manifest, write_shard

BUILD_STATE = "build.json"
PARTS = ".parts"


@dataclass
class BuildJob:
    corpus: list[str]
    out: str
    # The model whose keys memory holds: a trained checkpoint (its key centre and memory settings),
    # or a fresh model on a backbone.
    model: ModelSource | dict = field(default_factory=ModelSource)
    shards: int = 1
    index: str = "flat"
    min_actors: int = 1
    max_actors: int = 1
    batch_size: int = 8  # windows per encoder call
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    text_field: str = "text"
    max_doc_tokens: int | None = 50_000_000  # longer documents are skipped (counted), not truncated

    def __post_init__(self):
        self.model = ModelSource.from_dict(self.model)

    def validate(self) -> "BuildJob":
        if not self.corpus:
            raise StoreError("give at least one corpus path")
        if self.shards < 1:
            raise StoreError(f"shards must be >= 1, got {self.shards}")
        if self.index not in INDEX_KINDS:
            raise StoreError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
        if not 1 <= self.min_actors <= self.max_actors:
            raise StoreError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}..{self.max_actors}")
        if self.batch_size < 1:
            raise StoreError(f"batch_size must be >= 1, got {self.batch_size}")
        self.model.validate()
        return self


def _doc_key(doc_id: str) -> str:
    return hashlib.sha1(doc_id.encode()).hexdigest()[:20]


def _part_path(out: Path, shard: int, doc_id: str, start: int) -> Path:
    return out / PARTS / f"shard-{shard:05d}" / f"{_doc_key(doc_id)}-{start:012d}.npz"


class EncodeWindows:
    """Actor: the frozen backbone as a memory encoder (one model per actor, loaded once). Each
    encoded window is written as its part file here, in the actor: keys and values (~1 KB per token)
    never travel through the object store, and no extra tasks compete with the actors for CPUs."""

    def __init__(self, model: dict, out: str, num_threads: int, use_gpu: bool):
        import torch

        from longmem.loading import load_source
        from longmem.memory.encoder import MemoryEncoder

        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.encoder = MemoryEncoder(load_source(model, device=device))
        self.out = Path(out)

    def __call__(self, batch: dict) -> dict:
        encoded = self.encoder.encode(list(batch["tokens"]), [int(s) for s in batch["start"]], list(batch["before"]))
        for doc_id, shard, start, part in zip(batch["doc_id"], batch["shard"], batch["start"], encoded):
            write_part(_part_path(self.out, int(shard), doc_id, int(start)), part)
        return {"shard": batch["shard"], "tokens": np.array([len(e["token_ids"]) for e in encoded], dtype=np.int64),
                "rss_mb": np.full(len(encoded), _peak_rss_mb())}


def write_part(path: Path, part: dict) -> None:
    """One encoded window -> its .npz part file, atomically (temp name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{k: part[k] for k in ("keys", "values", "token_ids", "positions")})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _objects(arrays: list) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


@dataclass
class WindowsOf:
    """map_batches: documents -> their windows that have no part file yet."""

    out: str
    window: int
    shard_of: dict
    sink: int  # tokens before each window its encoder reads first (memory_context)

    def __call__(self, batch: dict) -> dict:
        rows = {"doc_id": [], "shard": [], "start": [], "tokens": [], "before": []}
        for doc_id, tokens, skip in zip(batch["doc_id"], batch["tokens"], batch["skip"]):
            shard = self.shard_of.get(doc_id)
            if skip or shard is None:
                continue
            for start in range(0, len(tokens), self.window):
                if not _part_path(Path(self.out), shard, doc_id, start).exists():
                    rows["doc_id"].append(doc_id)
                    rows["shard"].append(shard)
                    rows["start"].append(start)
                    rows["tokens"].append(np.asarray(tokens[start : start + self.window], dtype=np.int32))
                    rows["before"].append(np.asarray(tokens[max(0, start - self.sink) : start], dtype=np.int32))
        return {"doc_id": _objects(rows["doc_id"]), "shard": np.array(rows["shard"], dtype=np.int64),
                "start": np.array(rows["start"], dtype=np.int64), "tokens": _objects(rows["tokens"]),
                "before": _objects(rows["before"])}


def finish_shard(out: str, shard: int, docs: list[tuple[str, int]], spec: dict, index: str, window: int) -> dict:
    """Parts of one shard's documents -> chunks, arrays and indexes; then its parts are removed."""
    out_path = Path(out)
    documents = []
    for doc_id, n in docs:
        parts = []
        for start in range(0, n, window):
            path = _part_path(out_path, shard, doc_id, start)
            if not path.exists():
                raise StoreError(f"shard {shard}: window {start} of {doc_id} was not encoded")
            with np.load(path) as part:
                parts.append({k: part[k] for k in ("keys", "values", "token_ids", "positions")})
        documents.append({"doc_id": doc_id, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}})
    meta = write_shard(out_path / f"shard-{shard:05d}", MemorySpec.from_dict(spec), documents, index,
                       documents_digest(docs))
    shutil.rmtree(out_path / PARTS / f"shard-{shard:05d}", ignore_errors=True)
    return meta


def _check_out_dir(out: Path, state: dict) -> None:
    """Refuse to build over something else: another model's memory, other build settings, or
    a folder that is not a LongMem memory at all."""
    if not out.exists():
        return
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
            old = found.get("build", found)
            for key in ("shards", "index"):
                if old.get(key) != state["build"][key]:
                    raise StoreError(
                        f"{out} was built with {key}={old.get(key)!r}, not {state['build'][key]!r}; "
                        "use another --out or remove it"
                    )
            return
    if any(out.iterdir()):
        raise StoreError(f"{out} is not empty and holds no LongMem memory; choose an empty or new folder")


def _windows_of(docs_ds, job: BuildJob, out: Path, plan, pending: list[int], window: int, sink: int):
    """The pending shards' windows that have no part file yet, materialised."""
    shard_of = {doc_id: i for i in pending for doc_id, _ in plan[i]}
    # One block per encoder batch (a streaming repartition): a long document becomes many actor
    # tasks, which is what lets the pool grow past one actor and keep every actor busy. The
    # windowing (fused with the repartition) runs as 1-CPU tasks, so it is finished
    # (materialised) before any encoder actor starts: otherwise actors that take every CPU of the
    # cluster wait forever on windows that can never be cut. Windows hold token ids only, about
    # the size of the tokenised corpus already held.
    return docs_ds.map_batches(WindowsOf(str(out), window, shard_of, sink), batch_size=1).repartition(
        target_num_rows_per_block=job.batch_size).materialize()


def _encode_pending(ray, windows, job: BuildJob, out: Path, plan, pending: list[int], finished: dict, spec: dict,
                    window: int, progress) -> tuple[int, float, float]:
    """Encode the windows on the actor pool and finish the pending shards (into `finished`);
    returns tokens encoded, seconds and the encoders' peak RSS."""
    from ray.data import ActorPoolStrategy

    encoded_tokens, peak_rss = 0, 0.0
    encoded = windows.map_batches(
        EncodeWindows,
        fn_constructor_kwargs={"model": job.model.to_dict(), "out": str(out),
                               "num_threads": math.ceil(job.num_cpus_per_actor),
                               "use_gpu": job.num_gpus_per_actor > 0},
        compute=ActorPoolStrategy(min_size=job.min_actors, max_size=job.max_actors),
        batch_size=job.batch_size,
        num_gpus=job.num_gpus_per_actor,
        num_cpus=job.num_cpus_per_actor,
    )
    t_encode = time.time()
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        encoded_tokens += int(batch["tokens"].sum())
        peak_rss = max(peak_rss, float(batch["rss_mb"].max()))
    encode_seconds = time.time() - t_encode
    progress(f"[build-memory] encoded {encoded_tokens:,} memory tokens in {encode_seconds:.1f} s; "
             f"building {len(pending)} shard index(es) ({job.index})")
    finish = ray.remote(num_cpus=1)(finish_shard)
    # Each shard task asks for the memory it peaks at, so Ray runs only as many side by side as
    # fit (never more than the cluster has: a larger ask would never be scheduled).
    limit = int(ray.cluster_resources().get("memory", 0)) or None
    memory_spec = MemorySpec.from_dict(spec)
    refs = {}
    for i in pending:
        ask = shard_task_memory(sum(n for _, n in plan[i]), memory_spec)
        refs[i] = finish.options(memory=min(ask, limit) if limit else ask).remote(
            str(out), i, plan[i], spec, job.index, window)
    for i, ref in refs.items():
        finished[i] = ray.get(ref)
        progress(f"[build-memory] shard {i}: {finished[i]['chunks']:,} chunks, index {finished[i]['index']}")
    return encoded_tokens, encode_seconds, peak_rss


def build_memory(job: BuildJob, address: str | None = None, progress=print) -> dict:
    """Build (or finish building) the memory described by `job`; returns the build summary."""
    job.validate()
    t0 = time.time()
    from longmem.loading import load_source

    model = load_source(job.model)  # fail fast (bad backbone, settings) before any cluster work
    spec, config, backbone = model.memory_spec, model.config.memory, model.config.backbone.name
    del model
    out = Path(job.out).expanduser().resolve()
    state = {"format_version": FORMAT_VERSION, "spec": asdict(spec),
             "build": {"shards": job.shards, "index": job.index}}
    _check_out_dir(out, state)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST).exists():
        (out / BUILD_STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")

    from pipelines.corpus import Tokenize, read_documents
    from pipelines.ray_env import init_ray

    ray = init_ray(address)
    progress(f"[build-memory] reading and tokenising {len(job.corpus)} corpus path(s)")
    docs_ds = read_documents(job.corpus, job.text_field).map_batches(
        Tokenize(resolve_backbone(backbone), job.max_doc_tokens), batch_size=4
    ).materialize()
    meta = docs_ds.select_columns(["doc_id", "num_tokens", "skip"]).take_all()
    skipped = Counter(r["skip"] for r in meta if r["skip"])
    minimum = config.chunk_size  # memory holds whole chunks
    usable = []
    for r in meta:
        if r["skip"]:
            continue
        if r["num_tokens"] < minimum:
            skipped["too short"] += 1
            continue
        usable.append((r["doc_id"], int(r["num_tokens"])))
    if not usable:
        raise StoreError(f"no usable documents in {', '.join(job.corpus)}; skipped: {dict(skipped) or 'none'}")
    plan = assign_shards(usable, job.shards)
    finished, pending = {}, []
    for i, docs in enumerate(plan):
        shard_dir = out / f"shard-{i:05d}"
        found = read_shard_meta(shard_dir)
        if found and found.get("documents_digest") == documents_digest(docs) and shard_files_intact(shard_dir, found):
            finished[i] = found
        else:
            pending.append(i)
    total_tokens = sum(n for _, n in usable)
    progress(f"[build-memory] {len(usable)} documents, {total_tokens:,} tokens -> {job.shards} shard(s); "
             f"{len(finished)} already built, {len(pending)} to build; skipped {dict(skipped) or 'none'}")

    encoded_tokens, encode_seconds, peak_rss = 0, 0.0, 0.0
    if pending:
        windows = _windows_of(docs_ds, job, out, plan, pending, config.window, config.sink_tokens)
        del docs_ds  # the windows hold what the encoders need
        encoded_tokens, encode_seconds, peak_rss = _encode_pending(ray, windows, job, out, plan, pending, finished,
                                                                   asdict(spec), config.window, progress)
    shards = [{"name": f"shard-{i:05d}", **finished[i]} for i in range(job.shards)]
    manifest = write_manifest(out, spec, shards, state["build"])
    (out / BUILD_STATE).unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    seconds = time.time() - t0
    summary = {
        "out": str(out),
        "documents": len(usable),
        "skipped": dict(skipped),
        "tokens": total_tokens,
        "memory_tokens": manifest["totals"]["tokens"],
        "chunks": manifest["totals"]["chunks"],
        "shards": job.shards,
        "shards_reused": len(plan) - len(pending),
        "bytes": manifest["totals"]["bytes"],
        "bytes_per_token": manifest["totals"]["bytes"] / max(1, manifest["totals"]["tokens"]),
        "seconds": round(seconds, 2),
        "encode_tokens_per_s": round(encoded_tokens / encode_seconds, 1) if encode_seconds else None,
        "encoder_peak_rss_mb": round(peak_rss) if peak_rss else None,
    }
    progress(f"[build-memory] done: {json.dumps(summary)}")
    return summary
