"""Continuous batching: many generations decoded together, one token a step.

    decoder = BatchDecoder(model, max_rows=32)
    row = decoder.submit(ids, memory, Sampling(max_new_tokens=64), on_token=print)
    while decoder.busy:
        decoder.step()
    row.result                        # RowResult(token_ids, text, finish_reason)

A row joins at a step boundary: its past goes to its memory, and the local contexts of all rows
joining in that step are read in one forward (left-padded), then they decode with the others. It leaves when it finishes (length, EOS, a stop string, or `should_stop()`). Rows
have their own lengths, sampling settings, stop strings and memories: one decoding step is one
forward of all rows, and one search per memory for all rows that read it (memory.RowMemories).

The rows' local contexts share one key/value cache, left-padded: row b's context fills the last
lengths[b] positions of a cache of L, an attention mask hides the rest, and positions count from
the row's own start. A row whose window is full slides alone (generation.append) and joins again.
Greedy rows decode the same tokens as `generate` on them one at a time (tested).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .generation import DecodeState, append, new_generator, prefill, read_past, sample
from .memory import RowMemories
from .model import InputError, LongMem
from .sidenet import LayerCache


@dataclass
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class RowResult:
    token_ids: list[int]  # new tokens (stop string and EOS excluded)
    text: str | None  # decoded, cut before a stop string
    finish_reason: str  # "length" | "stop" | "eos" | "cancelled" | "error"
    prompt_tokens: int
    error: Exception | None = None


class Row:
    """One generation in the batch. `result` is set once it has finished."""

    def __init__(self, ids, memory, sampling: Sampling, on_token=None, should_stop=None):
        self.ids, self.memory, self.sampling = ids, memory, sampling
        self.on_token, self.should_stop = on_token, should_stop
        self.streams = None
        self.state: DecodeState | None = None
        self.logits: torch.Tensor | None = None  # (1, V) what the next token is sampled from
        self.generator: torch.Generator | None = None
        self.new: list[int] = []
        self.result: RowResult | None = None
        self.future = None  # the caller's handle on the result (a server's Future)

    @property
    def length(self) -> int:
        return self.state.ids.shape[1]


class BatchDecoder:
    """The scheduler and its shared cache. Not thread-safe: one thread calls submit/step (a server
    runs it in one engine thread)."""

    def __init__(self, model: LongMem, max_rows: int = 32):
        if max_rows < 1:
            raise InputError(f"max_rows must be at least 1, got {max_rows}")
        self.model, self.max_rows = model, max_rows
        self.waiting: deque[Row] = deque()
        self.rows: list[Row] = []  # decoding, in cache order
        self.cache = None  # backbone cache: per layer (B, Hkv, L, D)
        self.side: list = []  # SideNet LayerCaches, same layout
        self.L = 0
        self.steps = 0
        self.last_batch = 0
        self.max_batch = 0
        tok = model.tokenizer
        self.eos = getattr(tok, "eos_token_id", None) if tok is not None else None

    # ------------------------------------------------------------------ submitting
    def submit(self, ids: torch.Tensor, memory=None, sampling: Sampling | None = None, on_token=None,
               should_stop=None) -> Row:
        """Queue a prompt (1, P); it starts at the next step. on_token(token_id) is called for each
        kept token; should_stop() is asked every step (a client that went away)."""
        sampling = sampling or Sampling()
        self.model._check_input(ids, None)
        if ids.shape[0] != 1:
            raise InputError(f"submit one prompt at a time, shape (1, P); got {tuple(ids.shape)}")
        if memory is not None:
            self.model.check_memory(memory)
        if sampling.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be positive, got {sampling.max_new_tokens}")
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
            raise InputError(f"need temperature >= 0 and 0 < top_p <= 1, got {sampling.temperature}, {sampling.top_p}")
        if sampling.stop and self.model.tokenizer is None:
            raise InputError("stop strings need a tokenizer attached to the model")
        row = Row(ids, memory, sampling, on_token, should_stop)
        self.waiting.append(row)
        return row

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> list[Row]:
        """Admit waiting rows, pick every row's next token, retire the finished ones, and run one
        forward for the rest. Returns the rows that finished in this step."""
        if self.model.training:
            self.model.eval()
        finished = []
        joining = []
        while self.waiting and len(self.rows) + len(joining) < self.max_rows:
            row = self.waiting.popleft()
            if self._cancelled(row):
                finished.append(self._finish(row, "cancelled"))
            else:
                joining.append(row)
        if joining:
            finished += self._admit(joining)

        keep, tokens = [], []
        for row in self.rows:
            reason = self._pick(row)
            if reason is None:
                keep.append(row)
                tokens.append(row.new[-1])
            else:
                finished.append(self._finish(row, reason))
        # A row whose window is full slides alone (its past moves to memory) and joins again after.
        window = self.model.config.memory.window
        sliding = [(r, t) for r, t in zip(keep, tokens) if r.length >= window]
        decoding = [(r, t) for r, t in zip(keep, tokens) if r.length < window]
        if len(decoding) < len(self.rows):
            self._keep([r for r, _ in decoding])
        if decoding:
            try:
                self._forward([t for _, t in decoding])
            except Exception as e:  # noqa: BLE001 - the rows of a failed step end with its error
                for row, _ in decoding:
                    finished.append(self._finish(row, "error", e))
                self._keep([])
        for row, token in sliding:
            try:
                state, row.logits = append(self.model, row.state, torch.tensor([[token]], device=self.model.device),
                                           row.memory, row.streams, True)
            except Exception as e:  # noqa: BLE001 - one bad row fails alone
                finished.append(self._finish(row, "error", e))
                continue
            self._join_alone(row, state)
        self.steps += 1
        self.last_batch = len(decoding) + len(sliding)
        self.max_batch = max(self.max_batch, self.last_batch)
        return finished

    def _admit(self, rows: list[Row]) -> list[Row]:
        """Read the prompts of rows that join in this step and add them to the shared cache: each
        row's past goes to its memory alone, then all their local contexts are read in one forward
        (left-padded to one length). Returns the rows that failed."""
        failed, ready = [], []
        for row in rows:
            try:
                row.memory, row.streams, local, previous = read_past(self.model, row.ids, row.memory, None)
            except Exception as e:  # noqa: BLE001 - one bad row fails alone
                failed.append(self._finish(row, "error", e))
                continue
            row.generator = new_generator(self.model.device, row.sampling.seed)
            ready.append((row, local, previous))
        if len(ready) > 1:
            try:
                self._read_together(ready)
                return failed
            except Exception:  # noqa: BLE001 - read them one by one, so that only a bad row fails
                pass
        for row, local, previous in ready:
            try:
                state, row.logits = prefill(self.model, local, row.memory, row.streams, True, previous)
            except Exception as e:  # noqa: BLE001 - one bad row fails alone
                failed.append(self._finish(row, "error", e))
                continue
            self._join_alone(row, state)
        return failed

    def _join_alone(self, row: Row, state: DecodeState) -> None:
        """Add a row whose context was read alone (state with B = 1, its own caches)."""
        row.state = DecodeState(state.ids, state.keys, state.values, None, [], state.previous)
        self._join([row], state.backbone_cache, state.side_caches, state.ids.shape[1])

    def _read_together(self, ready: list) -> None:
        """One forward of several local contexts (1, t_b), left-padded to the longest: the padding
        is masked out and each row counts its positions from its own start, as in decoding."""
        model, device = self.model, self.model.device
        lengths = torch.tensor([local.shape[1] for _, local, _ in ready], device=device)  # (B,)
        L = int(lengths.max())
        pad = L - lengths  # (B,)
        ids = torch.stack([F.pad(local[0], (int(p), 0), value=int(local[0, 0])) for (_, local, _), p in zip(ready, pad)])
        positions = torch.arange(L, device=device)[None] - pad[:, None]  # (B, L)
        mask = positions >= 0  # (B, L)
        predecessors = torch.full_like(ids, -1)  # (B, L): the two-token match's predecessor ids
        for b, (_, local, previous) in enumerate(ready):
            t = local.shape[1]
            predecessors[b, L - t + 1 :] = local[0, :-1]
            if previous is not None:
                predecessors[b, L - t] = previous[0]
        memories = [row.memory for row, _, _ in ready]
        cache = model.new_kv_cache()
        side = [LayerCache() for _ in model.sidenet.layers]
        out = model(ids, bank=RowMemories(memories) if any(m is not None for m in memories) else None,
                    backbone_cache=cache, side_caches=side, predecessor_ids=predecessors,
                    position_ids=positions.clamp(min=0), attention_mask=mask)
        rows = []
        for b, (row, local, previous) in enumerate(ready):
            start = int(pad[b])
            row.state = DecodeState(local, out.memory_keys[b : b + 1, start:], out.memory_values[b : b + 1, start:],
                                    None, [], previous)
            row.logits = out.logits[b : b + 1, -1]
            rows.append(row)
        self._join(rows, cache, side, L)

    def _pick(self, row: Row) -> str | None:
        """Sample the row's next token from its logits; the finish reason if it ends here."""
        if self._cancelled(row):
            return "cancelled"
        s = row.sampling
        token = int(sample(row.logits, s.temperature, s.top_p, row.generator)[0])
        row.logits = None
        if self.eos is not None and token == self.eos:
            return "eos"
        row.new.append(token)
        if row.on_token is not None:
            row.on_token(token)
        if s.stop and any(x in self.model.tokenizer.decode(row.new, skip_special_tokens=True) for x in s.stop):
            return "stop"
        if len(row.new) >= s.max_new_tokens:
            return "length"
        return None

    def _cancelled(self, row: Row) -> bool:
        return row.should_stop is not None and bool(row.should_stop())

    def _finish(self, row: Row, reason: str, error: Exception | None = None) -> Row:
        text = None
        tok = self.model.tokenizer
        if tok is not None:
            text = tok.decode(row.new, skip_special_tokens=True)
            if reason == "stop":
                text = text[: min(text.index(s) for s in row.sampling.stop if s in text)]
        row.result = RowResult(row.new, text, reason, int(row.ids.shape[1]), error)
        row.state = row.memory = row.logits = None  # free the row's context (its bank lives on elsewhere)
        return row

    # ------------------------------------------------------------------ the shared cache
    def _layers(self, cache=None, side=None):
        """(holder of keys and values, columns in front of the rows' contexts) of every cache layer:
        the backbone's (which may hold its start token first), then the SideNet's."""
        cache, side = (self.cache, self.side) if cache is None else (cache, side)
        lead = self.model.adapter.cache_lead
        return [(layer, lead) for layer in cache.layers] + [(c, 0) for c in side if c.keys is not None]

    def _join(self, rows: list[Row], cache, side: list, n: int) -> None:
        """Add rows (their states set) whose contexts were read apart, with their own cache of n
        positions (left-padded where they were read together), to the shared cache."""
        if not self.rows:
            self.cache, self.side, self.L = cache, side, n
            self.rows = list(rows)
            return
        if n > self.L:
            for layer, lead in self._layers():
                layer.keys, layer.values = _pad_left(layer.keys, n - self.L, lead), _pad_left(layer.values, n - self.L, lead)
            self.L = n
        for (mine, lead), (other, _) in zip(self._layers(), self._layers(cache, side)):
            mine.keys = torch.cat([mine.keys, _pad_left(other.keys, self.L - n, lead)], dim=0)
            mine.values = torch.cat([mine.values, _pad_left(other.values, self.L - n, lead)], dim=0)
        self.rows += rows

    def _keep(self, rows: list[Row]) -> None:
        """Keep only `rows` (a subset of self.rows, in order) in the shared cache."""
        if not rows:
            self.rows, self.cache, self.side, self.L = [], None, [], 0
            return
        index = torch.tensor([self.rows.index(r) for r in rows], device=self.model.device)
        trim = self.L - max(r.length for r in rows)  # padding no row needs any more
        for layer, lead in self._layers():
            layer.keys = _trim_left(layer.keys.index_select(0, index), trim, lead)
            layer.values = _trim_left(layer.values.index_select(0, index), trim, lead)
        self.L -= trim
        self.rows = rows

    def _forward(self, tokens: list[int]) -> None:
        """One forward of every row's new token (B, 1) over the shared cache."""
        model, device = self.model, self.model.device
        lengths = torch.tensor([r.length for r in self.rows], device=device)  # (B,)
        token = torch.tensor(tokens, device=device)[:, None]  # (B, 1)
        positions = torch.arange(self.L + 1, device=device)[None]  # (1, L + 1)
        mask = positions >= (self.L - lengths)[:, None]  # (B, L + 1): the row's context and its new token
        memories = [r.memory for r in self.rows]
        memory = RowMemories(memories) if any(m is not None for m in memories) else None
        previous = torch.stack([r.state.ids[0, -1] for r in self.rows])  # (B,)
        out = model(token, bank=memory, backbone_cache=self.cache, side_caches=self.side,
                    previous_ids=previous, position_ids=lengths[:, None], attention_mask=mask)
        self.L += 1
        for b, row in enumerate(self.rows):
            st = row.state
            st.ids = torch.cat([st.ids, token[b : b + 1]], dim=1)
            st.keys = torch.cat([st.keys, out.memory_keys[b : b + 1]], dim=1)
            st.values = torch.cat([st.values, out.memory_values[b : b + 1]], dim=1)
            row.logits = out.logits[b : b + 1, -1]


def _pad_left(x: torch.Tensor, n: int, lead: int = 0) -> torch.Tensor:
    """(B, H, lead + L, D) -> (B, H, lead + n + L, D): n zero columns after the first `lead`."""
    if n == 0:
        return x
    return torch.cat([x[:, :, :lead], F.pad(x[:, :, lead:], (0, 0, n, 0))], dim=2)


def _trim_left(x: torch.Tensor, n: int, lead: int = 0) -> torch.Tensor:
    """(B, H, lead + n + L, D) -> (B, H, lead + L, D): drops the n columns after the first `lead`."""
    return x if n == 0 else torch.cat([x[:, :, :lead], x[:, :, lead + n :]], dim=2)
