"""Scoring: the Scorer interface, ModelScorer (a LongMem model's scorer), score_item, perplexity_report."""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .tasks import READINGS, EvalError

if TYPE_CHECKING:
    from ..model import LongMem


# ---------------------------------------------------------------------------- scoring interface
class Scorer(Protocol):
    def token_nll(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """ids (N,) -> per reading an (N,) float array: NLL of token i, NaN where not scored."""

    def choice_scores(self, memory: np.ndarray, context: np.ndarray, candidates: list[np.ndarray]) -> dict[str, list[float]]:
        """Log-likelihood of each candidate after `context`, with `memory` (the far past) in memory."""

    def answers(self, prompt: np.ndarray, max_new_tokens: int) -> dict[str, str]:
        """Per reading, the greedy continuation of `prompt` (N,) as text."""


class ModelScorer:
    """The Scorer of a LongMem model. Every reading scores exactly the same tokens."""

    def __init__(self, model, long_window: int | None = 2048, length_normalize: bool = True):
        self.model = model.eval()
        self.window = model.config.memory.window
        self.long_window = long_window
        self.length_normalize = length_normalize
        self._memory_key, self._memory_bank = None, None

    def _tensor(self, ids) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.model.device)[None]

    @staticmethod
    def _nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        # logits (1, T, V) predicting targets (1, T)
        return F.cross_entropy(logits[0].float(), targets[0], reduction="none").cpu().numpy()

    @torch.no_grad()
    def token_nll(self, ids: np.ndarray, window: int | None = None, progress=None) -> dict[str, np.ndarray]:
        """Segments of `window` (default: the model's) read in order, memory = the earlier segments.
        backbone_long stays NaN when the scorer has no long_window."""
        model, N = self.model, len(ids)
        W = window or self.window
        out = {r: np.full(N, np.nan, dtype=np.float64) for r in READINGS}
        x = self._tensor(ids)
        bank = model.new_bank(1)
        starts = range(0, N, W)
        for i, s in enumerate(starts):
            seg = x[:, s : s + W]
            if seg.shape[1] >= 2:
                states = model.backbone_states(seg)  # one frozen pass serves three readings
                t, span = seg[:, 1:], slice(s + 1, s + seg.shape[1])
                out["backbone"][span] = self._nll(model.adapter.logits(states.hidden[-1])[:, :-1], t)
                out["longmem_no_memory"][span] = self._nll(model(seg, states=states).logits[:, :-1], t)
                mem = model(seg, bank=bank, update_memory=True, states=states,
                            previous_ids=x[:, s - 1] if s else None, context_ids=model.memory_context(x, s)).logits
                out["longmem_memory"][span] = self._nll(mem[:, :-1], t)
            if progress:
                progress(i + 1, len(starts))
        L = self.long_window
        for s in range(0, N, L) if L else ():
            seg = x[:, s : s + L]
            if seg.shape[1] < 2:
                continue
            out["backbone_long"][s + 1 : s + seg.shape[1]] = self._nll(model.backbone_logits(seg)[:, :-1], seg[:, 1:])
        # The same tokens for every reading: the first token of each local window is never scored.
        out["backbone_long"][np.arange(0, N, W)] = np.nan
        return out

    def _bank(self, memory: np.ndarray, overflow: np.ndarray):
        """The memory of `memory`, then `overflow`; questions sharing a memory (ICL) encode it once."""
        import copy

        if not len(memory) and not len(overflow):
            return None
        key = hashlib.sha1(memory.tobytes()).hexdigest()
        if self._memory_key != key:
            bank = self.model.new_bank(1)  # the model's memory size: beyond it the oldest tokens are evicted
            if len(memory):
                self.model.write_memory(self._tensor(memory), bank)
            self._memory_key, self._memory_bank = key, bank
        bank = self._memory_bank
        if len(overflow):
            bank = copy.deepcopy(bank)
            self.model.write_memory(self._tensor(overflow), bank)
        return bank

    @torch.no_grad()
    def choice_scores(self, memory, context, candidates) -> dict[str, list[float]]:
        """The context is encoded once per reading and every candidate continues it from a KV cache
        (cropped back after each), which is exact and saves re-reading the context per candidate."""
        from ..sidenet import LayerCache

        model, W, L = self.model, self.window, self.long_window
        longest = max(len(c) for c in candidates)
        if longest >= W:
            raise EvalError(f"a candidate of {longest} tokens does not fit the {W}-token window")
        context = np.asarray(context, dtype=np.int64)
        memory = np.asarray(memory, dtype=np.int64)
        if len(context) == 0:
            raise EvalError("a choice question needs at least one context token")
        # Context that does not fit beside the longest candidate moves to memory, so each reading
        # sees the same local tokens and LongMem loses nothing.
        keep = W - longest
        overflow = context[:-keep] if len(context) > keep else context[:0]
        context = context[len(overflow):]
        bank = self._bank(memory, overflow)
        memory = np.concatenate([memory, overflow])
        far = np.concatenate([memory, context])
        far = far[len(far) - min(len(far), L - longest):]

        ctx, n_ctx = self._tensor(context), len(context)
        prev_ctx = self._tensor(memory[-1:]) if len(memory) else None  # the token before the context
        cache = model.new_kv_cache()
        states = model.backbone_states(ctx, cache=cache)
        sides = {"longmem_no_memory": [LayerCache() for _ in model.sidenet.layers],
                 "longmem_memory": [LayerCache() for _ in model.sidenet.layers]}
        banks = {"longmem_no_memory": None, "longmem_memory": bank}
        first = {"backbone": model.adapter.logits(states.hidden[-1])[:, -1:]}
        for r, side in sides.items():
            first[r] = model(ctx, bank=banks[r], states=states, side_caches=side, backbone_cache=cache,
                             previous_ids=prev_ctx).logits[:, -1:]
        saved = {r: [(c.keys, c.values) for c in side] for r, side in sides.items()}
        long_cache = model.new_kv_cache()
        long_states = model.adapter.run(self._tensor(far), [model.adapter.num_layers], model.memory_layer, cache=long_cache)
        first["backbone_long"] = model.adapter.logits(long_states.hidden[-1])[:, -1:]

        scores = {r: [] for r in READINGS}
        for cand in candidates:
            cand = np.asarray(cand, dtype=np.int64)
            n, t = len(cand), self._tensor(cand)
            st = model.backbone_states(t, cache=cache)
            logits = {"backbone": model.adapter.logits(st.hidden[-1])}
            for r, side in sides.items():
                logits[r] = model(t, bank=banks[r], states=st, side_caches=side, position_offset=n_ctx,
                                  backbone_cache=cache, previous_ids=ctx[:, -1]).logits
            ls = model.adapter.run(t, [model.adapter.num_layers], model.memory_layer, cache=long_cache)
            logits["backbone_long"] = model.adapter.logits(ls.hidden[-1])
            for r in READINGS:
                # the first candidate token is predicted by the context's last position
                nll = self._nll(torch.cat([first[r], logits[r][:, :-1]], dim=1), t).sum()
                scores[r].append(float(-nll / n if self.length_normalize else -nll))
            cache.crop(-n)  # drop the candidate's tokens again
            long_cache.crop(-n)
            for r, side in sides.items():
                for c, (k, v) in zip(side, saved[r]):
                    c.keys, c.values = k, v
        return scores


    @torch.no_grad()
    def answers(self, prompt: np.ndarray, max_new_tokens: int) -> dict[str, str]:
        """Greedy answers to a long prompt, four ways: LongMem reading everything before its local
        window from memory; LongMem with memory off (the local window only); the backbone over
        LongMem's local window; the backbone over its long window (its native one for recall)."""
        model, x = self.model, self._tensor(prompt)
        out = {"longmem_memory": model.generate(x, bank=model.new_bank(1), max_new_tokens=max_new_tokens).texts[0],
               "longmem_no_memory": model.generate(x, max_new_tokens=max_new_tokens).texts[0]}
        tok = model.tokenizer
        local = x[:, model.local_start(x.shape[1]):]  # exactly what LongMem holds in its window
        for reading, ids in (("backbone", local), ("backbone_long", x[:, -(self.long_window or x.shape[1]):])):
            ids = model.adapter.with_start(ids)  # what the plain model reads for this context
            ids_out = model.backbone.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                              do_sample=False, pad_token_id=tok.eos_token_id)
            out[reading] = tok.decode(ids_out[0, ids.shape[1]:], skip_special_tokens=True)
        return out


