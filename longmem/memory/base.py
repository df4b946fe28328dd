"""One contract for every memory: what a search returns, what a memory must do, what made it.

    class Memory(Protocol):
        add(keys, values, token_ids=None, streams=None, skip_first=0)   # (B, T, Hkv, D) each
        search(queries, k, streams=None, with_next=False) -> MemoryRetrieval  # (B, T, H, D)
        reset(streams=None)
        check_model(spec)          # refuse a model whose keys this memory cannot hold
        passage_tokens(stream=0)   # optional: the token ids held, in written order (passage recall)

Implemented by the in-process `MemoryBank` (per-stream ring buffers), the on-disk `MemoryStore`
(sharded, faiss), the serving layer's remote shards, and `CombinedMemory` (a bank read together
with built memories). Built memories are shared and read-only: `add` refuses, `reset` has nothing
of a stream's own to forget.

A search with H = Hkv heads (the backbone's key searching, shared by each group of query heads)
returns one result per KV head; the SideNet's read broadcasts it to the group's query heads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import numpy as np
import torch


class StoreError(ValueError):
    """A memory that cannot be used as asked (missing, damaged, or made for another model)."""


def import_faiss():
    """faiss, or a clear error: it comes from the `cpu` or the `gpu` extra (each provides the
    `faiss` module, so the project installs exactly one of them)."""
    try:
        import faiss
    except ImportError:
        raise StoreError("built memories need faiss: pip install 'longmem[cpu]' (or 'longmem[gpu]' on a CUDA "
                         "machine); `make setup` installs the cpu one") from None
    return faiss


@dataclass
class MemoryRetrieval:
    """Top-k chunks per query token and search head. H = search heads, k = chunks, c = chunk size."""

    keys: torch.Tensor  # (B, H, T, k * c, D)
    values: torch.Tensor  # (B, H, T, k * c, D)
    token_mask: torch.Tensor  # (B, H, T, k * c) True where a real memory token sits
    scores: torch.Tensor  # (B, H, T, k) query . chunk-key, -inf for empty slots
    slots: torch.Tensor  # (B, H, T, k) where each chunk is stored (ring slot, or global chunk number)
    positions: torch.Tensor  # (B, H, T, k) stream position of each chunk's first token, -1 if empty
    streams: torch.Tensor  # (B,) which stream each row searched
    queries: torch.Tensor | None = None  # (B, H, T, D) the vectors that searched, as given
    token_ids: torch.Tensor | None = None  # (B, H, T, k, c) token ids of each chunk, -1 if unknown
    # With search(..., with_next=True): for each retrieved token, the value and id of the token that
    # followed it in its stream, where that is known (False at a stream's newest token or a gap), and
    # the id of the token before it (-1 where not stored).
    next_values: torch.Tensor | None = None  # (B, H, T, k * c, D)
    next_mask: torch.Tensor | None = None  # (B, H, T, k * c)
    prev_token_ids: torch.Tensor | None = None  # (B, H, T, k * c)
    next_token_ids: torch.Tensor | None = None  # (B, H, T, k * c)
    query_prev_ids: torch.Tensor | None = None  # (B, T) the token before each query token, -1 unknown (set by the model)

    @property
    def has_memory(self) -> torch.Tensor:
        """(B, H, T) True where at least one chunk was retrieved."""
        return self.token_mask.any(dim=-1)

    @property
    def num_heads(self) -> int:
        return self.token_mask.shape[1]

    def to(self, device) -> "MemoryRetrieval":
        return type(self)(**{f.name: (v.to(device) if torch.is_tensor(v) else v)
                             for f in fields(self) for v in [getattr(self, f.name)]})


@dataclass(frozen=True)
class MemorySpec:
    """What produced a memory's keys; a model may read it only if its own spec matches.
    A bank knows only its shapes and metric (the fields left None are not compared)."""

    num_kv_heads: int
    head_dim: int
    chunk_size: int
    metric: str
    backbone: str | None = None
    backbone_fingerprint: str | None = None
    model_type: str | None = None
    memory_layer: int | None = None
    window: int | None = None
    sink_tokens: int | None = None
    dtype: str | None = None
    backbone_revision: str | None = None
    key_center: str | None = None  # digest of the key centre (None: raw keys)

    @classmethod
    def from_dict(cls, data: dict) -> "MemorySpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def differences(self, other: "MemorySpec", partial: bool = False) -> list[str]:
        """Fields that make two specs incompatible (the backbone's name may differ, its weights not).
        `partial`: compare only what both specs know (a bank's spec has no backbone)."""
        ignore = {"backbone", "backbone_revision"}
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in ignore or a == b or (partial and (a is None or b is None)):
                continue
            line = f"{f.name}: {a!r} vs {b!r}"
            if f.name == "backbone_fingerprint" and not all(str(x).startswith("v2-") for x in (a, b)):
                line += " (a memory built by an earlier version of LongMem: rebuild it)"
            out.append(line)
        return out

    def require_compatible(self, other: "MemorySpec", what: str, partial: bool = False) -> None:
        diff = self.differences(other, partial)
        if diff:
            raise StoreError(f"{what} was built for a different model: " + "; ".join(diff))


@runtime_checkable
class Memory(Protocol):
    num_kv_heads: int
    head_dim: int
    chunk_size: int
    read_only: bool  # built memories: searched, never written
    device: torch.device  # where a writable memory's tensors live (results follow the queries)

    def add(self, keys, values, token_ids=None, streams=None, skip_first: int = 0) -> None: ...

    def search(self, queries: torch.Tensor, k: int, streams=None, with_next: bool = False) -> MemoryRetrieval: ...

    def reset(self, streams=None) -> None: ...

    def check_model(self, spec: MemorySpec) -> None: ...


def neighbour_tokens(values, token_ids, hit, next_first_values, next_first_ids, next_joined, prev_last_ids, prev_joined):
    """The tokens around every retrieved token, for the next-token read and the two-token match.

    Tokens of a chunk are consecutive; a chunk's last token is followed by the first token of the
    chunk stored after it when that one continues the same stream (`next_joined`), and its first
    token is preceded by the last token of the chunk before it (`prev_joined`). Each memory finds
    those neighbour chunks its own way (ring slots, rows of a shard); this is the rest, for all.

    values (..., k, c, D), token_ids (..., k, c), hit (..., k); next_first_values (..., k, D) and
    next_first_ids (..., k): the first token of each chunk's successor; prev_last_ids (..., k): the
    last token of its predecessor; next_joined, prev_joined (..., k) bool.
    Returns next_values (..., k*c, D) (zero where unknown), next_mask (..., k*c), and prev / next
    token ids (..., k*c) (-1 where unknown).
    """
    *lead, k, c, D = values.shape
    with torch.autocast(values.device.type, enabled=False):  # CPU autocast's cat refuses float16 memory
        next_values = torch.cat([values[..., 1:, :], next_first_values[..., None, :].to(values.dtype)], dim=-2)
    next_mask = hit[..., None].expand(*hit.shape, c).clone()
    next_mask[..., -1] = hit & next_joined
    next_values = next_values.masked_fill(~next_mask[..., None], 0).reshape(*lead, k * c, D)
    first_prev = torch.where(hit & prev_joined, prev_last_ids, torch.full_like(prev_last_ids, -1))
    prev_ids = torch.cat([first_prev[..., None], token_ids[..., :-1]], dim=-1)
    prev_ids = prev_ids.masked_fill(~hit[..., None], -1).reshape(*lead, k * c)
    next_ids = torch.cat([token_ids[..., 1:], next_first_ids[..., None]], dim=-1).masked_fill(~next_mask, -1)
    return next_values, next_mask.reshape(*lead, k * c), prev_ids, next_ids.reshape(*lead, k * c)


def merge_retrievals(parts: list[MemoryRetrieval], k: int) -> MemoryRetrieval:
    """Top-k by score over several retrievals of the same queries (shards, a bank and a store).

    Ties keep the earlier part first, so merging is deterministic."""
    if len(parts) == 1:
        return parts[0]
    scores = torch.cat([p.scores for p in parts], dim=-1)  # (B, H, T, sum k)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]  # (B, H, T, k)
    kk = order.shape[-1]
    c = parts[0].token_mask.shape[-1] // parts[0].scores.shape[-1]

    def chunks(name):
        return torch.cat([getattr(p, name) for p in parts], dim=-1).gather(-1, order)

    def tokens(name):  # (B, H, T, k*c[, D]) per part -> picked chunks' tokens
        xs = [getattr(p, name) for p in parts]
        if xs[0] is None:
            return None
        B, H, T = xs[0].shape[:3]
        tail = xs[0].shape[4:]
        x = torch.cat([t.reshape(B, H, T, -1, c, *tail).to(xs[0].dtype) for t in xs], dim=3)
        idx = order.reshape(B, H, T, kk, *([1] * (1 + len(tail)))).expand(B, H, T, kk, c, *tail)
        return x.gather(3, idx).reshape(B, H, T, kk * c, *tail)

    ids = None
    if all(p.token_ids is not None for p in parts):
        B, H, T = order.shape[:3]
        ids = torch.cat([p.token_ids for p in parts], dim=3).gather(3, order[..., None].expand(B, H, T, kk, c))
    return MemoryRetrieval(
        keys=tokens("keys"), values=tokens("values"), token_mask=tokens("token_mask"),
        scores=scores.gather(-1, order), slots=chunks("slots"), positions=chunks("positions"),
        streams=parts[0].streams, queries=parts[0].queries, next_values=tokens("next_values"),
        next_mask=tokens("next_mask"), token_ids=ids, prev_token_ids=tokens("prev_token_ids"),
        next_token_ids=tokens("next_token_ids"),
    )


class CombinedMemory:
    """A session bank (writable, per stream) read together with built memories (read-only, shared).

    What leaves the local window is written to the bank; a search returns the top-k over all of
    them by score, so a model reads its own past and a corpus memory in one softmax."""

    def __init__(self, bank: Memory | None = None, stores: list[Memory] | None = None):
        self.bank, self.stores = bank, list(stores or [])
        parts = ([bank] if bank is not None else []) + self.stores
        if not parts:
            raise StoreError("CombinedMemory needs a bank or at least one built memory")
        self.num_kv_heads, self.head_dim, self.chunk_size = _common_shape(parts, "memories")
        self.device = bank.device if bank is not None else torch.device("cpu")
        self.read_only = bank is None

    def add(self, keys, values, token_ids=None, streams=None, skip_first: int = 0) -> None:
        if self.bank is None:
            raise StoreError("this memory holds only built memories, which are read-only")
        self.bank.add(keys, values, token_ids=token_ids, streams=streams, skip_first=skip_first)

    def search(self, queries: torch.Tensor, k: int, streams=None, with_next: bool = False) -> MemoryRetrieval:
        parts = [] if self.bank is None else [self.bank.search(queries, k, streams, with_next=with_next)]
        parts += [store.search(queries, k, streams, with_next=with_next) for store in self.stores]
        return merge_retrievals(parts, k)

    def submit(self, queries: torch.Tensor, k: int, with_next: bool = False):
        """search(queries, k) in two halves: the built memories that search remotely start now, the
        returned function searches the bank and waits for them."""
        started = [(store.submit(queries, k, with_next) if hasattr(store, "submit") else None) for store in self.stores]

        def collect() -> MemoryRetrieval:
            parts = [] if self.bank is None else [self.bank.search(queries, k, with_next=with_next)]
            parts += [s() if s is not None else store.search(queries, k, with_next=with_next)
                      for s, store in zip(started, self.stores)]
            return merge_retrievals(parts, k)

        return collect

    def reset(self, streams=None) -> None:
        if self.bank is not None:
            self.bank.reset(streams)

    def passage_tokens(self, stream: int = 0):
        """The token ids of the parts that hold theirs here (passage recall): built memories
        first, then the stream's own; None where no part does."""
        parts = [m.passage_tokens(stream) for m in self.stores + ([self.bank] if self.bank is not None else [])
                 if hasattr(m, "passage_tokens")]
        parts = [p for p in parts if p is not None]
        return np.concatenate(parts) if parts else None

    def check_model(self, spec: MemorySpec) -> None:
        for part in ([self.bank] if self.bank is not None else []) + self.stores:
            part.check_model(spec)


def _common_shape(memories: list, what: str) -> tuple[int, int, int]:
    """(kv_heads, head_dim, chunk_size) that every memory shares, or a clear error."""
    shapes = {(m.num_kv_heads, m.head_dim, m.chunk_size) for m in memories}
    if len(shapes) > 1:
        raise StoreError(f"{what} of different shapes (kv_heads, head_dim, chunk_size) cannot be read together: {shapes}")
    return shapes.pop()


def _is_empty(memory) -> bool:
    """True for a writable memory known to hold nothing searchable yet."""
    num_tokens = getattr(memory, "num_tokens", None)
    return callable(num_tokens) and getattr(memory, "num_streams", 1) == 1 and num_tokens(0) == 0


def split_retrieval(r: MemoryRetrieval, sizes: list[int]) -> list[MemoryRetrieval]:
    """A retrieval of queries concatenated along T -> one per part of `sizes` tokens.

    Every per-query field has T as dim 2 (B, H, T, ...); `streams` has no T, and
    `query_prev_ids` is set later by the model."""
    out, start = [], 0
    for n in sizes:
        cuts = {f.name: getattr(r, f.name).narrow(2, start, n) for f in fields(r)
                if f.name not in ("streams", "query_prev_ids") and getattr(r, f.name) is not None}
        out.append(replace(r, **cuts))
        start += n
    return out


# What an empty retrieved slot holds, per field that has a chunk or token axis (the axis after T).
_EMPTY = {"keys": 0, "values": 0, "token_mask": False, "scores": float("-inf"), "slots": 0, "positions": -1,
          "token_ids": -1, "next_values": 0, "next_mask": False, "prev_token_ids": -1, "next_token_ids": -1}


def stack_retrievals(rows: list[MemoryRetrieval]) -> MemoryRetrieval:
    """One retrieval per row (B = 1 each) -> one of B rows; rows that found fewer chunks are padded
    with empty slots."""
    if len(rows) == 1:
        return rows[0]
    k = max(r.scores.shape[-1] for r in rows)
    c = rows[0].token_mask.shape[-1] // rows[0].scores.shape[-1]
    out = {}
    for f in fields(MemoryRetrieval):
        xs = [getattr(r, f.name) for r in rows]
        if any(x is None for x in xs):
            if not all(x is None for x in xs):
                raise StoreError(f"rows of a batch disagree on the retrieval's {f.name}")
            out[f.name] = None
            continue
        if f.name in _EMPTY:
            per_chunk = f.name in ("scores", "slots", "positions", "token_ids")  # axis 3 counts chunks, else tokens
            padded = []
            for r, x in zip(rows, xs):
                missing = (k - r.scores.shape[-1]) * (1 if per_chunk else c)
                if missing:
                    shape = list(x.shape)
                    shape[3] = missing
                    x = torch.cat([x, torch.full(shape, _EMPTY[f.name], dtype=x.dtype, device=x.device)], dim=3)
                padded.append(x.to(xs[0].dtype))
            xs = padded
        out[f.name] = torch.cat(xs, dim=0)
    return MemoryRetrieval(**out)


class RowMemories:
    """The memory of a batch whose rows each read their own: row b searches `memories[b]` (a bank,
    a built memory, a CombinedMemory of both, or None for no memory).

    A built memory that several rows read is searched once for all of them (their queries side by
    side), and the searches of different built memories are all sent before any is waited for
    (remote shards search in parallel). Writing goes through each row's own memory."""

    read_only = False

    def __init__(self, memories: list):
        present = [m for m in memories if m is not None]
        if not present:
            raise StoreError("RowMemories needs at least one row with a memory")
        self.num_kv_heads, self.head_dim, self.chunk_size = _common_shape(present, "rows' memories")
        self.memories = list(memories)
        self.device = next((m.device for m in present if not m.read_only), torch.device("cpu"))
        self._empty = None  # a bank with nothing in it, for rows without memory

    @staticmethod
    def _parts(memory) -> tuple[list, list]:
        """(row-private parts, shared read-only parts) of one row's memory."""
        if memory is None:
            return [], []
        if isinstance(memory, CombinedMemory):
            return ([memory.bank] if memory.bank is not None else []), list(memory.stores)
        return ([], [memory]) if memory.read_only else ([memory], [])

    def check_model(self, spec: MemorySpec) -> None:
        for m in self.memories:
            if m is not None:
                m.check_model(spec)

    def add(self, keys, values, token_ids=None, streams=None, skip_first: int = 0) -> None:
        for b, m in enumerate(self.memories):
            if m is not None and not m.read_only:
                m.add(keys[b : b + 1], values[b : b + 1], None if token_ids is None else token_ids[b : b + 1],
                      skip_first=skip_first)

    def reset(self, streams=None) -> None:
        for m in self.memories:
            if m is not None:
                m.reset()

    def search(self, queries: torch.Tensor, k: int, streams=None, with_next: bool = False) -> MemoryRetrieval:
        """queries (B, T, H, D) -> MemoryRetrieval (B, H, T, ...)."""
        return self.submit(queries, k, with_next)()

    def submit(self, queries: torch.Tensor, k: int, with_next: bool = False):
        """Send the built memories' searches now; returns a function that finishes the search (the
        rows' own banks) and waits for the rest."""
        B, T = queries.shape[:2]
        if B != len(self.memories):
            raise StoreError(f"{B} rows of queries for {len(self.memories)} rows of memories")
        shared: dict[int, tuple] = {}  # id(store) -> (store, rows)
        for b, m in enumerate(self.memories):
            for store in self._parts(m)[1]:
                shared.setdefault(id(store), (store, []))[1].append(b)
        pending = []
        for store, rows in shared.values():
            q = queries[rows].reshape(1, len(rows) * T, *queries.shape[2:])  # shared: streams do not matter
            submit = getattr(store, "submit", None)
            pending.append((rows, submit(q, k, with_next) if submit else store.search(q, k, with_next=with_next)))

        def collect() -> MemoryRetrieval:
            parts: list[list[MemoryRetrieval]] = [[] for _ in range(B)]
            for b, m in enumerate(self.memories):
                private, stores = self._parts(m)
                # An empty bank retrieves nothing: it is searched only where the row has nothing
                # else (a request's own bank stays empty until its context outgrows the window).
                private = [p for p in private if not _is_empty(p)] or ([] if stores else [self._empty_bank(queries)])
                for bank in private:
                    parts[b].append(bank.search(queries[b : b + 1], k, with_next=with_next))
            for rows, result in pending:
                result = result() if callable(result) else result
                for b, part in zip(rows, split_retrieval(result, [T] * len(rows))):
                    parts[b].append(part.to(queries.device) if part.keys.device != queries.device else part)
            out = stack_retrievals([merge_retrievals(p, k) for p in parts])
            out.streams = torch.arange(B, device=out.streams.device)
            return out

        return collect

    def _empty_bank(self, queries):
        if self._empty is None:
            from .bank import MemoryBank

            self._empty = MemoryBank(num_streams=1, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                     capacity_tokens=self.chunk_size, chunk_size=self.chunk_size,
                                     dtype=torch.float32, device=queries.device)
        return self._empty
