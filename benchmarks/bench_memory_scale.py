"""Memory at scale: what a generated token costs, and what writing a shard holds, as memory grows.

    python benchmarks/bench_memory_scale.py [--sizes 65536 1048576 10485760] [--checkpoint DIR]

Memories (cached under <LongMem cache>/bench/scale/<model>/):
  * 65,536 tokens: real keys, the first 64k tokens of the Austen novels (Persuasion held out)
    encoded by the model's frozen backbone, built in process (`write_memory_dir`, index auto: exact).
  * larger sizes: SYNTHETIC keys and values with the real keys' statistics, written as the build's
    part files and finished by the build's own shard task (`pipelines.build_memory.finish_shard`,
    index auto: IVF): each synthetic token draws a token id by its frequency in the real memory and
    takes that id's mean real key plus Gaussian noise with the real keys' within-id covariance
    (per KV head), so keys cluster by token as real ones do.

Figures, one JSON line each, then a summary line:
  * build: the shard task's peak memory (anonymous RSS, sampled every 10 ms, and the kernel's peak
    RSS, which counts the file pages it maps) and seconds, per size; bytes per token on disk.
  * search: ms per generated token (one query token, every KV head, top retrieve_tokens, the
    next-token neighbours, as a decode step asks) and ms for a 512-token prompt, median of repeats,
    through `MemoryStore` (the search a model replica or a shard replica runs).
  * recall@k of the approximate index at its serving nprobe (the one the shard measured when it
    was written, for recall@64 >= 0.95 on its own keys) against exact search over the same
    stored keys, with fresh queries drawn like the memory.
  * generation: the model decoding with each memory: prompt latency and ms per generated token,
    medians of --generate-repeats rounds, each round one generation with every memory in turn
    (interleaved, so the machine's drift hits every size alike).
  * serving RAM: anonymous RSS a process adds when it opens the memory (the rest is page cache).
Ratios are against the 65,536-token memory measured in the same run.
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from common import AUSTEN, machine, timeit
from longmem.backbone import cache_dir
from longmem.loading import load_model
from longmem.memory import writer
from longmem.memory.encoder import MemoryEncoder, write_memory_dir
from longmem.memory.store import MemoryStore
from longmem.memory.writer import write_manifest

BASE = 65_536


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_anon_mb(pid: int | str = "self") -> tuple[float, float]:
    """(anonymous RSS, peak RSS) in MB of a process, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "VmHWM"):
                fields[name] = int(value.split()[0]) / 1024
    return fields.get("RssAnon", 0.0), fields.get("VmHWM", 0.0)


def real_memory(model, folder: Path) -> Path:
    if (folder / "manifest.json").exists():
        return folder
    tok = model.tokenizer
    ids, need = [], BASE
    for book in sorted(p for p in AUSTEN.glob("*.txt") if p.name != "persuasion.txt"):
        book_ids = np.asarray(tok(book.read_text(), add_special_tokens=False).input_ids, dtype=np.int64)
        ids.append((book.name, book_ids[:need]))
        need -= len(ids[-1][1])
        if need <= 0:
            break
    log(f"[scale] encoding {BASE:,} real tokens once (cached in {folder})")
    t0 = time.time()
    write_memory_dir(folder, MemoryEncoder(model), ids, shards=1)
    log(f"[scale] real memory built in {time.time() - t0:.0f} s")
    return folder


class TokenKeys:
    """Synthetic keys/values with the real memory's statistics, conditioned on token id."""

    def __init__(self, store: MemoryStore, seed: int = 0):
        shard = store.shards[0]
        ids = shard.token_ids[:, 0].astype(np.int64)
        keys = np.asarray(shard.keys[:, :, 0], np.float32)  # (N, H, D)
        values = np.asarray(shard.values[:, :, 0], np.float32)
        self.vocab, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        self.p = counts / counts.sum()
        self.dtype = shard.keys.dtype
        self.key_mean = self._means(keys, inverse, len(self.vocab))
        self.value_mean = self._means(values, inverse, len(self.vocab))
        self.key_chol = self._chol(keys - self.key_mean[inverse])
        self.value_chol = self._chol(values - self.value_mean[inverse])
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def _means(x, inverse, n):
        out = np.zeros((n, *x.shape[1:]), np.float64)
        np.add.at(out, inverse, x)
        return (out / np.bincount(inverse, minlength=n)[:, None, None]).astype(np.float32)

    @staticmethod
    def _chol(residual):  # (N, H, D) -> per head (H, D, D)
        H, D = residual.shape[1:]
        return np.stack([np.linalg.cholesky(np.cov(residual[:, h].T) + 1e-6 * np.eye(D)) for h in range(H)]
                        ).astype(np.float32)

    def draw(self, n: int):
        which = self.rng.choice(len(self.vocab), size=n, p=self.p)
        H, D = self.key_mean.shape[1:]
        noise = lambda chol: np.einsum("nhd,hed->nhe", self.rng.standard_normal((n, H, D), np.float32), chol)  # noqa: E731
        keys = self.key_mean[which] + noise(self.key_chol)
        values = self.value_mean[which] + noise(self.value_chol)
        return keys.astype(self.dtype), values.astype(self.dtype), self.vocab[which].astype(np.int32)


