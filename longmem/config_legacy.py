"""Reading a config.json written before the config had sections (one flat object of 29 fields).

Its settings map one to one onto the sections; the key centre it held as a JSON list becomes the
`key_center` weight (the loader puts it into the model). Experiments that were removed refuse to
load when a checkpoint used them, naming the field: their weights would be read wrongly."""

from __future__ import annotations

from .config import ConfigError

# flat name -> section.field
MOVED = {
    "backbone": "backbone.name", "backbone_revision": "backbone.revision", "gguf_file": "backbone.gguf_file",
    "backbone_fingerprint": "backbone.fingerprint", "model_type": "backbone.model_type",
    "num_backbone_layers": "backbone.num_layers",
    "reduction_factor": "sidenet.reduction_factor", "memory_layer": "sidenet.memory_layer", "side_init": "sidenet.init",
    "window": "memory.window", "chunk_size": "memory.chunk_size", "retrieve_tokens": "memory.retrieve_tokens",
    "memory_tokens": "memory.capacity_tokens", "memory_dtype": "memory.dtype", "sink_tokens": "memory.sink_tokens",
    "retrieval_query": "memory.query", "retrieval_metric": "memory.metric",
    "memory_read": "read.mode", "gate_init": "read.gate_init", "memory_scale_init": "read.scale_init",
    "memory_temperature_init": "read.temperature_init", "memory_prev_bonus_init": "read.prev_bonus_init",
    "memory_copy_init": "read.copy_init", "memory_copy_match_init": "read.copy_match_init",
}
# What the flat config meant when a field was absent (its defaults differ from today's).
DEFAULTS = {
    "backbone": "smollm2-135m-instruct", "backbone_revision": None, "gguf_file": None, "backbone_fingerprint": None,
    "model_type": None, "num_backbone_layers": None, "reduction_factor": 2, "memory_layer": None,
    "side_init": "zero", "gate_init": 0.0, "window": 512, "chunk_size": 4, "retrieve_tokens": 64,
    "memory_tokens": 65_536, "memory_dtype": "float16", "retrieval_query": "backbone_key",
    "retrieval_metric": "cosine", "memory_scale_init": 0.0, "sink_tokens": 4, "memory_read": "next",
    "memory_temperature_init": 20.0, "memory_prev_bonus_init": None, "memory_copy_init": None,
    "memory_copy_match_init": None,
}
# Removed experiments: the value that means "not used" (docs/research-log.md, "Tried and removed").
REMOVED = {"memory_confidence": False, "memory_copy_confidence_init": None, "memory_copy_gate_hidden": True,
           "extra": {}}


def upgrade(flat: dict) -> tuple[dict, list | None]:
    """A flat config -> (sectioned config dict, the key centre it held or None)."""
    unknown = sorted(set(flat) - set(MOVED) - set(REMOVED) - {"key_center"})
    if unknown:
        raise ConfigError(f"unknown LongMemConfig fields: {unknown}")
    for name, unused in REMOVED.items():
        if name in flat and flat[name] != unused:
            raise ConfigError(
                f"this checkpoint was trained with {name}={flat[name]!r}, an experiment that has been removed "
                "(docs/research-log.md, 'Tried and removed'); it cannot be loaded by this version"
            )
    data: dict = {"backbone": {}, "sidenet": {}, "memory": {}, "read": {}}
    for old, new in MOVED.items():
        section, _, name = new.partition(".")
        data[section][name] = flat.get(old, DEFAULTS[old])
    center = flat.get("key_center")
    # A raw-key checkpoint keeps raw keys; a centred one keeps its centre as a weight.
    data["memory"]["center_keys"] = center is not None
    return data, center
