"""LongMem: a frozen backbone, a trainable SideNet, and a memory bank the SideNet reads.

    model = LongMem.from_backbone("smollm2-135m-instruct", side_init="zero")
    bank = model.new_bank(num_streams=1)
    for segment in model.segments(ids):          # each segment reads the past segments' memory
        out = model(segment, bank=bank, update_memory=True)
    text = model.generate_text("Question: ...", bank=bank, max_new_tokens=32)
    model.save_pretrained("ckpt/")               # config.json + sidenet.safetensors only
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import (
    BackboneAdapter,
    BackboneStates,
    BackboneError,
    fingerprint,
    freeze,
    load_backbone,
    make_adapter,
)
from .config import CHECKPOINT_ADDITIONS, DEFAULT_BACKBONE, ConfigError, LongMemConfig
from .memory import MemoryBank
from .sidenet import LayerCache, MemoryReadout, SideNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sidenet.safetensors"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class InputError(ValueError):
    """Input that LongMem cannot process; the message says what to change."""


@dataclass
class LongMemOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # mean next-token cross-entropy over labelled positions
    memory_keys: torch.Tensor  # (B, T, Hkv, D) this segment's keys for the bank, pre-rotary
    memory_values: torch.Tensor  # (B, T, Hkv, D)
    readout: MemoryReadout | None = None  # what the memory layer read (None without a bank)


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]  # new tokens per row (stop string and EOS excluded)
    texts: list[str] | None  # decoded new text per row, when a tokenizer is attached
    finish_reasons: list[str]  # "length" | "stop" | "eos" per row


@dataclass
class _DecodeState:
    ids: torch.Tensor  # (B, t) tokens in the local window
    keys: torch.Tensor  # (B, t, Hkv, D) their memory-layer keys (written to memory when they leave)
    values: torch.Tensor
    backbone_cache: object = None
    side_caches: list[LayerCache] = field(default_factory=list)
    previous: torch.Tensor | None = None  # (B,) the token before ids[:, 0], if any


class LongMem(nn.Module):
    def __init__(self, backbone: nn.Module, config: LongMemConfig, tokenizer=None):
        super().__init__()
        self.adapter: BackboneAdapter = make_adapter(backbone)
        self.adapter.set_key_center(config.key_center)
        config.model_type = backbone.config.model_type
        config.num_backbone_layers = self.adapter.num_layers
        if config.backbone_fingerprint is None:
            config.backbone_fingerprint = fingerprint(backbone)
        self.config = config.validate()
        self.backbone = freeze(backbone)
        self.sidenet = SideNet(self.adapter, config)
        self.tokenizer = tokenizer
        self.memory_layer = config.resolved_memory_layer
        self._keep_layers = [config.reduction_factor * l for l in range(config.num_side_layers + 1)]
        self.__dict__["_side_runner"] = None  # e.g. a DDP wrapper of self.sidenet; not a submodule

    @torch.no_grad()
    def calibrate_key_center(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Set key_center to the mean raw memory key of (B, N) tokens (window by window, sinks left
        out, as memory stores them); returns it (Hkv, D). Memories built before no longer match."""
        self._check_input(input_ids, None)
        self.adapter.set_key_center(None)
        total, count = 0.0, 0
        for segment in self.segments(input_ids):
            keys = self.adapter.run(segment, [], self.memory_layer, stop_after_memory=True).memory_keys
            keys = keys[:, self.config.sink_tokens :].float()  # (B, T', Hkv, D)
            total, count = total + keys.sum(dim=(0, 1)), count + keys.shape[0] * keys.shape[1]
        if count == 0:
            raise InputError(f"calibrating key_center needs more than {self.config.sink_tokens} tokens per window")
        center = (total / count).cpu()
        self.config.key_center = center.tolist()
        self.adapter.set_key_center(self.config.key_center)
        return center

    def run_sidenet_through(self, wrapper: nn.Module | None) -> None:
        """Route the SideNet's forward through `wrapper` (DDP) so gradients sync across workers."""
        self.__dict__["_side_runner"] = wrapper

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls,
        backbone: str = DEFAULT_BACKBONE,
        revision: str | None = None,
        gguf_file: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **config_overrides,
    ) -> "LongMem":
        config = LongMemConfig(backbone=backbone, backbone_revision=revision, gguf_file=gguf_file, **config_overrides)
        config.validate()
        model, tokenizer = load_backbone(backbone, revision, gguf_file, dtype=dtype, device=device)
        return cls(model, config, tokenizer).to(device)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen means no dropout either
        return self

    @property
    def device(self) -> torch.device:
        return self.adapter.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.lm_head.weight.dtype

    def new_bank(self, num_streams: int = 1, capacity_tokens: int | None = None) -> MemoryBank:
        return MemoryBank(
            num_streams=num_streams,
            num_kv_heads=self.adapter.num_kv_heads,
            head_dim=self.adapter.head_dim,
            capacity_tokens=capacity_tokens or self.config.memory_tokens,
            chunk_size=self.config.chunk_size,
            dtype=self.config.memory_dtype,
            device=self.device,
            metric=self.config.retrieval_metric,
        )

    # ------------------------------------------------------------------ forward
    def _check_input(self, input_ids: torch.Tensor, max_len: int | None) -> None:
        if not torch.is_tensor(input_ids) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise InputError("input_ids must be an integer tensor of token ids, shape (B, T)")
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise InputError("input_ids is empty: nothing to process")
        if input_ids.device != self.device:
            raise InputError(f"input_ids are on {input_ids.device} but the model is on {self.device}")
        vocab = self.adapter.lm_head.weight.shape[0]
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise InputError(f"token ids must lie in [0, {vocab}), got [{int(input_ids.min())}, {int(input_ids.max())}]")
        if max_len is not None and input_ids.shape[1] > max_len:
            raise InputError(
                f"a segment of {input_ids.shape[1]} tokens exceeds the local window of {max_len}; "
                "use LongMem.stream() (or segments()) to feed longer text through memory"
            )

    def _check_bank(self, bank: MemoryBank) -> None:
        """Any memory with search() and these attributes: a MemoryBank, a MemoryStore, a CombinedMemory."""
        want = (self.adapter.num_kv_heads, self.adapter.head_dim, self.config.chunk_size)
        have = (bank.num_kv_heads, bank.head_dim, bank.chunk_size)
        if want != have:
            raise InputError(f"memory bank has (kv_heads, head_dim, chunk_size)={have}, the model needs {want}")
        spec = getattr(bank, "spec", None)
        if spec is not None:  # a built memory: also the same backbone, layer and chunking
            from .memory.store import StoreError

            try:
                bank.check_model(self.config, self.adapter.num_kv_heads, self.adapter.head_dim)
            except StoreError as e:
                raise InputError(str(e)) from None
        for store in getattr(bank, "stores", []):
            store.check_model(self.config, self.adapter.num_kv_heads, self.adapter.head_dim)
        if not getattr(bank, "read_only", False) and bank.device != self.device:
            raise InputError(f"memory bank is on {bank.device} but the model is on {self.device}")

    def forward(
        self,
        input_ids: torch.Tensor,
        bank: MemoryBank | None = None,
        streams=None,
        labels: torch.Tensor | None = None,
        update_memory: bool = False,
        position_offset: int = 0,
        backbone_cache=None,
        side_caches: list[LayerCache] | None = None,
        states: BackboneStates | None = None,
        previous_ids: torch.Tensor | None = None,
    ) -> LongMemOutput:
        """One segment (B, T <= window): read memory first, then (optionally) write this segment to it.

        `states` reuses a backbone pass already made for these ids (see `backbone_states`).
        `previous_ids` (B,) is the token before input_ids[:, 0] where there is one (the next read's
        two-token match uses it)."""
        self._check_input(input_ids, None if backbone_cache is not None else self.config.window)
        if bank is not None:
            self._check_bank(bank)
        if update_memory and (bank is None or getattr(bank, "read_only", False)):
            raise InputError("update_memory=True needs a writable memory bank (a built memory is read-only)")
        B, T = input_ids.shape
        if states is None:
            states = self.backbone_states(input_ids, cache=backbone_cache)
        position_ids = torch.arange(position_offset, position_offset + T, device=self.device)[None]

        retrieve = None
        if bank is not None:
            k = self.config.retrieve_chunks
            nxt = self.config.memory_read == "next"
            if self.config.retrieval_query in ("backbone", "backbone_key"):
                frozen_q = states.memory_queries
                if self.config.retrieval_query == "backbone_key":  # each query head searches with its KV head's key
                    group = self.adapter.num_heads // self.adapter.num_kv_heads
                    frozen_q = states.memory_keys.repeat_interleave(group, dim=2)
                search = lambda _side_q: bank.search(frozen_q, k, streams, with_next=nxt)  # noqa: E731
            else:
                search = lambda side_q: bank.search(side_q.transpose(1, 2), k, streams, with_next=nxt)  # noqa: E731
            first = torch.full((B, 1), -1, dtype=input_ids.dtype, device=input_ids.device)
            if previous_ids is not None:
                first = previous_ids.reshape(B, 1).to(first)
            query_prev = torch.cat([first, input_ids[:, :-1]], dim=1)  # (B, T)

            def retrieve(side_q):
                retrieval = search(side_q)
                retrieval.query_prev_ids = query_prev
                return retrieval
        sidenet = self._side_runner if self._side_runner is not None else self.sidenet
        logits, readout = sidenet(self.adapter, states, position_ids, side_caches, retrieve)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        if update_memory:
            bank.add(states.memory_keys, states.memory_values, token_ids=input_ids, streams=streams,
                     skip_first=self.config.sink_tokens)
        return LongMemOutput(logits, loss, states.memory_keys, states.memory_values, readout)

    def backbone_states(self, input_ids: torch.Tensor, cache=None) -> BackboneStates:
        """The frozen pass LongMem needs; its last hidden state also gives the backbone's own logits."""
        return self.adapter.run(input_ids, self._keep_layers, self.memory_layer, cache=cache)

    @torch.no_grad()
    def backbone_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The frozen backbone alone on (B, T): the baseline every LongMem figure is compared with."""
        self._check_input(input_ids, None)
        states = self.adapter.run(input_ids, [self.adapter.num_layers], self.memory_layer)
        return self.adapter.logits(states.hidden[-1])

    # ------------------------------------------------------------------ long documents
    def segments(self, input_ids: torch.Tensor, window: int | None = None):
        """Split (B, N) into consecutive segments of at most `window` tokens."""
        window = window or self.config.window
        for start in range(0, input_ids.shape[1], window):
            yield input_ids[:, start : start + window]

    def stream(self, input_ids: torch.Tensor, bank: MemoryBank, streams=None, labels: bool = False, window=None):
        """Feed a long document segment by segment; each segment reads the memory of the previous ones.

        Yields one LongMemOutput per segment (with loss when labels=True).
        """
        self._check_input(input_ids, None)
        previous = None
        for segment in self.segments(input_ids, window):
            yield self(segment, bank=bank, streams=streams, labels=segment if labels else None, update_memory=True,
                       previous_ids=previous)
            previous = segment[:, -1]

    # ------------------------------------------------------------------ generation
    def _prefill(self, ids: torch.Tensor, bank, streams, use_cache: bool, previous=None) -> tuple[_DecodeState, torch.Tensor]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.backbone.config) if use_cache else None
        side = [LayerCache() for _ in self.sidenet.layers] if use_cache else None
        out = self(ids, bank=bank, streams=streams, backbone_cache=cache, side_caches=side, previous_ids=previous)
        return _DecodeState(ids, out.memory_keys, out.memory_values, cache, side or [], previous), out.logits[:, -1]

    def _append(self, state: _DecodeState, token: torch.Tensor, bank, streams, use_cache: bool):
        window = self.config.window
        if state.ids.shape[1] >= window:
            # The window is full: its oldest part moves to memory, the rest is re-encoded from position 0.
            shift = max(self.config.chunk_size, (window // 2) // self.config.chunk_size * self.config.chunk_size)
            if bank is not None and not getattr(bank, "read_only", False):
                bank.add(state.keys[:, :shift], state.values[:, :shift], token_ids=state.ids[:, :shift],
                         streams=streams, skip_first=min(self.config.sink_tokens, shift))
            return self._prefill(torch.cat([state.ids[:, shift:], token], dim=1), bank, streams, use_cache,
                                 previous=state.ids[:, shift - 1])
        if not use_cache:
            return self._prefill(torch.cat([state.ids, token], dim=1), bank, streams, use_cache, state.previous)
        out = self(
            token,
            bank=bank,
            streams=streams,
            position_offset=state.ids.shape[1],
            backbone_cache=state.backbone_cache,
            side_caches=state.side_caches,
            previous_ids=state.ids[:, -1],
        )
        state.ids = torch.cat([state.ids, token], dim=1)
        state.keys = torch.cat([state.keys, out.memory_keys], dim=1)
        state.values = torch.cat([state.values, out.memory_values], dim=1)
        return state, out.logits[:, -1]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        bank: MemoryBank | None = None,
        streams=None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        use_cache: bool = True,
        seed: int | None = None,
        return_logits: bool = False,
        on_token=None,
    ):
        """Decode from prompts (B, P) of equal length. A prompt longer than the window is streamed:
        whole segments go through memory, the rest is the local context. When the window fills up, its
        older half moves into memory (if a bank is given) and decoding continues.

        temperature 0 is greedy; otherwise sample with nucleus `top_p`. Returns GenerationOutput, and
        also the per-step logits (steps, B, V) when return_logits=True. `on_token(row, token_id)` is
        called for every kept token as it is decided (streaming).
        """
        self._check_input(input_ids, None)
        if bank is not None:
            self._check_bank(bank)
        if max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise InputError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer attached to the model")
        was_training = self.training
        self.eval()
        try:
            return self._generate(input_ids, bank, streams, max_new_tokens, temperature, top_p, stop or [], on_token,
                                  use_cache, seed, return_logits)
        finally:
            self.train(was_training)

    def local_start(self, prompt_length: int) -> int:
        """Where generation's local context begins: everything before goes through memory in
        whole segments, the last (possibly whole) segment stays local."""
        return (prompt_length - 1) // self.config.window * self.config.window

    def _generate(self, ids, bank, streams, max_new_tokens, temperature, top_p, stop, on_token, use_cache, seed,
                  return_logits):
        B, P = ids.shape
        local_start = self.local_start(P)
        if local_start and bank is not None:
            # What memory stores is the backbone's alone: no SideNet pass is needed to write it.
            self.write_memory(ids[:, :local_start], bank, streams)
        previous = ids[:, local_start - 1] if local_start else None
        state, logits = self._prefill(ids[:, local_start:], bank, streams, use_cache, previous)

        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed)
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        new = [[] for _ in range(B)]
        reasons = ["length"] * B
        done = [False] * B
        steps = []
        for step in range(max_new_tokens):
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
                if stop:
                    text = self.tokenizer.decode(new[b], skip_special_tokens=True)
                    if any(s in text for s in stop):
                        done[b], reasons[b] = True, "stop"
            if all(done) or step == max_new_tokens - 1:
                break
            state, logits = self._append(state, token[:, None], bank, streams, use_cache)

        texts = None
        if self.tokenizer is not None:
            texts = []
            for b in range(B):
                text = self.tokenizer.decode(new[b], skip_special_tokens=True)
                if reasons[b] == "stop":
                    cut = min(text.index(s) for s in stop if s in text)
                    text = text[:cut]
                texts.append(text)
        out = GenerationOutput(new, texts, reasons)
        return (out, torch.stack(steps)) if return_logits else out

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; pass token ids")
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids.to(self.device)

    def generate_text(self, prompt: str, bank: MemoryBank | None = None, **kwargs) -> str:
        if not prompt:
            raise InputError("the prompt is empty")
        return self.generate(self.encode(prompt), bank=bank, **kwargs).texts[0]

    @torch.no_grad()
    def write_memory(self, input_ids: torch.Tensor, bank: MemoryBank, streams=None) -> None:
        """Encode (B, N) tokens into the bank with the frozen backbone alone, segment by segment.

        Memory holds backbone keys/values only, so writing it never needs the SideNet.
        """
        self._check_input(input_ids, None)
        self._check_bank(bank)
        for segment in self.segments(input_ids):
            states = self.adapter.run(segment, [], self.memory_layer, stop_after_memory=True)
            bank.add(states.memory_keys, states.memory_values, token_ids=segment, streams=streams,
                     skip_first=self.config.sink_tokens)

    def remember_text(self, text: str, bank: MemoryBank, stream: int = 0) -> int:
        """Encode text with the frozen backbone into one stream of the bank; returns tokens added."""
        ids = self.encode(text)
        if ids.numel() == 0:
            raise InputError("the text is empty")
        self.write_memory(ids, bank, streams=[stream])
        return ids.shape[1]

    # ------------------------------------------------------------------ checkpoints
    def trainable_parameters(self):
        return [p for p in self.sidenet.parameters() if p.requires_grad]

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        state = {k: v.detach().contiguous().cpu() for k, v in self.sidenet.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        backbone: nn.Module | None = None,
        tokenizer=None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        overrides: dict | None = None,
    ) -> "LongMem":
        """Load config.json + sidenet.safetensors; the backbone is loaded by its id unless given.

        `overrides` change the settings a checkpoint allows (config.CHECKPOINT_OVERRIDES), or add a
        weight it lacks (CHECKPOINT_ADDITIONS), which then starts at its init."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists() or not (directory / WEIGHTS_NAME).exists():
            raise ConfigError(f"{directory} is not a LongMem checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = LongMemConfig.load(directory / CONFIG_NAME).override_checkpoint_settings(overrides or {})
        if backbone is None:
            backbone, tokenizer = load_backbone(
                config.backbone, config.backbone_revision, config.gguf_file, dtype=dtype, device=device
            )
        found = fingerprint(backbone)
        if config.backbone_fingerprint and found != config.backbone_fingerprint:
            raise BackboneError(
                f"checkpoint {directory} was trained on backbone {config.backbone!r} "
                f"(fingerprint {config.backbone_fingerprint}) but the backbone given has fingerprint {found}; "
                "a SideNet only works with the frozen backbone it was adapted to"
            )
        model = cls(backbone, config, tokenizer)
        state = load_file(str(directory / WEIGHTS_NAME))
        missing, unexpected = model.sidenet.load_state_dict(state, strict=False)
        added = tuple(CHECKPOINT_ADDITIONS[name] for name in overrides or {} if name in CHECKPOINT_ADDITIONS)
        missing = [name for name in missing if not set(name.split(".")) & set(added)]
        if missing or unexpected:
            raise ConfigError(f"checkpoint weights do not match the SideNet: missing {missing}, unexpected {unexpected}")
        return model.to(device=device, dtype=dtype)


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


def perplexity_report(model: LongMem, input_ids: torch.Tensor, window: int | None = None, progress=None) -> dict:
    """Perplexity of (1, N) tokens three ways over the same scored tokens and local window:
    the backbone alone, LongMem with memory disabled, LongMem reading the memory of earlier segments."""
    from .evaluation import ModelScorer

    window = window or model.config.window
    if input_ids.shape[0] != 1:
        raise InputError(f"perplexity_report scores one sequence, got a batch of {input_ids.shape[0]}")
    if input_ids.shape[1] < 2:
        raise InputError(f"need at least 2 tokens to score, got {input_ids.shape[1]}")
    nll = ModelScorer(model, long_window=None).token_nll(input_ids[0].cpu().numpy(), window, progress)
    scored = ~np.isnan(nll["backbone"])
    return {
        "perplexity": {r: math.exp(nll[r][scored].mean()) for r in ("backbone", "longmem_no_memory", "longmem_memory")},
        "tokens": int(input_ids.numel()),
        "scored_tokens": int(scored.sum()),
        "window": window,
        "segments": math.ceil(input_ids.shape[1] / window),
    }