def score_item(scorer: Scorer, item: dict) -> dict:
    """One work item -> its JSON-able result (what an actor sends back)."""
    if item["kind"] == "recall":
        from .recall import recall_score

        texts = scorer.answers(np.asarray(item["prompt"]), item["max_new_tokens"])
        keep = ("id", "group", "task", "length", "depth", "style", "value_kind", "answers")
        return {"kind": "recall", **{k: item[k] for k in keep}, "texts": texts,
                "scores": {r: recall_score(t, item["answers"]) for r, t in texts.items()}}
    if item["kind"] == "document":
        nll = scorer.token_nll(np.asarray(item["tokens"]))
        return {"kind": "document", "id": item["id"], "tokens": len(item["tokens"]),
                "nll": {r: [None if math.isnan(v) else float(v) for v in a] for r, a in nll.items()}}
    results = []
    for q in item["questions"]:
        scores = scorer.choice_scores(item["memory"], q["context"], q["candidates"])
        results.append({"id": q["id"], "group": q["group"], "answer": q["answer"],
                        "scores": {r: [float(s) for s in v] for r, v in scores.items()}})
    return {"kind": "choice", "id": item["id"], "questions": results}


def perplexity_report(model: LongMem, input_ids: torch.Tensor, window: int | None = None, progress=None) -> dict:
    """Perplexity of (1, N) tokens three ways over the same scored tokens and local window:
    the backbone alone, LongMem with memory disabled, LongMem reading the memory of earlier segments."""
    from ..model import InputError

    window = window or model.config.memory.window
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