def synthetic_memory(spec, gen: TokenKeys, tokens: int, folder: Path, window: int) -> dict:
    """Write `tokens` synthetic tokens as the build's part files, then finish the shard with the
    build's task in a child process, sampling its memory. Returns the build figure."""
    from pipelines.build_memory import PARTS, write_part

    if (folder / "manifest.json").exists() and (folder / "build-figure.json").exists():
        return json.loads((folder / "build-figure.json").read_text())
    parts = folder / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    pieces, per_part = [], 64
    t0 = time.time()
    for p, start in enumerate(range(0, tokens, per_part * window)):
        encoded, keys = [], []
        for s in range(start, min(tokens, start + per_part * window), window):
            n = min(window, tokens - s)
            k, v, ids = gen.draw(n)
            encoded.append({"keys": k, "values": v, "token_ids": ids, "positions": np.arange(s, s + n, dtype=np.int64)})
            keys.append(f"w{s:012d}")
        name = f"part-{p:06d}.npz"
        write_part(parts / name, keys, encoded)
        offset = 0
        for e in encoded:
            pieces.append(("synthetic", (name, offset, len(e["token_ids"]))))
            offset += len(e["token_ids"])
        if p % 50 == 0:
            log(f"[scale] {tokens:,}: wrote {start + per_part * window:,} synthetic tokens of parts ({time.time() - t0:.0f} s)")
    job = folder / "finish-job.json"
    job.write_text(json.dumps({"out": str(folder), "pieces": pieces, "spec": spec.__dict__}))
    code = ("import json, sys; from pipelines.build_memory import finish_shard; j = json.load(open(sys.argv[1])); "
            "meta = finish_shard(j['out'], 'shard-00000', [(d, tuple(w)) for d, w in j['pieces']], j['spec'], 'auto', "
            "'synthetic', None, None); json.dump(meta, open(sys.argv[1] + '.meta', 'w'))")
    log(f"[scale] {tokens:,}: finishing the shard (the build's shard task, in a child process)")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", code, str(job)], cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    peak_anon, peak_total = 0.0, 0.0
    while proc.poll() is None:
        try:
            anon, hwm = rss_anon_mb(proc.pid)
            peak_anon, peak_total = max(peak_anon, anon), max(peak_total, hwm)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.01)
    if proc.wait() != 0:
        raise SystemExit(f"finishing the {tokens:,}-token shard failed")
    seconds = time.time() - t0
    meta = json.loads(Path(str(job) + ".meta").read_text())
    write_manifest(folder, spec, [{"name": "shard-00000", **meta}], {"synthetic": True, "index": "auto"})
    import shutil

    shutil.rmtree(parts)
    figure = {"figure": "build", "tokens": tokens, "synthetic": True, "index": meta["index"],
              "finish_seconds": round(seconds, 1), "peak_anon_rss_mb": round(peak_anon),
              "peak_rss_mb_incl_mapped_files": round(peak_total),
              "bytes_per_token": round(sum(f["bytes"] for f in meta["files"].values()) / tokens, 1)}
    (folder / "build-figure.json").write_text(json.dumps(figure))
    return figure


def median_ms(fn, repeats: int) -> float:
    return 1000 * timeit(fn, repeats=repeats)


