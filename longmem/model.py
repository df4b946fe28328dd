"""LongMem: a frozen backbone, a trainable SideNet, and a memory the SideNet reads.

    model = load_model()                          # longmem/loading.py: the recipe on the default backbone
    bank = model.new_bank(num_streams=1)
    for out in model.stream(ids, bank):           # each segment reads the past segments' memory
    text = model.generate_text("Question: ...", bank=bank, max_new_tokens=32)   # generation.py
    model.save_pretrained("ckpt/")                # config.json + sidenet.safetensors only
"""

from __future__ import annotations

import contextlib

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BackboneAdapter, BackboneStates, fingerprint, freeze, make_adapter
from .config import ConfigError, LongMemConfig
from .memory import Memory, MemoryBank, MemoryBankError, MemorySpec, StoreError
from .sidenet import LayerCache, MemoryReadout, SideNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sidenet.safetensors"


class InputError(ValueError):
    """Input that LongMem cannot process; the message says what to change."""


@dataclass
class LongMemOutput:
    logits: torch.Tensor  # (B, T, V) (log-probabilities when the model has a copy head)
    loss: torch.Tensor | None  # mean next-token cross-entropy over labelled positions
    memory_keys: torch.Tensor  # (B, T, Hkv, D) this segment's keys for the bank, pre-rotary
    memory_values: torch.Tensor  # (B, T, Hkv, D)
    readout: MemoryReadout | None = None  # what the memory layer read (None without a memory)


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor, log_probs: bool) -> torch.Tensor:
    """(B, T, V) outputs and (B, T) labels -> (B, T-1) NLL of each next token (0 where the label is
    -100). `log_probs`: the outputs are already normalised log-probabilities (a copy head's), whose
    NLL is the cross-entropy without a second log-softmax over the vocabulary."""
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    loss = F.nll_loss if log_probs else F.cross_entropy
    return loss(flat, targets, ignore_index=-100, reduction="none").view(labels.shape[0], -1)


