"""LongMemConfig: everything needed to rebuild a LongMem model around its frozen backbone.

JSON-serialisable (``to_dict`` / ``from_dict``) so that a checkpoint is ``config.json`` plus the
SideNet weights, never the backbone's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_BACKBONE = "smollm2-135m-instruct"
SIDE_INITS = ("paper", "zero")
RETRIEVAL_QUERIES = ("side", "backbone", "backbone_key")
MEMORY_DTYPES = ("float32", "float16", "bfloat16")
MEMORY_READS = ("attend", "next")
# Settings no SideNet weight's shape depends on: a trained checkpoint can be read or continued with
# others (with memory_copy_gate_hidden=False the copy gate's hidden-state weights stay but go unused).
CHECKPOINT_OVERRIDES = ("chunk_size", "retrieve_tokens", "memory_tokens", "key_center", "memory_copy_gate_hidden")
# Settings that add a weight: a checkpoint without it can be continued with one, starting at its init.
CHECKPOINT_ADDITIONS = {"memory_prev_bonus_init": "memory_prev_bonus", "memory_copy_init": "memory_copy",
                        "memory_copy_match_init": "match_gate", "memory_copy_confidence_init": "confidence_gate"}


class ConfigError(ValueError):
    """A LongMem setting that cannot work; the message says which and why."""


@dataclass
class LongMemConfig:
    # --- backbone (frozen) ---
    backbone: str = DEFAULT_BACKBONE  # alias, hub id or local folder
    backbone_revision: str | None = None
    gguf_file: str | None = None
    # Filled in from the loaded backbone; used to refuse a checkpoint on the wrong backbone.
    backbone_fingerprint: str | None = None
    model_type: str | None = None
    num_backbone_layers: int | None = None

    # --- SideNet ---
    reduction_factor: int = 2  # SideNet has L / r layers
    memory_layer: int | None = None  # backbone layer m (0-based); None keeps the paper's 17/24 ratio
    # "paper": copy backbone layers; "zero": copies scaled by alpha=0, so a fresh LongMem == its backbone
    side_init: str = "zero"
    gate_init: float = 0.0  # per-head memory gate g; the mix is sigmoid(g)

    # --- memory and retrieval ---
    window: int = 512  # local context (segment length)
    chunk_size: int = 4  # tokens per memory chunk (csz)
    retrieve_tokens: int = 64  # K tokens read per query token and head (K / csz chunks)
    memory_tokens: int = 65_536  # bank capacity per stream
    memory_dtype: str = "float16"
    # Which vector searches the bank: the SideNet's memory-layer query ("side", the paper), the
    # frozen backbone's query ("backbone"), or the frozen backbone's key of the token itself
    # ("backbone_key": in a verbatim repeat it nearly equals the stored key of the original).
    # Defaults are the measured best (docs/results.md); the paper's are "side" and "ip".
    retrieval_query: str = "backbone_key"
    retrieval_metric: str = "cosine"  # "ip" (the paper) or "cosine" between query and chunk key
    # None: the memory read is part of the memory layer's block (paper), scaled by its alpha.
    # A float: the read enters the side stream on its own learned scale starting here, outside
    # alpha, so that with side_init="zero" the memory branch gets gradient from step 0.
    memory_scale_init: float | None = 0.0
    # Tokens at the start of every encoded window that are not written to memory: the first
    # positions act as attention sinks and their keys match almost any query.
    sink_tokens: int = 4
    # How the memory layer reads what was retrieved. "attend" (the paper): the side layer's query
    # attends over the retrieved keys and reads their values. "next": the search query is matched
    # to each retrieved key by cosine times a learned per-head temperature, and the read takes the
    # value of the token that *followed* the match: the step an induction head makes in context.
    memory_read: str = "next"
    memory_temperature_init: float = 20.0  # "next" read: initial softmax temperature on cosines
    # "next" read: scale each head's gate by sigmoid(a_h * (best cosine - b_h)), learned a and b, so a
    # read is trusted when the match is close (a repeat) and muted when it is not (fresh text).
    memory_confidence: bool = False
    # "next" read: a learned per-head bonus, starting here, added to a retrieved token's read logit
    # when the token before it is the token before the query (a two-token match). One token's key
    # cannot tell the two 4s of "60494" apart; the token before each can. None: off.
    memory_prev_bonus_init: float | None = None
    # "next" read: also copy. The read's weights, put on the token id that followed each retrieved
    # token and mixed over heads by learned weights, give a copy distribution; the output is
    # (1 - g) * p_model + g * p_copy with g = sigmoid(w . h + b) per position, b starting here (a
    # pointer-generator / kNN-LM step). The read reaches the hidden state only as a value vector,
    # which a small model can decode into the wrong digit even when the read is exact. None: off.
    memory_copy_init: float | None = None
    # The copy gate also sees the read's evidence: g = sigmoid(u . h + b + sum_h m_h c_h + m_0 peak),
    # c_h the read-weighted cosine of head h, peak = max_v p_copy(v) (do the reads agree on one next
    # token); sum_h m_h and m_0 start here. Without it the gate sees the hidden state alone and learns
    # to stay shut (on prose a copy is usually wrong): a read that lands on the right digit 32k tokens
    # back then still loses to the model's own guess. None: off.
    memory_copy_match_init: float | None = None
    # False: the copy gate is b + the read's evidence alone, without u . h. Measured (run 13): with the
    # hidden state the gate learns to shut in every passkey-answer context (u . h -7 to -11 at the
    # digits), because at training distances the value path already writes the digit; it cannot
    # foresee the rare test positions where the value path fails and the read does not.
    memory_copy_gate_hidden: bool = True
    # The copy gate also sees how sure the model itself is: its logit adds w * max_v p_model(v), w
    # starting here (negative: the gate opens where the model is unsure). The hidden state cannot
    # tell whether the value path decoded the read; the model's own peak can. Measured (run 16): it
    # did not open the gate at the passkey digits the model misses (g 0.000 with p_model 0.11),
    # because u . h still learns to shut it wherever, in training, the model writes the digit. None: off.
    memory_copy_confidence_init: float | None = None
    # The mean memory-layer key per KV head, (Hkv, D), subtracted from every memory key and search
    # vector (set by LongMem.calibrate_key_center). Raw keys share a large common component (its
    # norm is ~90% of a key's on SmolLM2), so raw cosines crowd near 1 and rare tokens drown among
    # frequent ones. The "attend" read is unchanged by it (a softmax over memory alone ignores a
    # shift shared by all keys); search and the "next" read are not. None: raw keys.
    key_center: list | None = None

    extra: dict = field(default_factory=dict)

    def key_center_digest(self) -> str | None:
        """A short fingerprint of key_center: a memory built with another centre cannot be searched."""
        if self.key_center is None:
            return None
        data = np.asarray(self.key_center, dtype=np.float32).tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    @property
    def retrieve_chunks(self) -> int:
        return self.retrieve_tokens // self.chunk_size

    @property
    def num_side_layers(self) -> int:
        if self.num_backbone_layers is None:
            raise ConfigError("num_backbone_layers is unknown until a backbone is attached")
        return self.num_backbone_layers // self.reduction_factor

    @property
    def memory_side_layer(self) -> int:
        """Index of the SideNet layer that reads memory (initialised from backbone layer m)."""
        return (self.resolved_memory_layer + 1) // self.reduction_factor - 1

    @property
    def resolved_memory_layer(self) -> int:
        if self.memory_layer is not None:
            return self.memory_layer
        # Paper: m = 17 of 24 layers, side layer 8 of 12 -> side layer round(2/3 * L_s).
        side = round(self.num_side_layers * 2 / 3)
        side = min(max(side, 0), self.num_side_layers - 1)
        return self.reduction_factor * (side + 1) - 1

    def validate(self) -> "LongMemConfig":
        if self.side_init not in SIDE_INITS:
            raise ConfigError(f"side_init must be one of {SIDE_INITS}, got {self.side_init!r}")
        if self.retrieval_query not in RETRIEVAL_QUERIES:
            raise ConfigError(f"retrieval_query must be one of {RETRIEVAL_QUERIES}, got {self.retrieval_query!r}")
        if self.retrieval_metric not in ("ip", "cosine"):
            raise ConfigError(f"retrieval_metric must be 'ip' or 'cosine', got {self.retrieval_metric!r}")
        if self.memory_read not in MEMORY_READS:
            raise ConfigError(f"memory_read must be one of {MEMORY_READS}, got {self.memory_read!r}")
        for name in ("memory_prev_bonus_init", "memory_copy_init", "memory_copy_match_init",
                     "memory_copy_confidence_init"):
            if getattr(self, name) is not None and self.memory_read != "next":
                raise ConfigError(f"{name} needs memory_read='next'")
        for name in ("memory_copy_match_init", "memory_copy_confidence_init"):
            if getattr(self, name) is not None and self.memory_copy_init is None:
                raise ConfigError(f"{name} needs memory_copy_init (it is a term of the copy gate)")
        if not self.memory_copy_gate_hidden and self.memory_copy_match_init is None:
            raise ConfigError("memory_copy_gate_hidden=False needs memory_copy_match_init (the gate would be a constant)")
        if not (isinstance(self.memory_temperature_init, (int, float)) and self.memory_temperature_init > 0):
            raise ConfigError(f"memory_temperature_init must be positive, got {self.memory_temperature_init!r}")
        if self.memory_dtype not in MEMORY_DTYPES:
            raise ConfigError(f"memory_dtype must be one of {MEMORY_DTYPES}, got {self.memory_dtype!r}")
        for name in ("reduction_factor", "window", "chunk_size", "retrieve_tokens", "memory_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.sink_tokens, int) or not 0 <= self.sink_tokens < self.window:
            raise ConfigError(f"sink_tokens must lie in [0, window), got {self.sink_tokens!r}")
        if self.window % self.chunk_size:
            raise ConfigError(
                f"chunk_size {self.chunk_size} must divide the local window {self.window} "
                "so that every segment writes whole chunks to memory"
            )
        if self.retrieve_tokens % self.chunk_size:
            raise ConfigError(
                f"retrieve_tokens {self.retrieve_tokens} must be a multiple of chunk_size {self.chunk_size}"
            )
        if self.memory_tokens % self.chunk_size:
            raise ConfigError(f"memory_tokens {self.memory_tokens} must be a multiple of chunk_size {self.chunk_size}")
        if self.num_backbone_layers is not None:
            L, r = self.num_backbone_layers, self.reduction_factor
            if L % r:
                raise ConfigError(
                    f"reduction_factor {r} must divide the backbone's {L} layers "
                    "(the cross-network residual pairs side layer l with backbone layer r*l)"
                )
            m = self.resolved_memory_layer
            if not 0 <= m < L:
                raise ConfigError(f"memory_layer {m} is out of range for a backbone with {L} layers (0..{L - 1})")
            if (m + 1) % r:
                valid = [r * (i + 1) - 1 for i in range(L // r)]
                raise ConfigError(
                    f"memory_layer {m} is not copied into the SideNet (side layer i copies backbone layer "
                    f"{r}*(i+1)-1); choose one of {valid}"
                )
        return self

    def override_checkpoint_settings(self, settings: dict) -> "LongMemConfig":
        """Change CHECKPOINT_OVERRIDES and CHECKPOINT_ADDITIONS settings in place (a clear error for any
        other). `LongMem.from_pretrained(..., overrides=)` calls it before building the SideNet, so an
        addition's weight exists."""
        allowed = CHECKPOINT_OVERRIDES + tuple(CHECKPOINT_ADDITIONS)
        fixed = sorted(set(settings) - set(allowed))
        if fixed:
            raise ConfigError(f"{', '.join(fixed)} come from the checkpoint and cannot be changed on it; "
                              f"only {', '.join(allowed)} can")
        for name, value in settings.items():
            setattr(self, name, value)
        return self.validate()

    # --- serialisation ---
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LongMemConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LongMemConfig fields: {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LongMemConfig":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no LongMem config at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)
