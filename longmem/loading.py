"""The one way to get a LongMem model: from a checkpoint, or a fresh SideNet on a backbone.

    model = load_model()                                   # the recipe on the default backbone
    model = load_model(preset="paper")                     # the paper's settings
    model = load_model(checkpoint="ckpt/", overrides={"memory.capacity_tokens": 262_144})

Every caller (the CLI, jobs, evaluation, serving, training, the memory encoder) comes here, so a
setting is checked by the same rules everywhere: on a checkpoint only the settings no weight
depends on may change (config.RUNTIME_SETTINGS); anything else is a clear error.
`ModelSource` is the typed model section of job and serve configs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .backbone import BackboneError, load_backbone, same_backbone
from .config import DEFAULT_BACKBONE, PRESETS, ConfigError, LongMemConfig, flatten_overrides
from .model import CONFIG_NAME, WEIGHTS_NAME, LongMem, is_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def inference_dtype(device: str | torch.device, fallback: str = "float32") -> str:
    """The precision to serve in on `device`: bfloat16 on CUDA (float16 where it lacks bfloat16),
    and on CPUs with bfloat16 matrix units (AMX or AVX512-BF16), where a decoding step of several
    rows costs little more than one row's (docs/results.md); else `fallback`."""
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bfloat16" if native and torch.backends.mkldnn.is_available() else fallback


@dataclass
class ModelSource:
    """Where a model comes from, as jobs and the server name it (YAML / JSON friendly)."""

    checkpoint: str | None = None  # a LongMem checkpoint folder; None: a fresh SideNet on `backbone`
    backbone: str = DEFAULT_BACKBONE  # a fresh model's backbone (a checkpoint names its own)
    preset: str = "default"  # a fresh model's settings: "default" (the recipe) or "paper"
    overrides: dict = field(default_factory=dict)  # {"memory.window": 256} or {"memory": {"window": 256}}
    dtype: str = "float32"  # the backbone's and SideNet's precision ("bfloat16" on GPUs)

    def validate(self) -> "ModelSource":
        """Check everything that can be checked without loading weights."""
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.config()
        return self

    def config(self) -> LongMemConfig:
        """The configuration this source loads (overrides applied and checked)."""
        if self.checkpoint:
            if self.preset != "default":
                raise ConfigError("a preset chooses a fresh model's settings; a checkpoint has its own")
            config, _ = read_checkpoint_config(self.checkpoint)
            return config.with_overrides(self.overrides, checkpoint=True)
        config = LongMemConfig.preset(self.preset)
        config.backbone.name = self.backbone
        return config.with_overrides(self.overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "ModelSource":
        if data is None:
            return cls()
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"the model section must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ConfigError(f"unknown model settings {unknown}; the model section has "
                              f"{', '.join(cls.__dataclass_fields__)} (model settings go under overrides)")
        return cls(**data)


def read_checkpoint_config(checkpoint: str | Path) -> tuple[LongMemConfig, list | None]:
    """A checkpoint's config, and the key centre an older config.json held as JSON (or None)."""
    directory = Path(checkpoint)
    if not is_checkpoint(directory):
        raise ConfigError(f"{directory} is not a LongMem checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        data = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{directory / CONFIG_NAME} is not valid JSON: {e}") from None
    legacy_center = None
    if isinstance(data, dict) and not isinstance(data.get("backbone"), dict):
        from .config_legacy import upgrade

        data, legacy_center = upgrade(data)
    return LongMemConfig.from_dict(data), legacy_center


def load_model(
    checkpoint: str | Path | None = None,
    backbone: str | torch.nn.Module | None = None,
    overrides: dict | None = None,
    preset: str = "default",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tokenizer=None,
) -> LongMem:
    """A LongMem model from `checkpoint`, or a fresh SideNet (the `preset`'s settings) on `backbone`.

    `backbone` is a name (alias, hub id, local folder) or an already loaded HF model (then pass its
    `tokenizer` too); a checkpoint loads its own backbone by name unless one is given, and refuses a
    backbone other than the one it was trained on (by fingerprint, in any precision)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if checkpoint is not None:
        return _from_checkpoint(Path(checkpoint), backbone, tokenizer, overrides, device, dtype)
    config = LongMemConfig.preset(preset)
    if isinstance(backbone, str) or backbone is None:
        config.backbone.name = backbone or DEFAULT_BACKBONE
    config = config.with_overrides(overrides)
    model_in = backbone if isinstance(backbone, torch.nn.Module) else None
    if model_in is None:
        model_in, tokenizer = load_backbone(config.backbone.name, config.backbone.revision, config.backbone.gguf_file,
                                            dtype=dtype, device=device)
    return LongMem(model_in, config, tokenizer).to(device=device, dtype=dtype)


def _from_checkpoint(directory: Path, backbone, tokenizer, overrides, device, dtype) -> LongMem:
    from safetensors.torch import load_file

    config, legacy_center = read_checkpoint_config(directory)
    config = config.with_overrides(overrides, checkpoint=True)
    if not isinstance(backbone, torch.nn.Module):
        b = config.backbone
        backbone, tokenizer = load_backbone(b.name, b.revision, b.gguf_file, dtype=dtype, device=device)
    recorded = config.backbone.fingerprint
    if recorded and not same_backbone(recorded, backbone):
        hint = ""
        if not recorded.startswith("v2-") and next(backbone.parameters()).dtype != torch.float32:
            hint = ("; this checkpoint's fingerprint is of an earlier format, which only a float32 load can "
                    "check: load it in float32 once and save it again")
        raise BackboneError(
            f"checkpoint {directory} was trained on backbone {config.backbone.name!r} (fingerprint {recorded}) "
            "but the backbone given is another model; a SideNet only works with the frozen backbone it was "
            f"adapted to{hint}"
        )
    config.backbone.fingerprint = None  # recomputed in today's format
    model = LongMem(backbone, config, tokenizer)
    state = load_file(str(directory / WEIGHTS_NAME))
    if "key_center" not in state:  # written when the centre lived in config.json
        center = torch.zeros_like(model.sidenet.key_center) if legacy_center is None else torch.tensor(legacy_center)
        state["key_center"] = center.float()
    for name, param in model.sidenet.state_dict().items():
        if name.endswith(".memory_rerank") and name not in state:  # written before the re-ranking map:
            state[name] = param  # identity, which reads exactly as those models did
    missing, unexpected = model.sidenet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint weights do not match the SideNet: missing {missing}, unexpected {unexpected}")
    model._sync_key_center()
    return model.to(device=device, dtype=dtype)


def load_source(source: ModelSource | dict | None, device: str | torch.device = "cpu") -> LongMem:
    """load_model for a job's or the server's model section."""
    source = ModelSource.from_dict(source).validate()
    return load_model(checkpoint=source.checkpoint, backbone=None if source.checkpoint else source.backbone,
                      overrides=flatten_overrides(source.overrides), preset=source.preset, device=device,
                      dtype=source.dtype)