class LongMem(nn.Module):
    def __init__(self, backbone: nn.Module, config: LongMemConfig, tokenizer=None):
        super().__init__()
        self.adapter: BackboneAdapter = make_adapter(backbone)
        config.backbone.model_type = backbone.config.model_type
        config.backbone.num_layers = self.adapter.num_layers
        config.backbone.global_layers = self.adapter.global_layers
        if config.backbone.fingerprint is None:
            config.backbone.fingerprint = fingerprint(backbone)
        self.config = config.validate()
        window, reach = config.memory.window, self.adapter.sliding_window
        if reach is not None and window > reach:
            # the SideNet's copies of those layers attend over the whole local window
            raise ConfigError(f"memory.window {window} is longer than the backbone's sliding window of {reach} tokens: "
                              f"use a window of at most {reach}")
        self.backbone = freeze(backbone)
        self.sidenet = SideNet(self.adapter, config)
        self.tokenizer = tokenizer
        self.memory_layer = config.resolved_memory_layer
        self._keep_layers = [config.sidenet.reduction_factor * l for l in range(config.num_side_layers + 1)]
        self.__dict__["_side_runner"] = None  # e.g. a DDP wrapper of self.sidenet; not a submodule
        self._sync_key_center()

    # ------------------------------------------------------------------ the key centre
    def _sync_key_center(self) -> None:
        self.adapter.set_key_center(self.sidenet.key_center if self.config.memory.center_keys else None)
        self.__dict__["_memory_spec"] = None  # the centre's digest is part of the spec: recompute it

    def _apply(self, fn, *args, **kwargs):
        # The centre stays float32 whatever the model's dtype (a memory's spec names it by its
        # digest), and the adapter reads the moved buffer.
        center = self.sidenet.key_center  # kept from before the cast: a bf16 round trip would change it
        out = super()._apply(fn, *args, **kwargs)
        self.sidenet._buffers["key_center"] = center.to(self.sidenet.key_center.device, torch.float32)
        self._sync_key_center()
        return out

    def key_center_digest(self) -> str | None:
        """A short fingerprint of the key centre: a memory built with another centre cannot be searched."""
        if not self.config.memory.center_keys:
            return None
        import hashlib

        return hashlib.sha256(self.sidenet.key_center.float().cpu().numpy().tobytes()).hexdigest()[:16]

    @torch.no_grad()
    def calibrate_key_center(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Set the key centre to the mean raw memory key of (B, N) tokens (window by window, as
        memory stores them); returns it (Hkv, D). Memories built before no
        longer match."""
        if not self.config.memory.center_keys:
            raise InputError("this model searches raw keys (memory.center_keys is false): it has no key centre")
        self._check_input(input_ids, None)
        self.adapter.set_key_center(None)
        total, count = 0.0, 0
        for start in range(0, input_ids.shape[1], self.config.memory.window):
            segment = input_ids[:, start : start + self.config.memory.window]
            keys = self.memory_entries(segment, self.memory_context(input_ids, start))[0].float()  # (B, T, Hkv, D)
            total, count = total + keys.sum(dim=(0, 1)), count + keys.shape[0] * keys.shape[1]
        self.sidenet.key_center.copy_(total / count)
        self._sync_key_center()
        return self.sidenet.key_center.detach().cpu().clone()

    @contextlib.contextmanager
    def frozen_precision(self, dtype: torch.dtype | None):
        """Run the frozen backbone's passes (memory keys/values, the hidden states the SideNet reads)
        under autocast to `dtype` inside this block; the SideNet keeps its own precision and every
        backbone output comes back in the weights' dtype. None: no change. Training uses it: the
        backbone passes are the larger part of a step and need no gradients."""
        before = self.adapter.autocast
        self.adapter.autocast = dtype
        try:
            yield self
        finally:
            self.adapter.autocast = before

    def run_sidenet_through(self, wrapper: nn.Module | None) -> None:
        """Route the SideNet's forward through `wrapper` (DDP) so gradients sync across workers."""
        self.__dict__["_side_runner"] = wrapper

    # ------------------------------------------------------------------ basics
    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen means no dropout either
        return self

    @property
    def returns_log_probs(self) -> bool:
        """Whether forward's logits are log-probabilities (a copy head mixes them) or raw logits."""
        return self.sidenet.memory_copy is not None

    @property
    def device(self) -> torch.device:
        return self.adapter.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.lm_head.weight.dtype

    @property
    def memory_spec(self) -> MemorySpec:
        """What this model's memory keys are: a memory built by another spec cannot be read.
        Kept between calls: every forward checks its memory against it, and hashing the centre
        each time would copy it off the device at every decoding step."""
        if self.__dict__.get("_memory_spec") is None:
            self.__dict__["_memory_spec"] = self._make_memory_spec()
        return self.__dict__["_memory_spec"]

    def _make_memory_spec(self) -> MemorySpec:
        c, m = self.config, self.config.memory
        return MemorySpec(
            num_kv_heads=self.adapter.num_kv_heads, head_dim=self.adapter.head_dim, chunk_size=m.chunk_size,
            metric=m.metric, backbone=c.backbone.name, backbone_fingerprint=c.backbone.fingerprint,
            model_type=c.backbone.model_type, memory_layer=self.memory_layer, window=m.window,
            sink_tokens=m.sink_tokens, dtype="float32" if m.dtype == "bfloat16" else m.dtype,
            backbone_revision=c.backbone.revision, key_center=self.key_center_digest(),
        )

    def new_bank(self, num_streams: int = 1, capacity_tokens: int | None = None) -> MemoryBank:
        m = self.config.memory
        return MemoryBank(num_streams=num_streams, num_kv_heads=self.adapter.num_kv_heads,
                          head_dim=self.adapter.head_dim, capacity_tokens=capacity_tokens or m.capacity_tokens,
                          chunk_size=m.chunk_size, dtype=m.dtype, device=self.device, metric=m.metric)

    # ------------------------------------------------------------------ checks
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

    def check_memory(self, memory: Memory) -> None:
        """Refuse a memory this model cannot read: another shape, backbone, layer, chunking or centre."""
        if not isinstance(memory, Memory):
            raise InputError(f"{type(memory).__name__} is not a memory (it needs add, search, reset, check_model)")
        try:
            memory.check_model(self.memory_spec)
        except (StoreError, MemoryBankError) as e:
            raise InputError(str(e)) from None
        if not memory.read_only and memory.device != self.device:
            raise InputError(f"memory bank is on {memory.device} but the model is on {self.device}")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        bank: Memory | None = None,
        streams=None,
        labels: torch.Tensor | None = None,
        update_memory: bool = False,
        position_offset: int = 0,
        backbone_cache=None,
        side_caches: list[LayerCache] | None = None,
        states: BackboneStates | None = None,
        previous_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context_ids: torch.Tensor | None = None,
        predecessor_ids: torch.Tensor | None = None,
    ) -> LongMemOutput:
        """One segment (B, T <= window): read memory first, then (optionally) write this segment to it.

        `states` reuses a backbone pass already made for these ids (see `backbone_states`).
        `previous_ids` (B,) is the token before input_ids[:, 0] where there is one (the next read's
        two-token match uses it); `predecessor_ids` (B, T) gives every position's instead (-1:
        none), for rows left-padded to one length. `context_ids` (B, sink_tokens) are the tokens before the segment
        (`memory_context`) for what update_memory writes; None: the segment starts its document.
        Batched decoding of rows whose contexts differ in length passes
        each row's `position_ids` (B, T) and an `attention_mask` (B, cached + T), False on the
        padding before a row's context (see longmem/batching.py); the same reads several prompts,
        left-padded, in one pass."""
        self._check_input(input_ids, None if backbone_cache is not None else self.config.memory.window)
        if bank is not None:
            self.check_memory(bank)
        if update_memory and (bank is None or bank.read_only):
            raise InputError("update_memory=True needs a writable memory bank (a built memory is read-only)")
        B, T = input_ids.shape
        prefetched = {}

        def start_search(keys):  # the frozen pass's memory keys (B, T, Hkv, D), as soon as they exist
            prefetched["result"] = bank.submit(keys, self.config.memory.retrieve_chunks,
                                               with_next=self.config.read.mode == "next")

        if states is None:
            # With backbone-key search the search vectors are the frozen pass's memory keys: a memory
            # that can submit (remote shards) is searched while the layers above them compute.
            early = (bank is not None and streams is None and self.config.memory.query == "backbone_key"
                     and hasattr(bank, "submit"))
            states = self.adapter.run(input_ids, self._keep_layers, self.memory_layer, cache=backbone_cache,
                                      attention_mask=attention_mask, position_ids=position_ids,
                                      on_memory_keys=start_search if early else None)
        if position_ids is None:
            position_ids = torch.arange(position_offset, position_offset + T, device=self.device)[None]
        retrieve = None if bank is None else self._retriever(bank, states, input_ids, streams, previous_ids, prefetched,
                                                            predecessor_ids)
        sidenet = self._side_runner if self._side_runner is not None else self.sidenet
        key_mask = None if attention_mask is None else attention_mask.bool()
        logits, readout = sidenet(self.adapter, states, position_ids, side_caches, retrieve, key_mask)

        loss = None
        if labels is not None:
            scored = labels[:, 1:] != -100
            loss = next_token_nll(logits, labels, self.returns_log_probs).sum() / scored.sum()
        if update_memory:
            keys, values = self.memory_entries(input_ids, context_ids, states.memory_keys, states.memory_values)
            bank.add(keys, values, token_ids=input_ids, streams=streams)
        return LongMemOutput(logits, loss, states.memory_keys, states.memory_values, readout)

    def _retriever(self, bank: Memory, states: BackboneStates, input_ids, streams, previous_ids, prefetched=None,
                   predecessor_ids=None):
        """The memory layer's search: side query (B, Hq, T, D) -> MemoryRetrieval."""
        m = self.config.memory
        k, with_next = m.retrieve_chunks, self.config.read.mode == "next"
        B = input_ids.shape[0]
        if predecessor_ids is not None:
            query_prev = predecessor_ids.to(input_ids)  # (B, T) given: left-padded rows
        else:
            first = torch.full((B, 1), -1, dtype=input_ids.dtype, device=input_ids.device)
            if previous_ids is not None:
                first = previous_ids.reshape(B, 1).to(first)
            query_prev = torch.cat([first, input_ids[:, :-1]], dim=1)  # (B, T)

        def retrieve(side_q: torch.Tensor):
            if m.query == "backbone_key":
                # Each KV head's key searches once for the query heads that share it.
                vectors = states.memory_keys  # (B, T, Hkv, D)
            elif m.query == "backbone":
                vectors = states.memory_queries  # (B, T, Hq, D)
            else:
                vectors = side_q.transpose(1, 2)
            if prefetched and streams is None:
                retrieval = prefetched.pop("result")()  # the search started during the frozen pass
            else:
                retrieval = bank.search(vectors, k, streams, with_next=with_next)
            retrieval.query_prev_ids = query_prev
            return retrieval

        return retrieve

    def new_kv_cache(self):
        """An empty backbone KV cache whose every layer keeps all it is given, sliding-window layers
        too (the mask, not the cache, keeps them to their window): rows of a batch are padded,
        joined and trimmed alike in every layer, and a cache can be cropped back."""
        from transformers import DynamicCache

        return DynamicCache()

    def backbone_states(self, input_ids: torch.Tensor, cache=None) -> BackboneStates:
        """The frozen pass LongMem needs; its last hidden state also gives the backbone's own logits."""
        return self.adapter.run(input_ids, self._keep_layers, self.memory_layer, cache=cache)

    @torch.no_grad()
    def backbone_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The frozen backbone alone on (B, T): the baseline every LongMem figure is compared with."""
        self._check_input(input_ids, None)
        states = self.adapter.run(input_ids, [self.adapter.num_layers], self.memory_layer)
        return self.adapter.logits(states.hidden[-1])

    # ------------------------------------------------------------------ long documents and memory
    def segments(self, input_ids: torch.Tensor, window: int | None = None):
        """Split (B, N) into consecutive segments of at most `window` tokens."""
        window = window or self.config.memory.window
        for start in range(0, input_ids.shape[1], window):
            yield input_ids[:, start : start + window]

    def stream(self, input_ids: torch.Tensor, bank: Memory, streams=None, labels: bool = False, window=None):
        """Feed a long document segment by segment; each segment reads the memory of the previous ones.

        Yields one LongMemOutput per segment (with loss when labels=True).
        """
        self._check_input(input_ids, None)
        previous, start = None, 0
        for segment in self.segments(input_ids, window):
            yield self(segment, bank=bank, streams=streams, labels=segment if labels else None, update_memory=True,
                       previous_ids=previous, context_ids=self.memory_context(input_ids, start))
            previous, start = segment[:, -1], start + segment.shape[1]

    @property
    def sink_prefix_id(self) -> int:
        """The token a window's context is filled with where its document has nothing before it."""
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self.tokenizer, name, None) if self.tokenizer is not None else None
            if value is not None:
                return int(value)
        return 0

    def memory_context(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """(B, sink_tokens): what the window at `start` of (B, N) is encoded after: the tokens
        before it, filled up in front with `sink_prefix_id` at the document's start. The context
        lets memory keep a window's first tokens: in the window's own pass their keys are attention
        sinks (they match almost any query)."""
        sink = self.config.memory.sink_tokens
        before = input_ids[:, max(0, start - sink) : start]
        missing = sink - before.shape[1]
        if missing:
            fill = torch.full((input_ids.shape[0], missing), self.sink_prefix_id, dtype=input_ids.dtype,
                              device=input_ids.device)
            before = torch.cat([fill, before], dim=1)
        return before

    @torch.no_grad()
    def memory_entries(self, segment: torch.Tensor, context: torch.Tensor | None = None, keys: torch.Tensor | None = None,
                       values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What memory stores for segment (B, T): keys and values (B, T, Hkv, D) from its own pass
        (given, or run here), except its first `sink_tokens`, whose keys in that pass are attention
        sinks: theirs come from a short pass after the segment's context (B, sink_tokens)
        (`memory_context`; None: the segment starts its document). write_memory and the model's own
        reading of a document (forward with update_memory) store the same thing."""
        if keys is None:
            states = self.adapter.run(segment, [], self.memory_layer, stop_after_memory=True)
            keys, values = states.memory_keys, states.memory_values
        S = self.config.memory.sink_tokens
        n = min(S, segment.shape[1])
        if n == 0:
            return keys, values
        if context is None:
            context = self.memory_context(segment, 0)
        states = self.adapter.run(torch.cat([context, segment[:, :n]], dim=1), [], self.memory_layer,
                                  stop_after_memory=True)
        first_k, first_v = states.memory_keys[:, context.shape[1] :], states.memory_values[:, context.shape[1] :]
        return (torch.cat([first_k.to(keys.dtype), keys[:, n:]], dim=1),
                torch.cat([first_v.to(values.dtype), values[:, n:]], dim=1))

    @torch.no_grad()
    def write_memory(self, input_ids: torch.Tensor, bank: Memory, streams=None) -> None:
        """Encode (B, N) tokens into the bank with the frozen backbone alone, window by window; every
        token is stored (`memory_entries`), as the model's own reading of the text would store it.

        Memory holds backbone keys/values only, so writing it never needs the SideNet.
        """
        self._check_input(input_ids, None)
        self.check_memory(bank)
        for start in range(0, input_ids.shape[1], self.config.memory.window):
            segment = input_ids[:, start : start + self.config.memory.window]
            keys, values = self.memory_entries(segment, self.memory_context(input_ids, start))
            bank.add(keys, values, token_ids=segment, streams=streams)

    def encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer; pass token ids")
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return ids.to(self.device)

    def remember_text(self, text: str, bank: Memory, stream: int = 0) -> int:
        """Encode text with the frozen backbone into one stream of the bank; returns tokens added."""
        ids = self.encode(text)
        if ids.numel() == 0:
            raise InputError("the text is empty")
        self.write_memory(ids, bank, streams=[stream])
        return ids.shape[1]

    # ------------------------------------------------------------------ generation (generation.py)
    def generate(self, input_ids: torch.Tensor, bank: Memory | None = None, **kwargs):
        """Decode from prompts (B, P); see longmem.generation.generate for the settings."""
        from .generation import generate

        return generate(self, input_ids, bank, **kwargs)

    def generate_text(self, prompt: str, bank: Memory | None = None, **kwargs) -> str:
        if not prompt:
            raise InputError("the prompt is empty")
        return self.generate(self.encode(prompt), bank=bank, **kwargs).texts[0]

    def local_start(self, prompt_length: int) -> int:
        """Where generation's local context begins: everything before goes through memory in
        whole segments, the last (possibly whole) segment stays local."""
        window = self.config.memory.window
        return (prompt_length - 1) // window * window

    # ------------------------------------------------------------------ checkpoints
    def trainable_parameters(self):
        return [p for p in self.sidenet.parameters() if p.requires_grad]

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json + sidenet.safetensors, written to a temporary folder beside `directory` and
        renamed into place: a reader never sees half a checkpoint. An existing checkpoint there is
        replaced; a folder holding anything else is refused."""
        from safetensors.torch import save_file

        directory = Path(directory)
        refuse_non_checkpoint(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
        try:
            self.config.save(tmp / CONFIG_NAME)
            state = {k: v.detach().contiguous().cpu() for k, v in self.sidenet.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            replace_folder(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> "LongMem":
        """Load a checkpoint (see longmem.loading.load_model for the options)."""
        from .loading import load_model

        return load_model(checkpoint=directory, **kwargs)


def is_checkpoint(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


def refuse_non_checkpoint(directory: Path) -> None:
    """Writing a checkpoint replaces the folder: refuse one that holds anything but a checkpoint."""
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not is_checkpoint(directory):
        raise InputError(f"{directory} holds files that are not a LongMem checkpoint; "
                         "write the checkpoint to an empty or new folder")


def replace_folder(new: Path, target: Path) -> None:
    """Move folder `new` to `target`, replacing a checkpoint there with one rename each way."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
