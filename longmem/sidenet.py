"""SideNet: the trainable side network that reads a frozen backbone (LongMem §3.2).

Side layer i is a copy of backbone layer r*(i+1)-1. With H^j the backbone state after j layers,
the cross-network residual is

    S^0 = H^0,   S^l = S^{l-1} + Block_l(S^{l-1}) + (H^{r*l} - H^{r*(l-1)})

computed through the deviation D^l = S^l - H^{r*l}:  D^l = D^{l-1} + alpha_l * Block_l(H^{r*(l-1)} + D^{l-1}),
where Block_l(x) is the layer's update (attention + MLP outputs, *without* the residual input, which
an HF decoder layer adds itself). alpha_l = 1 for the paper's init; for sidenet.init="zero" it is a
learned scalar starting at 0, so that at step 0 S^{L_s} = H^L exactly and LongMem's logits are the
backbone's.

One layer (the copy of the backbone's memory layer m) attends jointly to its local causal context
and to the chunks retrieved from memory: two softmaxes per head mixed by sigmoid(g_h).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BackboneAdapter, BackboneStates
from .config import LongMemConfig
from .memory import MemoryRetrieval


@dataclass
class LayerCache:
    """Post-positional keys/values of one side layer's local context: (B, Hkv, T, D)."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


@dataclass
class MemoryReadout:
    """What the memory layer read, for traces and metrics."""

    retrieval: MemoryRetrieval
    weights: torch.Tensor  # (B, Hq, T, K) attention over retrieved tokens (0 where empty)
    gate: torch.Tensor  # (B, Hq, T) effective mix weight on memory (0 where nothing retrieved)
    # "next" read: how exactly what was read matches the query, the read-weighted cosine in [-1, 1]
    # (0 where a head read nothing). The copy head's gate can open on it.
    match: torch.Tensor | None = None  # (B, Hq, T)
    copy_gate: torch.Tensor | None = None  # (B, T) the copy head's g (set by it; 0 where nothing was read)

    @property
    def has_memory(self) -> torch.Tensor:
        """(B, Hq, T) True where a query head's search retrieved something."""
        return self.retrieval.has_memory.repeat_interleave(self.gate.shape[1] // self.retrieval.num_heads, dim=1)


def _by_group(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hq, ...) -> (B, H, G, ...): the query heads that share each of a retrieval's H heads."""
    return x.reshape(x.shape[0], heads, x.shape[1] // heads, *x.shape[2:])


def memory_attention(q, retrieval: MemoryRetrieval, scale: float):
    """Attention of each query token over its own retrieved tokens, no positions.

    q (B, Hq, T, D) pre-positional; the retrieval has H heads, each shared by Hq / H query heads.
    Returns out (B, Hq, T, D), weights (B, Hq, T, K)."""
    B, Hq, T, D = q.shape
    H = retrieval.num_heads
    keys = retrieval.keys.to(q.dtype)  # (B, H, T, K, D)
    logits = torch.einsum("bhgtd,bhtkd->bhgtk", _by_group(q, H), keys).reshape(B, Hq, T, -1) * scale
    mask = retrieval.token_mask.repeat_interleave(Hq // H, dim=1)  # (B, Hq, T, K)
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")).float(), dim=-1)
    weights = torch.where(mask, weights, torch.zeros_like(weights)).to(q.dtype)  # no NaN rows
    out = torch.einsum("bhgtk,bhtkd->bhgtd", _by_group(weights, H), retrieval.values.to(q.dtype))
    return out.reshape(B, Hq, T, D), weights


def retrieval_cosine(retrieval: MemoryRetrieval, rerank: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, T, K): cosine of each search vector with each token it retrieved, both first mapped by
    `rerank` (H, D, D) where given."""
    q, keys = retrieval.queries.float(), retrieval.keys.float()  # (B, H, T, D), (B, H, T, K, D)
    if rerank is not None:
        rerank = rerank.float()
        q = torch.einsum("bhtd,hde->bhte", q, rerank)
        keys = torch.einsum("bhtkd,hde->bhtke", keys, rerank)
    return torch.einsum("bhtd,bhtkd->bhtk", F.normalize(q, dim=-1), F.normalize(keys, dim=-1))


def next_token_read(retrieval: MemoryRetrieval, temperature: torch.Tensor, prev_bonus: torch.Tensor | None = None,
                    rerank: torch.Tensor | None = None):
    """Match each search vector to the retrieved keys by cosine; read the value of the token after the match.

    temperature (Hq,); prev_bonus (Hq,) is added where a retrieved token's predecessor is the query's.
    rerank (H, D, D) maps search vector and keys before the cosine: the search itself is the frozen
    backbone's, and this learnt map (identity at first) is what can tell apart retrieved tokens whose
    backbone keys are alike, such as the same sentence frame naming two different things.
    The retrieval's H heads are broadcast to the Hq query heads (each group shares its search).
    Returns out (B, Hq, T, D), weights (B, Hq, T, K) over the matched tokens, and the read-weighted
    cosine (B, Hq, T): near 1 where the read lands on tokens whose keys equal the query's.
    """
    Hq, H = temperature.shape[0], retrieval.num_heads
    G = Hq // H
    mask = (retrieval.token_mask & retrieval.next_mask).repeat_interleave(G, dim=1)  # (B, Hq, T, K)
    cos = retrieval_cosine(retrieval, rerank).repeat_interleave(G, dim=1)
    logits = cos * temperature.float()[None, :, None, None]
    if prev_bonus is not None and retrieval.prev_token_ids is not None and retrieval.query_prev_ids is not None:
        query_prev = retrieval.query_prev_ids[:, None, :, None]  # (B, 1, T, 1)
        same = (retrieval.prev_token_ids == query_prev) & (query_prev >= 0)  # (B, H, T, K)
        logits = logits + prev_bonus.float()[None, :, None, None] * same.repeat_interleave(G, dim=1)
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    values = retrieval.next_values  # (B, H, T, K, D)
    out = torch.einsum("bhgtk,bhtkd->bhgtd", _by_group(weights.to(values.dtype), H), values)
    B, _, _, T, D = out.shape
    return out.reshape(B, Hq, T, D), weights, (weights * cos.masked_fill(~mask, 0.0)).sum(-1)


def id_totals(ids: torch.Tensor, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., N) token ids and their masses -> the total mass of each entry's id in its row (..., N),
    i.e. p_copy(id) gathered back at every entry, without a vocabulary-sized tensor; and whether each
    entry is the first of its id in its row (..., N) bool, one representative per id."""
    sorted_ids, order = ids.sort(dim=-1, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    segment = starts.long().cumsum(-1) - 1  # (..., N) which run of equal ids each sorted entry is in
    sums = torch.zeros_like(mass).scatter_add_(-1, segment, mass.gather(-1, order))
    totals = torch.empty_like(mass).scatter_(-1, order, sums.gather(-1, segment))
    return totals, torch.empty_like(starts).scatter_(-1, order, starts)


class MemoryCopy(nn.Module):
    """Mix the LM's next-token distribution with a copy of what memory says comes next.

    p_copy(v) = sum_h a_h sum_k w_hk [next id_hk = v] (a = softmax of learned head weights over the
    heads that read something); out = log((1 - g) p_model + g p_copy), g = sigmoid(u . h + b + e).
    With evidence weights, e = sum_h m_h c_h + m_0 max_v p_copy(v): how exactly each head's read
    matches its query (c_h, the read-weighted cosine) and how much the reads agree on one next
    token, evidence the hidden state lacks about a read made 32k tokens away.
    Where nothing was read the output is exactly log_softmax(logits), as without memory.
    """

    def __init__(self, hidden_size: int, num_heads: int, gate_init: float, match_init: float | None = None):
        super().__init__()
        self.head_logits = nn.Parameter(torch.zeros(num_heads))
        self.gate = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.gate.weight.zero_()
            self.gate.bias.fill_(gate_init)
        # (Hq + 1,): per-head cosine weights summing to match_init, then the copy peak's weight match_init:
        # an exact read that all heads agree on adds 2 * match_init to the gate logit
        self.match_gate = None
        if match_init is not None:
            init = torch.full((num_heads + 1,), float(match_init) / num_heads)
            init[-1] = float(match_init)
            self.match_gate = nn.Parameter(init)

    def gate_logit(self, hidden: torch.Tensor, readout: MemoryReadout, copy_peak: torch.Tensor) -> torch.Tensor:
        """(B, T, 1) logit of g. copy_peak (B, T): max_v p_copy(v). The evidence enters as features
        only (detached): the gate learns when to trust a read, not to change the read."""
        z = F.linear(hidden.float(), self.gate.weight.float(), self.gate.bias.float())
        if self.match_gate is not None and readout.match is not None:
            m = self.match_gate.float()
            z = z + ((readout.match.detach().float() * m[None, :-1, None]).sum(1) + m[-1] * copy_peak.detach())[..., None]
        return z

    def entries(self, readout: MemoryReadout):
        """What the copy reads: next-token ids (B, T, N), their copy mass (B, T, N) (N = Hq * K,
        summing to 1 over a position's entries where any head read), and whether any head read (B, T)."""
        weights = readout.weights.float()  # (B, Hq, T, K)
        B, Hq, T, K = weights.shape
        ids = readout.retrieval.next_token_ids.repeat_interleave(Hq // readout.retrieval.num_heads, dim=1)
        weights = torch.where(ids >= 0, weights, torch.zeros((), device=ids.device))
        read = weights.sum(-1) > 0  # (B, Hq, T)
        heads = torch.softmax(self.head_logits.float(), 0)[None, :, None] * read
        heads = heads / heads.sum(1, keepdim=True).clamp_min(1e-12)  # (B, Hq, T), sums to 1 where read
        mass = (weights * heads[..., None]).permute(0, 2, 1, 3).reshape(B, T, Hq * K)
        return ids.permute(0, 2, 1, 3).reshape(B, T, Hq * K), mass, read.any(1)

    def parts(self, hidden: torch.Tensor, logits: torch.Tensor, readout: MemoryReadout):
        """The mix's parts as full distributions (for traces): log p_model (B, T, V), p_copy
        (B, T, V), gate logit z (B, T, 1), and whether any head read something (B, T)."""
        log_model = torch.log_softmax(logits.float(), dim=-1)
        ids, mass, read = self.entries(readout)
        p_copy = torch.zeros_like(log_model).scatter_add_(-1, ids.clamp_min(0), mass)
        return log_model, p_copy, self.gate_logit(hidden, readout, p_copy.max(-1).values), read

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor, readout: MemoryReadout | None) -> torch.Tensor:
        """hidden (B, T, C), logits (B, T, V) -> log-probabilities (B, T, V)."""
        dtype, logits = logits.dtype, logits.float()
        if readout is None or readout.retrieval.next_token_ids is None:
            return torch.log_softmax(logits, dim=-1).to(dtype)
        # p_copy is zero outside the few ids memory read: there the mix is log(1 - g) + log p_model,
        # so only those ids need the two-term mix (no vocabulary-sized copy distribution).
        ids, mass, read = self.entries(readout)
        if not bool(read.any()):  # nothing was read: exactly the model's own distribution
            readout.copy_gate = torch.zeros(read.shape, device=read.device)
            return torch.log_softmax(logits, dim=-1).to(dtype)
        norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # log p_model = logits - norm
        copy, first = id_totals(ids, mass)  # (B, T, N) p_copy at each entry's id; one entry per id
        z = self.gate_logit(hidden, readout, copy.max(-1).values)
        readout.copy_gate = torch.where(read, torch.sigmoid(z[..., 0]), torch.zeros((), device=z.device)).detach()
        keep = torch.where(read[..., None], F.logsigmoid(-z), torch.zeros((), device=z.device))  # (B, T, 1)
        index = ids.clamp_min(0)
        base = keep + logits.gather(-1, index) - norm  # (B, T, N) log((1 - g) p_model) at the read ids
        # log((1 - g) p + g c) in log space: stable where p or c is tiny and where g saturates
        mixed = torch.logaddexp(base, F.logsigmoid(z) + copy.clamp_min(1e-30).log())
        # One pass over the vocabulary: log(1 - g) + log p_model, then each read id's mix added at
        # one entry of that id (the others add 0). The mix is never below the first term; the max
        # keeps it so where rounding says otherwise. An added difference, not a scatter-max over
        # the vocabulary, so the backward pass is a gather of the few read ids.
        out = logits - (norm - keep)
        delta = torch.where(read[..., None] & (ids >= 0) & (copy > 0) & first, torch.maximum(mixed, base) - base,
                            torch.zeros((), device=mixed.device))
        return out.scatter_add(-1, index, delta).to(dtype)


class SideLayer(nn.Module):
    def __init__(self, adapter: BackboneAdapter, backbone_layer: int, config: LongMemConfig, memory_layer: bool):
        super().__init__()
        self.block = copy.deepcopy(adapter.layers[backbone_layer])
        for p in self.block.parameters():
            p.requires_grad_(True)
        self.backbone_layer = backbone_layer
        self.is_memory_layer = memory_layer
        read = config.read
        self.alpha = nn.Parameter(torch.zeros(())) if config.sidenet.init == "zero" else None
        self.memory_scale = None
        self.memory_prev_bonus = None
        self.memory_rerank = None
        self.memory_read = read.mode
        self.value_read = True  # False: the read still happens (the copy head sees it) but adds nothing to the stream
        if memory_layer:
            heads = adapter.num_heads
            if read.mode == "next":  # log-parametrised: stays positive
                self.memory_temperature = nn.Parameter(torch.full((heads,), float(read.temperature_init)).log())
                if read.prev_bonus_init is not None:
                    self.memory_prev_bonus = nn.Parameter(torch.full((heads,), float(read.prev_bonus_init)))
                eye = torch.eye(adapter.head_dim)
                self.memory_rerank = nn.Parameter(eye.repeat(adapter.num_kv_heads, 1, 1))  # (Hkv, D, D)
            self.gate = nn.Parameter(torch.full((heads,), float(read.gate_init)))
            if read.scale_init is not None:
                self.memory_scale = nn.Parameter(torch.tensor(float(read.scale_init)))

    def forward(
        self,
        adapter: BackboneAdapter,
        x: torch.Tensor,  # (B, T, C)
        position_ids: torch.Tensor,  # (1, T) or (B, T)
        cache: LayerCache | None = None,
        retrieve: Callable[[torch.Tensor], MemoryRetrieval | None] | None = None,
        key_mask: torch.Tensor | None = None,  # (B, past + T) False on padding (batched decoding)
    ) -> tuple[torch.Tensor, MemoryReadout | None, torch.Tensor | None]:
        """Returns the layer's update Block(x) (B, T, C), what the memory layer read, and, with a
        separate memory scale, the memory read's own update (B, T, C) to add outside alpha."""
        B, T, _ = x.shape
        norm_in, out_proj = adapter.attention_parts(self.block)[:2]
        scale = adapter.attention_scale(self.backbone_layer)

        q, k, v = adapter.project_qkv(self.block, norm_in(x))  # (B, T, H, D) each, no positions yet
        q_plain = q.transpose(1, 2)  # (B, Hq, T, D)
        q, k = adapter.apply_positions(q_plain, k.transpose(1, 2), position_ids, self.backbone_layer)
        v = v.transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            if past:
                k = torch.cat([cache.keys, k], dim=2)
                v = torch.cat([cache.values, v], dim=2)
            cache.keys, cache.values = k, v
        if key_mask is not None:
            causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            mask = causal[None, None] & key_mask[:, None, None, :]  # (B, 1, T, past + T)
            # A padding position sees itself: a query with no key at all would give NaN, which a
            # zero attention weight on it later would not cancel.
            mask = mask | torch.eye(T, past + T, dtype=torch.bool, device=x.device).roll(past, dims=1)[None, None]
            local = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        elif T == 1:
            local = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        elif past == 0:
            local = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            local = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        # local: (B, Hq, T, D)

        readout, memory_update, match = None, None, None
        retrieval = retrieve(q_plain) if (self.is_memory_layer and retrieve is not None) else None
        if retrieval is not None:
            if self.memory_read == "next":
                remembered, weights, match = next_token_read(retrieval, self.memory_temperature.exp(),
                                                             self.memory_prev_bonus, self.memory_rerank)
                remembered = remembered.to(local.dtype)
                has = (retrieval.token_mask & retrieval.next_mask).any(-1)  # (B, H, T)
            else:
                remembered, weights = memory_attention(q_plain, retrieval, scale)
                has = retrieval.has_memory  # (B, H, T)
            has = has.repeat_interleave(self.gate.shape[0] // retrieval.num_heads, dim=1)  # (B, Hq, T)
            gate = torch.sigmoid(self.gate).to(local.dtype)[None, :, None].expand(B, -1, T)
            gate = torch.where(has, gate, torch.zeros_like(gate))  # nothing retrieved: exactly the local layer
            readout = MemoryReadout(retrieval, weights, gate, match)
            if self.value_read:
                memory_part = gate[..., None] * (remembered - local)  # (B, Hq, T, D)
                if self.memory_scale is None:
                    local = local + memory_part
                else:  # the read goes straight to the side stream on its own scale (SideNet adds it),
                    # through the plain output projection: a norm after it (Gemma's) would undo the gate
                    memory_update = self.memory_scale.to(local.dtype) * out_proj(memory_part.transpose(1, 2).reshape(B, T, -1))

        attn_out = adapter.attention_output(self.block, local.transpose(1, 2).reshape(B, T, -1))
        mlp_out = adapter.feed_forward(self.block, x + attn_out)
        return attn_out + mlp_out, readout, memory_update


class SideNet(nn.Module):
    def __init__(self, adapter: BackboneAdapter, config: LongMemConfig):
        super().__init__()
        r, n = config.sidenet.reduction_factor, config.num_side_layers
        self.backbone_layers = [r * (i + 1) - 1 for i in range(n)]
        self.memory_side_layer = config.memory_side_layer
        self.layers = nn.ModuleList(
            SideLayer(adapter, j, config, memory_layer=(i == self.memory_side_layer))
            for i, j in enumerate(self.backbone_layers)
        )
        self.final_norm = copy.deepcopy(adapter.final_norm)
        for p in self.final_norm.parameters():
            p.requires_grad_(True)
        self.memory_copy = None
        if config.read.copy_init is not None:
            self.memory_copy = MemoryCopy(adapter.hidden_size, adapter.num_heads, config.read.copy_init,
                                          config.read.copy_match_init)
        # The mean memory-layer key, subtracted from every memory key and search vector when the
        # config centres keys (LongMem.calibrate_key_center sets it). A weight, kept in float32.
        self.register_buffer("key_center", torch.zeros(adapter.num_kv_heads, adapter.head_dim))

    @property
    def memory_layer(self) -> SideLayer:
        return self.layers[self.memory_side_layer]

    def identity_layers(self) -> set[int]:
        """Side layers whose update is exactly zero here (alpha = 0, not the memory layer, and alpha is
        not being trained): skipping them leaves the output unchanged. Training only the layers from
        the memory layer up leaves the ones below at alpha = 0, so a trained model skips them too."""
        training = torch.is_grad_enabled()
        key = tuple((l.alpha._version, l.alpha.data_ptr(), training and l.alpha.requires_grad)
                    for l in self.layers if l.alpha is not None)
        if getattr(self, "_identity_key", None) != key:
            self._identity = {i for i, l in enumerate(self.layers)
                              if l.alpha is not None and not l.is_memory_layer
                              and not (training and l.alpha.requires_grad) and float(l.alpha) == 0.0}
            self._identity_key = key
        return self._identity

    @contextlib.contextmanager
    def value_read_off(self):
        """Within: memory is searched and read, so the copy head sees the read, but the read's values
        do not reach the hidden state; the hidden state and p_model are those of memory off."""
        layer = self.memory_layer
        layer.value_read = False
        try:
            yield
        finally:
            layer.value_read = True

    def forward(
        self,
        adapter: BackboneAdapter,
        states: BackboneStates,
        position_ids: torch.Tensor,
        caches: list[LayerCache] | None = None,
        retrieve: Callable[[torch.Tensor], MemoryRetrieval | None] | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MemoryReadout | None]:
        """Backbone states -> logits (B, T, V) from the shared LM head (log-probabilities with
        memory_copy), and what the memory layer read."""
        H = states.hidden  # H^{r*l}, l = 0..L_s
        deviation = None  # D^l = S^l - H^{r*l}
        readout = None
        skip = self.identity_layers()
        for l, layer in enumerate(self.layers):
            if l in skip:
                continue
            s_prev = H[l] if deviation is None else H[l] + deviation
            update, read, memory_update = layer(
                adapter, s_prev, position_ids, None if caches is None else caches[l], retrieve, key_mask
            )
            readout = read or readout
            if layer.alpha is not None:
                update = layer.alpha.to(update.dtype) * update
            if memory_update is not None:
                update = update + memory_update
            deviation = update if deviation is None else deviation + update
        hidden = self.final_norm(H[-1] + deviation)
        logits = adapter.head(hidden)
        if self.memory_copy is not None:
            logits = self.memory_copy(hidden, logits, readout)
        return logits, readout