def exact_topk(store: MemoryStore, q: np.ndarray, k: int) -> np.ndarray:
    """q (n, H, D) unit -> exact top-k rows per (query, head) over the stored keys, in blocks."""
    shard = store.shards[0]
    n, H, _ = q.shape
    best_s = np.full((n, H, k), -np.inf, np.float32)
    best_r = np.zeros((n, H, k), np.int64)
    for a in range(0, shard.num_chunks, 1 << 20):
        keys = np.asarray(shard.keys[a : a + (1 << 20)], np.float32).mean(axis=2)  # (b, H, D)
        keys /= np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
        for h in range(H):
            s = q[:, h] @ keys[:, h].T  # (n, b)
            s_all = np.concatenate([best_s[:, h], s], axis=1)
            r_all = np.concatenate([best_r[:, h], np.arange(a, a + s.shape[1])[None].repeat(n, 0)], axis=1)
            top = np.argpartition(-s_all, k, axis=1)[:, :k]
            best_s[:, h], best_r[:, h] = np.take_along_axis(s_all, top, 1), np.take_along_axis(r_all, top, 1)
    return best_r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[BASE, 1_048_576, 10_485_760])
    ap.add_argument("--checkpoint", help="a trained LongMem folder (default: a fresh model on the default backbone)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--recall-queries", type=int, default=200)
    ap.add_argument("--generate-repeats", type=int, default=5, help="rounds of model generations (median)")
    ap.add_argument("--nprobe", type=int, help="IVF probes (default: each shard's, measured when it was written)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(args.checkpoint) if args.checkpoint else load_model()
    spec = model.memory_spec
    tag = hashlib.sha1(json.dumps(spec.__dict__, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir() / "bench" / "scale" / tag
    base_dir = real_memory(model, root / f"real-{BASE}")
    # the large memories are rebuilt when the writer's index settings change
    layout = hashlib.sha1(json.dumps([writer.IVF_CODES, writer.NPROBE_STEPS, writer.MAX_IVF_LISTS, writer.TRAIN_SAMPLE,
                                      writer.TRAIN_PER_LIST]).encode()).hexdigest()[:8]
    gen = TokenKeys(MemoryStore.open(base_dir))
    memories = {BASE: base_dir}
    for size in sorted(s for s in args.sizes if s != BASE):
        memories[size] = root / f"synthetic-{size}-{layout}"
        fig = synthetic_memory(spec, gen, size, memories[size], model.config.memory.window)
        print(json.dumps(fig), flush=True)
    k = model.config.memory.retrieve_tokens // spec.chunk_size
    H, D = spec.num_kv_heads, spec.head_dim
    query_gen = TokenKeys(MemoryStore.open(base_dir), seed=1)
    step_q = [torch.as_tensor(query_gen.draw(1)[0].astype(np.float32))[None] for _ in range(args.repeats)]  # (1, 1, H, D)
    prompt_q = torch.as_tensor(query_gen.draw(args.prompt_tokens)[0].astype(np.float32))[None]
    ids = torch.as_tensor(np.asarray(model.tokenizer((AUSTEN / "persuasion.txt").read_text()[:20000],
                                                     add_special_tokens=False).input_ids[: args.prompt_tokens]))[None]
    results = {}
    for size, folder in sorted(memories.items()):
        before, _ = rss_anon_mb()
        store = MemoryStore.open(folder, nprobe=args.nprobe)
        opened, _ = rss_anon_mb()
        i = iter(range(10**9))
        step_ms = median_ms(lambda: store.search(step_q[next(i) % len(step_q)], k, with_next=True), args.repeats)
        prompt_ms = median_ms(lambda: store.search(prompt_q, k, with_next=True), max(3, args.repeats // 5))
        row = {"figure": "search", "tokens": store.num_chunks * spec.chunk_size, "synthetic": size != BASE,
               "index": store.shards[0].meta["index"],
               "nprobe": getattr(store.shards[0].indexes[0], "nprobe", None), "nlist": store.shards[0].meta.get("nlist"),
               "build_recall@64_own_keys": store.shards[0].meta.get("recall@64"),
               "ms_per_generated_token": round(step_ms, 2), "ms_per_prompt": round(prompt_ms, 1),
               "serving_anon_rss_mb": round(opened - before)}
        if store.shards[0].meta["index"] != "flat":
            q = query_gen.draw(args.recall_queries)[0].astype(np.float32)
            q /= np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
            exact = exact_topk(store, q, k)
            _, rows = store.shards[0].search(q, k)
            row[f"recall@{k}"] = round(float(np.mean([len(set(a) & set(b)) / k for a, b in
                                                      zip(rows.reshape(-1, k), exact.reshape(-1, k))])), 4)
        results[size] = row
        del store
    # the model decoding with every memory, interleaved round by round
    stores = {size: MemoryStore.open(folder, nprobe=args.nprobe) for size, folder in memories.items()}
    prompts = {size: [] for size in stores}
    decodes = {size: [] for size in stores}
    for store in stores.values():
        model.generate(ids[:, :64], store, max_new_tokens=2)  # opens every index and warms what it reads
    for _ in range(args.generate_repeats):
        for size, store in sorted(stores.items()):
            t0 = time.perf_counter()
            model.generate(ids, store, max_new_tokens=1)
            prompts[size].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(ids, store, max_new_tokens=args.new_tokens + 1)
            decodes[size].append((time.perf_counter() - t0 - prompts[size][-1]) / args.new_tokens)
    del stores
    for size, row in sorted(results.items()):
        row.update(generate_prompt_ms=round(1000 * statistics.median(prompts[size])),
                   generate_ms_per_token=round(1000 * statistics.median(decodes[size]), 1))
        print(json.dumps(row), flush=True)
    base = results[BASE]
    summary = {"figure": "summary", "machine": machine(), "k": k}
    for size, row in results.items():
        if size == BASE:
            continue
        name = f"{size // 1_048_576}M" if size % 1_048_576 == 0 else str(size)
        summary[f"search_ms_per_token_{name}_over_64k"] = round(row["ms_per_generated_token"] / base["ms_per_generated_token"], 2)
        summary[f"search_prompt_{name}_over_64k"] = round(row["ms_per_prompt"] / base["ms_per_prompt"], 2)
        summary[f"generate_ms_per_token_{name}_over_64k"] = round(row["generate_ms_per_token"] / base["generate_ms_per_token"], 2)
        summary[f"generate_prompt_{name}_over_64k"] = round(row["generate_prompt_ms"] / base["generate_prompt_ms"], 2)
        if f"recall@{k}" in row:
            summary[f"recall@{k}_{name}"] = row[f"recall@{k}"]
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
