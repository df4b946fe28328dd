"""Memory probes: does the model read its memory? Each figure comes with the same model with
memory disabled and with the backbone alone, on the same tokens.

- copy_probe:    a segment repeated from `gap` segments back. Retrieval hit rate (share of repeated
                 tokens whose retrieved chunks include the chunk of their original occurrence) and
                 perplexity of the repeat, with memory vs without vs backbone.
- passkey_probe: a 5-digit key planted in prose `distance` tokens before the question; exact match.
"""

from __future__ import annotations

import math
import random
import re

import torch
import torch.nn.functional as F

from ..model import LongMem
from ..training import PASSKEY_FACT, PASSKEY_QUESTION


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()


@torch.no_grad()
def copy_probe(model: LongMem, text_ids: torch.Tensor, gap_segments: int = 2, episodes: int = 4) -> dict:
    """text_ids (1, N) held-out tokens; needs (gap_segments + 1) * window * episodes tokens."""
    model.eval()
    W, c = model.config.memory.window, model.config.memory.chunk_size
    span = (gap_segments + 1) * W
    if text_ids.shape[1] < span * episodes:
        raise ValueError(f"copy probe needs {span * episodes} tokens, got {text_ids.shape[1]}")
    nll = {"memory": 0.0, "no_memory": 0.0, "backbone": 0.0}
    any_head, mean_head, scored = 0.0, 0.0, 0
    for e in range(episodes):
        ids = text_ids[:, e * span : (e + 1) * span].to(model.device)
        first = ids[:, :W]
        bank = model.new_bank(1)
        model.write_memory(ids, bank)  # the segment, then `gap` others
        out = model(first, bank=bank)  # the first segment again
        nll["memory"] += _nll(out.logits, first)
        nll["no_memory"] += _nll(model(first).logits, first)
        nll["backbone"] += _nll(model.backbone_logits(first), first)
        starts = out.readout.retrieval.positions[0]  # (Hq, T, k)
        original = torch.arange(W, device=starts.device)[None, :, None]
        hit = ((starts >= 0) & (starts <= original) & (original < starts + c)).any(-1)  # (Hq, T)
        any_head += hit.any(0).float().sum().item()
        mean_head += hit.float().mean(0).sum().item()
        scored += W
    tokens = episodes * (W - 1)
    ppl = {k: math.exp(v / tokens) for k, v in nll.items()}
    return {
        "episodes": episodes,
        "gap_segments": gap_segments,
        "hit_rate_any_head": any_head / scored,
        "hit_rate_mean_over_heads": mean_head / scored,
        "ppl_memory": ppl["memory"],
        "ppl_no_memory": ppl["no_memory"],
        "ppl_backbone": ppl["backbone"],
        "no_memory_over_memory": ppl["no_memory"] / ppl["memory"],
    }


def passkey_prompts(model: LongMem, filler_ids: torch.Tensor, distance: int, trials: int = 4, seed: int = 0):
    """Yield (key, prompt (1, P)) per trial: a 5-digit key planted in filler prose `distance` tokens
    before the question. Key and place are drawn together from `seed`."""
    tok = model.tokenizer
    rng = random.Random(seed)
    encode = lambda s: tok(s, add_special_tokens=False, return_tensors="pt").input_ids  # noqa: E731
    W = model.config.memory.window
    if distance < W:
        raise ValueError(f"passkey distance {distance} must be at least the window ({W}) to test memory")
    for _ in range(trials):
        key = f"{rng.randrange(10_000, 100_000)}"
        start = rng.randrange(max(1, filler_ids.shape[1] - distance - 64))
        before = filler_ids[:, start : start + 64]
        fact, question = encode(PASSKEY_FACT.format(key=key)), encode(PASSKEY_QUESTION)
        # Trim the filler so that the question ends half-way into its local window: all three
        # readers then see the same W/2 local tokens, and the key lies `distance` tokens back.
        fixed = before.shape[1] + fact.shape[1] + question.shape[1]
        n_after = distance - ((fixed + distance) % W - W // 2) % W
        after = filler_ids[:, start + 64 : start + 64 + n_after]
        yield key, torch.cat([before, fact, after, question], 1).to(model.device)


@torch.no_grad()
def passkey_probe(model: LongMem, filler_ids: torch.Tensor, distance: int, trials: int = 4, seed: int = 0) -> dict:
    """Plant a key `distance` tokens before the question in filler prose; greedy-decode the answer."""
    model.eval()
    tok = model.tokenizer
    correct = {"memory": 0, "no_memory": 0, "backbone": 0}
    examples = []
    W = model.config.memory.window
    for key, prompt in passkey_prompts(model, filler_ids, distance, trials, seed):
        local = prompt[:, model.local_start(prompt.shape[1]) :]
        answers = {
            "memory": model.generate(prompt, bank=model.new_bank(1), max_new_tokens=8).texts[0],
            "no_memory": model.generate(prompt, max_new_tokens=8).texts[0],
        }
        local = model.adapter.with_start(local)  # what the plain model reads for this context
        out = model.backbone.generate(local, attention_mask=torch.ones_like(local), max_new_tokens=8, do_sample=False,
                                      pad_token_id=tok.eos_token_id)
        answers["backbone"] = tok.decode(out[0, local.shape[1] :], skip_special_tokens=True)
        for name, text in answers.items():
            digits = re.findall(r"\d{5}", text.replace(" ", ""))
            correct[name] += bool(digits) and digits[0] == key
        examples.append({"key": key, **answers})
    return {"distance": distance, "trials": trials, "seed": seed, "local_tokens": W // 2,
            **{f"accuracy_{k}": v / trials for k, v in correct.items()}, "answers": examples}
