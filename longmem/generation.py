"""Decoding a LongMem model: KV-cached steps over a local window that slides into memory, sampling.

A prompt longer than the window is streamed: whole segments go through memory, the rest is the
local context. When the window fills up during decoding, its older half moves into memory (when a
writable memory is given) and the rest is re-encoded from position 0. Before a prompt's window is
read, the passages of memory its last tokens ask about go at the window's front (passage recall,
longmem/memory/passages.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .memory import CombinedMemory, Memory
from .memory.passages import find_passages
from .model import InputError, LongMem
from .sidenet import LayerCache


# Passages take at most this share (1/n) of the local window: the rest stays the prompt's own text.
PASSAGE_SHARE = 4


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # new tokens per row (stop string and EOS excluded)
    texts: list[str] | None  # decoded new text per row, when a tokenizer is attached
    finish_reasons: list[str]  # "length" | "stop" | "eos" | "cancelled" per row


@dataclass
class DecodeState:
    ids: torch.Tensor  # (B, t) tokens in the local window
    keys: torch.Tensor  # (B, t, Hkv, D) their memory-layer keys (written to memory when they leave)
    values: torch.Tensor
    backbone_cache: object = None
    side_caches: list[LayerCache] = field(default_factory=list)
    previous: torch.Tensor | None = None  # (B,) the token before ids[:, 0], if any


def prefill(model: LongMem, ids: torch.Tensor, memory, streams, use_cache: bool,
            previous=None) -> tuple[DecodeState, torch.Tensor]:
    """Read a local context (B, t <= window); returns the decode state and the last logits (B, V)."""
    cache = model.new_kv_cache() if use_cache else None
    side = [LayerCache() for _ in model.sidenet.layers] if use_cache else None
    out = model(ids, bank=memory, streams=streams, backbone_cache=cache, side_caches=side, previous_ids=previous)
    return DecodeState(ids, out.memory_keys, out.memory_values, cache, side or [], previous), out.logits[:, -1]


def append(model: LongMem, state: DecodeState, token: torch.Tensor, memory, streams, use_cache: bool):
    """One decoding step: token (B, 1) joins the local context; returns the state and logits (B, V)."""
    m = model.config.memory
    if state.ids.shape[1] >= m.window:
        # The window is full: its oldest part moves to memory, the rest is re-encoded from position 0.
        shift = max(m.chunk_size, (m.window // 2) // m.chunk_size * m.chunk_size)
        if memory is not None and not memory.read_only:
            memory.add(state.keys[:, :shift], state.values[:, :shift], token_ids=state.ids[:, :shift],
                       streams=streams, skip_first=min(m.sink_tokens, shift))
        return prefill(model, torch.cat([state.ids[:, shift:], token], dim=1), memory, streams, use_cache,
                       previous=state.ids[:, shift - 1])
    if not use_cache:
        return prefill(model, torch.cat([state.ids, token], dim=1), memory, streams, use_cache, state.previous)
    out = model(token, bank=memory, streams=streams, position_offset=state.ids.shape[1],
                backbone_cache=state.backbone_cache, side_caches=state.side_caches, previous_ids=state.ids[:, -1])
    state.ids = torch.cat([state.ids, token], dim=1)
    state.keys = torch.cat([state.keys, out.memory_keys], dim=1)
    state.values = torch.cat([state.values, out.memory_values], dim=1)
    return state, out.logits[:, -1]


@torch.no_grad()
def generate(
    model: LongMem,
    input_ids: torch.Tensor,
    memory: Memory | None = None,
    streams=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    use_cache: bool = True,
    seed: int | None = None,
    return_logits: bool = False,
    on_token=None,
    should_stop=None,
):
    """Decode from prompts (B, P) of equal length.

    temperature 0 is greedy; otherwise sample with nucleus `top_p`. Returns GenerationOutput, and
    also the per-step logits (steps, B, V) when return_logits=True. `on_token(row, token_id)` is
    called for every kept token as it is decided (streaming). `should_stop()` is asked before every
    step: once true, decoding ends there and unfinished rows end with reason "cancelled" (a client
    that went away).
    """
    model._check_input(input_ids, None)
    if memory is not None:
        model.check_memory(memory)
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise InputError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if stop and model.tokenizer is None:
        raise InputError("stop strings need a tokenizer attached to the model")
    was_training = model.training
    model.eval()
    try:
        return _decode(model, input_ids, memory, streams, max_new_tokens, temperature, top_p, stop or [], on_token,
                       use_cache, seed, return_logits, should_stop)
    finally:
        model.train(was_training)


def read_prompt(model: LongMem, ids: torch.Tensor, memory, streams, use_cache: bool = True):
    """Read prompts (B, P): all but the last (possibly whole) window goes through memory, the rest
    is the local context. Returns the memory decoding writes to, its streams, the decode state and
    the last logits (B, V)."""
    memory, streams, local, previous = read_past(model, ids, memory, streams)
    state, logits = prefill(model, local, memory, streams, use_cache, previous)
    return memory, streams, state, logits


def read_past(model: LongMem, ids: torch.Tensor, memory, streams):
    """The part of prompts (B, P) before their local context goes to memory. Returns the memory
    decoding reads and writes, its streams, the local context (B, t) and the token before it (B,)
    (None where the prompt is all local context)."""
    B, P = ids.shape
    local_start = model.local_start(P)
    if local_start and memory is not None and memory.read_only:
        # The prompt's own past still goes to memory: a bank read beside the built memories.
        memory, streams = CombinedMemory(model.new_bank(B), [memory]), None
    if local_start and memory is not None:
        # What memory stores is the backbone's alone: no SideNet pass is needed to write it.
        model.write_memory(ids[:, :local_start], memory, streams)
    previous = ids[:, local_start - 1] if local_start else None
    memory, streams, local_start, passages, before = recall_passages(model, ids, local_start, memory, streams)
    if passages is None:
        return memory, streams, ids[:, local_start:], previous
    return memory, streams, torch.cat([passages, ids[:, local_start:]], dim=1), before


def recall_passages(model: LongMem, ids: torch.Tensor, local_start: int, memory, streams):
    """Passage recall (longmem/memory/passages.py) for one prompt (1, P) whose past memory holds:
    the passages its last tokens find, to read at the front of the local window. The window's
    oldest tokens give way to them and go to memory. Returns (memory, streams, the new local start,
    passages (1, n) or None, the token before the first passage (1,) or None). A batch of several
    prompts read at once, and a memory that keeps no token ids here, read without passages."""
    cfg, window = model.config.passages, model.config.memory.window
    if not cfg.blocks or memory is None or ids.shape[0] != 1 or not hasattr(memory, "passage_tokens"):
        return memory, streams, local_start, None, None
    stream = 0 if streams is None else int(torch.as_tensor(streams).flatten()[0])
    held = memory.passage_tokens(stream)
    room = window // PASSAGE_SHARE
    P = ids.shape[1]
    movable = max(0, (P - local_start) - (window - room))  # what passages may push out is searched too
    prompt = ids[0].cpu().numpy()
    searched = prompt[local_start : local_start + movable]
    if held is not None and len(held):
        searched = np.concatenate([held, searched])
    ranges = find_passages(searched, prompt[-cfg.query_tokens:], cfg, room)
    if not ranges:
        return memory, streams, local_start, None, None
    passages = torch.as_tensor(np.concatenate([searched[a:b] for a, b in ranges]), dtype=ids.dtype,
                               device=ids.device)[None]
    before = None if ranges[0][0] == 0 else torch.as_tensor([int(searched[ranges[0][0] - 1])], dtype=ids.dtype,
                                                              device=ids.device)
    leave = max(0, (P - local_start) + passages.shape[1] - window)
    if leave:
        if memory.read_only:  # the prompt's own tokens go to a bank read beside the built memories
            memory, streams = CombinedMemory(model.new_bank(1), [memory]), None
        segment = ids[:, local_start : local_start + leave]
        keys, values = model.memory_entries(segment, model.memory_context(ids, local_start))
        memory.add(keys, values, token_ids=segment, streams=streams)
    return memory, streams, local_start + leave, passages, before


def new_generator(device, seed: int | None) -> torch.Generator:
    """A sampling generator: seeded for reproducible sampling, otherwise from fresh entropy (an
    unseeded torch.Generator would start every request from the same default seed)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _decode(model, ids, memory, streams, max_new_tokens, temperature, top_p, stop, on_token, use_cache, seed,
            return_logits, should_stop=None):
    B = ids.shape[0]
    memory, streams, state, logits = read_prompt(model, ids, memory, streams, use_cache)
    generator = new_generator(model.device, seed)
    tokenizer = model.tokenizer
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    new = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    steps = []
    for step in range(max_new_tokens):
        if should_stop is not None and should_stop():
            reasons = [r if d else "cancelled" for r, d in zip(reasons, done)]
            break
        if return_logits:
            steps.append(logits.float().clone())
        token = sample(logits, temperature, top_p, generator)  # (B,)
        for b in range(B):
            if done[b]:
                continue
            t = int(token[b])
            if eos is not None and t == eos:
                done[b], reasons[b] = True, "eos"
                continue
            new[b].append(t)
            if on_token is not None:
                on_token(b, t)
            if stop and any(s in tokenizer.decode(new[b], skip_special_tokens=True) for s in stop):
                done[b], reasons[b] = True, "stop"
        if all(done) or step == max_new_tokens - 1:
            break
        state, logits = append(model, state, token[:, None], memory, streams, use_cache)

    texts = None
    if tokenizer is not None:
        texts = []
        for b in range(B):
            text = tokenizer.decode(new[b], skip_special_tokens=True)
            if reasons[b] == "stop":
                text = text[: min(text.index(s) for s in stop if s in text)]
            texts.append(text)
    out = GenerationOutput(new, texts, reasons)
    return (out, torch.stack(steps)) if return_logits else out


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p  # always keeps the most likely token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
