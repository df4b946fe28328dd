"""LongMemConfig: everything needed to rebuild a LongMem model around its frozen backbone.

Four small sections, one per concern:

    backbone   which frozen model, and what was read off it when it was loaded
    sidenet    the trainable side network's shape and init
    memory     what memory holds and how it is searched
    read       how the memory layer reads what was found, and the copy head

`LongMemConfig()` is the measured best model (docs/results.md); `LongMemConfig.paper()` is the
paper's. A checkpoint is `config.json` (sections as JSON) plus the SideNet's weights, never the
backbone's; the key centre is a weight (a buffer in the weights file), not JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_BACKBONE = "smollm2-135m-instruct"
CONFIG_FORMAT = 2
SIDE_INITS = ("paper", "zero")
RETRIEVAL_QUERIES = ("side", "backbone", "backbone_key")
METRICS = ("ip", "cosine")
MEMORY_DTYPES = ("float32", "float16", "bfloat16")
READ_MODES = ("attend", "next")
PRESETS = ("default", "paper")


class ConfigError(ValueError):
    """A LongMem setting that cannot work; the message says which and why."""


@dataclass
class BackboneConfig:
    name: str = DEFAULT_BACKBONE  # alias, hub id or local folder
    revision: str | None = None
    gguf_file: str | None = None
    # Read off the loaded backbone; a checkpoint on another backbone is refused by its fingerprint.
    fingerprint: str | None = None
    model_type: str | None = None
    num_layers: int | None = None
    # The layers that attend over the whole context (Gemma 3 interleaves sliding-window ones);
    # memory is read in one of them. None: every layer.
    global_layers: list[int] | None = None


@dataclass
class SideNetConfig:
    reduction_factor: int = 2  # SideNet has L / r layers
    memory_layer: int | None = None  # backbone layer m (0-based); None keeps the paper's 17/24 ratio
    # "zero": copies of backbone layers scaled by a learned alpha starting at 0, so a fresh LongMem
    # equals its backbone; "paper": plain copies.
    init: str = "zero"


@dataclass
class MemoryConfig:
    window: int = 512  # local context (segment length); memory is encoded window by window
    # Tokens per memory chunk (csz). 1: every token is its own search key, so a fact's exact
    # tokens are found, not the mean of four neighbours.
    chunk_size: int = 1
    retrieve_tokens: int = 64  # K tokens read per query token and head (K / csz chunks)
    capacity_tokens: int = 65_536  # bank capacity per stream
    dtype: str = "float16"
    # The first positions of every encoded window act as attention sinks: their keys there match
    # almost any query. Memory stores these tokens with their keys from a short pass after the
    # tokens before them instead (LongMem.memory_entries).
    sink_tokens: int = 4
    # The vector that searches: the SideNet's memory-layer query ("side", the paper), the frozen
    # backbone's query ("backbone"), or the frozen backbone's key of the token itself
    # ("backbone_key": in a verbatim repeat it nearly equals the stored key of the original).
    query: str = "backbone_key"
    metric: str = "cosine"  # "ip" (the paper) or "cosine"
    # Subtract the mean memory-layer key (a weight, set by LongMem.calibrate_key_center) from every
    # key and search vector. Raw keys share a large common component, so raw cosines crowd near 1
    # and rare tokens drown among frequent ones. Training calibrates it on its corpus.
    center_keys: bool = True

    @property
    def retrieve_chunks(self) -> int:
        return self.retrieve_tokens // self.chunk_size


@dataclass
class ReadConfig:
    # "attend" (the paper): the side layer's query attends over the retrieved keys and reads their
    # values. "next": the search vector is matched to each retrieved key by cosine times a learned
    # per-head temperature, and the read takes the value of the token that *followed* the match:
    # the step an induction head makes in context.
    mode: str = "next"
    gate_init: float = 0.0  # per-head memory gate g; the mix is sigmoid(g)
    # None: the read is part of the memory layer's block (the paper), scaled by its alpha. A float:
    # the read enters the side stream on its own learned scale starting here, outside alpha, so that
    # with init "zero" the memory branch gets gradient from step 0.
    scale_init: float | None = 0.0
    temperature_init: float = 20.0  # "next": initial softmax temperature on cosines
    # "next": a learned per-head bonus, starting here, on a retrieved token whose predecessor is the
    # query's predecessor (a two-token match): one token's key cannot tell the two 4s of "60494"
    # apart; the token before each can. None: off.
    prev_bonus_init: float | None = 5.0
    # "next": also copy. The read's weights, put on the token id that followed each match and mixed
    # over heads, give p_copy; the output is (1 - g) p_model + g p_copy with g = sigmoid(u . h + b +
    # evidence), b starting here (a pointer-generator / kNN-LM step). The read reaches the hidden
    # state only as a value vector, which a small model can decode into the wrong digit even when
    # the read is exact; the copy cannot. None: off.
    copy_init: float | None = -6.0
    # The copy gate's evidence terms: each head's read-weighted cosine and the copy's peak (do the
    # reads agree on one next token), their weights starting at this total. Without them the gate
    # sees the hidden state alone and learns to stay shut (on prose a copy is usually wrong).
    copy_match_init: float | None = 4.0


@dataclass
class PassageConfig:
    """Passage recall (longmem/memory/passages.py): before a prompt's local window is read, the
    prompt's last tokens find the passages of memory that share their rare tokens, and those go
    at the front of the window, where the model reads them as context. No weight depends on it."""

    # Passages (blocks of memory) a prompt may bring into its window; 0: off. Off in the recipe: its
    # SmolLM2 model recalls less with them (its memory read, trained on facts never in its window,
    # outvotes the passage); a model that reads its window as its backbone does recalls far more
    # (4 for a fresh model on Gemma 3 270M; results.md § Passage recall).
    blocks: int = 0
    block: int = 32  # tokens a block holds; a passage is its block widened by `margin` each side
    margin: int = 48
    query_tokens: int = 32  # the prompt's last tokens that search
    # a block is a passage only where its vote is this many times the 16th-best block's: a prompt
    # that shares only common words with memory brings nothing into its window
    stand_out: float = 1.5
    # and at least this share of the best block's vote: the asked fact's block wins on the key words
    # the question names, and a fact of the same form that shares only the frame's words stays out
    # (chosen on training-side items: research/passage_search.py, results.md § Passage recall)
    near_best: float = 0.8


# Settings no weight depends on: they may differ from a checkpoint's (e.g. a longer memory, or a
# memory searched chunk by chunk). Every other setting is fixed by the weights it was trained with.
RUNTIME_SETTINGS = frozenset({"memory.window", "memory.chunk_size", "memory.retrieve_tokens",
                              "memory.capacity_tokens", "memory.dtype", "memory.sink_tokens"}
                             | {f"passages.{f.name}" for f in fields(PassageConfig)})
# Read off the backbone when a model is built: never set by hand.
DERIVED_SETTINGS = frozenset({"backbone.fingerprint", "backbone.model_type", "backbone.num_layers",
                              "backbone.global_layers"})


@dataclass
class LongMemConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    sidenet: SideNetConfig = field(default_factory=SideNetConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    passages: PassageConfig = field(default_factory=PassageConfig)

    @classmethod
    def paper(cls) -> "LongMemConfig":
        """The paper's settings: chunks of 4 searched by the SideNet's query by inner product, an
        attention read inside the memory layer's block, plain layer copies, raw keys, no copy head."""
        return cls(
            sidenet=SideNetConfig(init="paper"),
            memory=MemoryConfig(chunk_size=4, query="side", metric="ip", center_keys=False),
            read=ReadConfig(mode="attend", scale_init=None, prev_bonus_init=None, copy_init=None,
                            copy_match_init=None),
        )

    @classmethod
    def preset(cls, name: str) -> "LongMemConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.paper() if name == "paper" else cls()

    # --- derived ---
    @property
    def num_side_layers(self) -> int:
        if self.backbone.num_layers is None:
            raise ConfigError("the backbone's layer count is unknown until a backbone is attached")
        return self.backbone.num_layers // self.sidenet.reduction_factor

    @property
    def memory_side_layer(self) -> int:
        """Index of the SideNet layer that reads memory (initialised from backbone layer m)."""
        return (self.resolved_memory_layer + 1) // self.sidenet.reduction_factor - 1

    @property
    def resolved_memory_layer(self) -> int:
        if self.sidenet.memory_layer is not None:
            return self.sidenet.memory_layer
        # Paper: m = 17 of 24 layers, side layer 8 of 12 -> side layer round(2/3 * L_s).
        r = self.sidenet.reduction_factor
        side = round(self.num_side_layers * 2 / 3)
        side = min(max(side, 0), self.num_side_layers - 1)
        allowed = self._memory_layer_choices()
        if allowed:  # the global layer the SideNet copies nearest that point (the lower on a tie)
            return min(allowed, key=lambda j: (abs(j - (r * (side + 1) - 1)), j))
        return r * (side + 1) - 1

    def _memory_layer_choices(self) -> list[int]:
        """Backbone layers the SideNet copies that attend globally (empty: no such restriction known)."""
        g, L, r = self.backbone.global_layers, self.backbone.num_layers, self.sidenet.reduction_factor
        if g is None or L is None:
            return []
        return [j for j in g if (j + 1) % r == 0]

    # --- checks ---
    def validate(self) -> "LongMemConfig":
        s, m, r = self.sidenet, self.memory, self.read
        _choice("sidenet.init", s.init, SIDE_INITS)
        _choice("memory.query", m.query, RETRIEVAL_QUERIES)
        _choice("memory.metric", m.metric, METRICS)
        _choice("memory.dtype", m.dtype, MEMORY_DTYPES)
        _choice("read.mode", r.mode, READ_MODES)
        for name in ("prev_bonus_init", "copy_init", "copy_match_init"):
            if getattr(r, name) is not None and r.mode != "next":
                raise ConfigError(f"read.{name} needs read.mode='next'")
        if r.copy_match_init is not None and r.copy_init is None:
            raise ConfigError("read.copy_match_init needs read.copy_init (it is a term of the copy gate)")
        if not (isinstance(r.temperature_init, (int, float)) and r.temperature_init > 0):
            raise ConfigError(f"read.temperature_init must be positive, got {r.temperature_init!r}")
        for section, name in (("sidenet", "reduction_factor"), ("memory", "window"), ("memory", "chunk_size"),
                              ("memory", "retrieve_tokens"), ("memory", "capacity_tokens")):
            value = getattr(getattr(self, section), name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{section}.{name} must be a positive integer, got {value!r}")
        p = self.passages
        for name, least, kind in (("blocks", 0, "non-negative"), ("block", 1, "positive"), ("margin", 0, "non-negative"),
                                  ("query_tokens", 1, "positive")):
            value = getattr(p, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"passages.{name} must be a {kind} integer, got {value!r}")
        if not (isinstance(p.stand_out, (int, float)) and p.stand_out >= 1):
            raise ConfigError(f"passages.stand_out must be at least 1, got {p.stand_out!r}")
        if not (isinstance(p.near_best, (int, float)) and 0 <= p.near_best <= 1):
            raise ConfigError(f"passages.near_best must be between 0 and 1, got {p.near_best!r}")
        if isinstance(m.sink_tokens, bool) or not isinstance(m.sink_tokens, int) or not 0 <= m.sink_tokens < m.window:
            raise ConfigError(f"memory.sink_tokens must lie in [0, memory.window), got {m.sink_tokens!r}")
        for name in ("window", "retrieve_tokens", "capacity_tokens"):
            if getattr(m, name) % m.chunk_size:
                raise ConfigError(f"memory.{name} {getattr(m, name)} must be a multiple of memory.chunk_size "
                                  f"{m.chunk_size} (memory holds whole chunks)")
        L = self.backbone.num_layers
        if L is not None:
            if L % s.reduction_factor:
                raise ConfigError(
                    f"sidenet.reduction_factor {s.reduction_factor} must divide the backbone's {L} layers "
                    "(the cross-network residual pairs side layer l with backbone layer r*l)"
                )
            layer = self.resolved_memory_layer
            if not 0 <= layer < L:
                raise ConfigError(f"sidenet.memory_layer {layer} is out of range for a backbone with {L} layers")
            if (layer + 1) % s.reduction_factor:
                valid = [s.reduction_factor * (i + 1) - 1 for i in range(L // s.reduction_factor)]
                raise ConfigError(f"sidenet.memory_layer {layer} is not copied into the SideNet; choose one of {valid}")
            g = self.backbone.global_layers
            if g is not None and layer not in g:
                choices = self._memory_layer_choices()
                raise ConfigError(
                    f"sidenet.memory_layer {layer} attends only to a sliding window of its context; memory is read "
                    f"in a global-attention layer: choose one of {choices or g}"
                    + ("" if choices else " with a reduction_factor that copies it"))
        return self

    def with_overrides(self, overrides: dict | None, checkpoint: bool = False) -> "LongMemConfig":
        """A copy with `overrides` applied: {"memory.window": 256} or {"memory": {"window": 256}}.

        On a checkpoint (`checkpoint=True`) only RUNTIME_SETTINGS may change: every other setting
        is what its weights were trained with. The one place settings are checked, for every caller."""
        flat = flatten_overrides(overrides or {})
        data = self.to_dict()
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if section not in data or not isinstance(data[section], dict) or name not in data[section]:
                raise ConfigError(f"unknown setting {key!r}" + _did_you_mean(key))
            if key in DERIVED_SETTINGS:
                raise ConfigError(f"{key} is read off the backbone and cannot be set")
            if checkpoint and key not in RUNTIME_SETTINGS and value != data[section][name]:
                raise ConfigError(
                    f"{key} comes from the checkpoint's weights and cannot be changed on it "
                    f"(it is {data[section][name]!r}); settings that may change: {', '.join(sorted(RUNTIME_SETTINGS))}"
                )
            data[section][name] = _typed(key, value, data[section][name], section, name)
        return type(self).from_dict(data).validate()

    # --- serialisation ---
    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "LongMemConfig":
        if not isinstance(data, dict):
            raise ConfigError("a LongMem config must be a JSON object")
        if not isinstance(data.get("backbone"), dict):  # written before the config had sections
            from .config_legacy import upgrade

            data, _ = upgrade(data)
        data = {k: v for k, v in data.items() if k != "format"}
        sections = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"unknown LongMemConfig sections: {unknown}")
        built = {}
        for f in fields(cls):
            section_cls = _SECTIONS[f.name]
            values = data.get(f.name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"config section {f.name!r} must be an object")
            known = {g.name for g in fields(section_cls)}
            extra = sorted(set(values) - known)
            if extra:
                raise ConfigError(f"unknown settings in {f.name}: {extra}")
            built[f.name] = section_cls(**values)
        return cls(**built)

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


_SECTIONS = {"backbone": BackboneConfig, "sidenet": SideNetConfig, "memory": MemoryConfig, "read": ReadConfig,
             "passages": PassageConfig}


def setting_names() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in fields(cls)]


def flatten_overrides(overrides: dict) -> dict[str, Any]:
    """{"memory": {"window": 256}, "read.mode": "next"} -> {"memory.window": 256, "read.mode": "next"}."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"model overrides must be a mapping of settings, got {type(overrides).__name__}")
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and key in _SECTIONS:
            for name, v in value.items():
                flat[f"{key}.{name}"] = v
        else:
            flat[str(key)] = value
    return flat


def _did_you_mean(key: str) -> str:
    bare = key.rpartition(".")[2]
    matches = [n for n in setting_names() if n.endswith("." + bare)]
    return f"; did you mean {matches[0]!r}?" if matches else f"; settings are: {', '.join(setting_names())}"


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _typed(key: str, value, current, section: str, name: str):
    """Check an override's type against the field's declared type (a YAML or CLI value arrives untyped)."""
    declared = {f.name: f.type for f in fields(_SECTIONS[section])}[name]
    optional = "None" in str(declared)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    base = str(declared).replace(" | None", "")
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool)}.get(base, True)
    if not ok:
        raise ConfigError(f"{key} must be {'a ' + base if base != 'int' else 'an int'}, got {value!r}")
    return float(value) if base == "float" else value
