"""MemoryEncoder: the frozen backbone turned into a memory writer for whole corpora.

A document is cut into the model's windows (window w covers tokens [w*W, (w+1)*W)); each window is
run through the backbone up to the memory layer, and its first `sink_tokens` tokens once more after
their context (the tokens before the window, the model's prefix token at the document's start):
every token becomes a memory token, exactly as `LongMem.write_memory` fills a bank.

Windows are padded on the right to a length bucket that depends only on their own length, and a
batch is run one bucket at a time: the keys of a window are then bit-identical however windows are
batched (measured: CPU matmuls give the same rows for any batch size at a fixed length, but not
for different padded lengths), so a rebuilt memory is byte-identical.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import MemorySpec
from .writer import plan_digest, plan_shards, shard_name, write_manifest, write_shard

PAD_BUCKET = 128


class MemoryEncoder:
    """Encodes windows with a model's frozen backbone (load it with longmem.loading.load_model: a
    trained checkpoint's key centre then goes into the keys, as its bank would store them)."""

    def __init__(self, model):
        self.model = model.eval()
        self.adapter = model.adapter
        self.config = model.config.memory
        self.memory_layer = model.memory_layer
        self.device = model.device
        self.spec: MemorySpec = model.memory_spec

    def windows(self, num_tokens: int) -> list[int]:
        """Start positions of the windows that cover a document of num_tokens tokens."""
        W = self.config.window
        return list(range(0, num_tokens, W))

    @torch.no_grad()
    def encode(self, windows: list[np.ndarray], starts: list[int], befores: list[np.ndarray]) -> list[dict]:
        """Token windows (each <= window long) at document positions `starts`, each with the tokens
        before it in its document (`befores`, empty at the start) -> per window a dict of keys,
        values (n, Hkv, D) float16/32 numpy, token_ids (n,), positions (n,)."""
        W, sink = self.config.window, self.config.sink_tokens
        out: list[dict | None] = [None] * len(windows)
        buckets: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            if not 0 < len(w) <= W:
                raise ValueError(f"window {i} has {len(w)} tokens; windows hold 1..{W}")
            buckets.setdefault(min(W, -(-len(w) // PAD_BUCKET) * PAD_BUCKET), []).append(i)
        first_k, first_v = self._first_tokens(windows, befores)
        dtype = np.float16 if self.spec.dtype == "float16" else np.float32
        for length, members in sorted(buckets.items()):
            ids = torch.zeros(len(members), length, dtype=torch.long)
            for row, i in enumerate(members):
                ids[row, : len(windows[i])] = torch.as_tensor(np.asarray(windows[i], dtype=np.int64))
            states = self.adapter.run(ids.to(self.device), [], self.memory_layer, stop_after_memory=True)
            keys = states.memory_keys.float().cpu().numpy()  # (b, length, Hkv, D)
            values = states.memory_values.float().cpu().numpy()
            for row, i in enumerate(members):
                n, m = len(windows[i]), min(sink, len(windows[i]))
                keys[row, :m], values[row, :m] = first_k[i, :m], first_v[i, :m]
                out[i] = {
                    "keys": keys[row, :n].astype(dtype),
                    "values": values[row, :n].astype(dtype),
                    "token_ids": np.asarray(windows[i], dtype=np.int32),
                    "positions": np.arange(starts[i], starts[i] + n, dtype=np.int64),
                }
        return out

    def _first_tokens(self, windows, befores) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values (N, sink, Hkv, D) of every window's first sink tokens after its context,
        in one pass (rows padded on the right; a row's own tokens come first, so padding is never read)."""
        sink = self.config.sink_tokens
        if sink == 0:
            return np.zeros((len(windows), 0)), np.zeros((len(windows), 0))
        ids = torch.zeros(len(windows), 2 * sink, dtype=torch.long)
        for i, (w, before) in enumerate(zip(windows, befores)):
            first = np.asarray(w, dtype=np.int64)[:sink]
            before = torch.as_tensor(np.asarray(before, dtype=np.int64)).reshape(1, -1)
            context = self.model.memory_context(before, before.shape[1])[0]  # the model's own rule
            ids[i, : sink + len(first)] = torch.cat([context, torch.as_tensor(first)])
        states = self.adapter.run(ids.to(self.device), [], self.memory_layer, stop_after_memory=True)
        return (states.memory_keys[:, sink:].float().cpu().numpy(), states.memory_values[:, sink:].float().cpu().numpy())


def write_memory_dir(out, encoder: MemoryEncoder, documents: list[tuple[str, np.ndarray]], shards: int | None = 1,
                     index: str = "auto", batch_size: int = 8, shard_tokens: int | None = None) -> dict:
    """Build a memory folder in this process (no Ray): the same plan, chunks and format as
    build-memory. For small memories and tests; corpora go through `pipelines.build_memory`."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    W, sink, c = encoder.config.window, encoder.config.sink_tokens, encoder.spec.chunk_size
    tokens = {doc_id: np.asarray(ids, dtype=np.int64).reshape(-1) for doc_id, ids in documents}
    docs = [(d, len(t)) for d, t in tokens.items() if len(t) >= c]
    plan = plan_shards(docs, W, shards, shard_tokens)
    encoded: dict[tuple[str, int], dict] = {}
    for doc_id, n in sorted(docs):
        starts = list(range(0, n, W))
        for b in range(0, len(starts), batch_size):
            chunk = starts[b : b + batch_size]
            parts = encoder.encode([tokens[doc_id][s : s + W] for s in chunk], chunk,
                                   [tokens[doc_id][max(0, s - sink) : s] for s in chunk])
            for s, part in zip(chunk, parts):
                encoded[(doc_id, s)] = {"doc_id": doc_id, **part}
    metas = []
    for i, pieces in enumerate(plan):
        keys = [f"{p.doc_id}:{p.start}" for p in pieces]
        digest = plan_digest(pieces, keys, encoder.spec, index)
        edges = {}
        if pieces and pieces[0].start > 0:
            edges["prev_token_id"] = int(tokens[pieces[0].doc_id][pieces[0].start - 1])
        if pieces and (pieces[-1].doc_id, pieces[-1].start + W) in encoded:
            after = encoded[(pieces[-1].doc_id, pieces[-1].start + W)]
            edges.update(next_token_id=int(after["token_ids"][0]), next_values=after["values"][0])
        name = shard_name(i, digest)
        meta = write_shard(out / name, encoder.spec, (encoded[(p.doc_id, p.start)] for p in pieces),
                           sum(p.chunks(c) for p in pieces), index, digest, edges)
        metas.append({"name": name, **meta})
    return write_manifest(out, encoder.spec, metas, {"shards": len(plan), "index": index}, documents=len(docs))
