"""The span read: can the memory layer answer a question asked in other words?

The product's read ("next") matches each query token to memory by its backbone key and reads the
token that followed the match: an induction head over the past. A question in other words ends in
tokens ("... Answer:") whose matches in memory are other colons, so the token after the match is
never the fact's value. Only the question's own content words ("the ivory lantern") find the
fact, and the value sits a few tokens before or after them there.

The span read gives every position t the memory tokens around the best matches of the last P
query positions: for each of positions t-P+1..t its top `hits` matches, and the tokens within S
of each (offsets -S..S). The memory layer's own query attends over those candidates (their
backbone keys and values, plus a learnt bias per offset), and the copy head can copy their ids.
A learnt per-head mix (from the query) weighs it against the next read.

    python research/span_read.py --steps 240 --out ~/.cache/longmem/runs/span
    python research/span_read.py --steps 240 --no-span --out ~/.cache/longmem/runs/span-baseline
    python research/span_read.py --steps 300 --supervise 1 --out ~/.cache/longmem/runs/span-sup

`--supervise W` also trains the span attention on where the asked value sits in memory (facts
episodes know it): a cross-entropy of its weight on the value's slot, and of the mix, at the
positions that predict the value.

It trains in-process from the backbone with the recipe's settings, then runs the held-out recall
items (`longmem.evaluation.recall`: templates, keys and haystack that training never uses) with
memory, by question style. A research driver; nothing here is part of the product.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import AUSTEN  # noqa: E402

import longmem.sidenet as sidenet_module  # noqa: E402
from longmem.evaluation.recall import recall_items, recall_score  # noqa: E402
from longmem.evaluation.tasks import EvalSettings  # noqa: E402
from longmem.loading import load_model  # noqa: E402
from longmem.memory.bank import MemoryBank  # noqa: E402
from longmem.model import LongMem, next_token_nll  # noqa: E402
from longmem.training import (DistractorMemory, EpisodeSampler, TrainConfig, distractor_segments,  # noqa: E402
                              make_optimizer, train_step)

HELD_OUT = "persuasion.txt"


class SpanRead(nn.Module):
    """Parameters of the span read, one set per query head."""

    def __init__(self, num_heads: int, head_dim: int, positions: int, hits: int, reach: int, mix_init: float,
                 hit_weight_init: float = 0.0):
        super().__init__()
        self.positions, self.hits, self.reach = positions, hits, reach
        self.two_token_bonus = 1.0  # on cosine scores: any two-token match outranks any single-token one
        self.offset_bias = nn.Parameter(torch.zeros(num_heads, 2 * reach + 1))
        self.log_scale = nn.Parameter(torch.zeros(num_heads))
        self.mix_weight = nn.Parameter(torch.zeros(num_heads, head_dim))
        self.mix_bias = nn.Parameter(torch.full((num_heads,), float(mix_init)))
        self.hit_weight = nn.Parameter(torch.full((num_heads,), float(hit_weight_init)))


def span_candidates(bank: MemoryBank, retrieval, span: SpanRead):
    """Memory slots around the top hits of the last P positions: (B, H, T, N) slots (-1: none) and
    the offset index (0..2S) of each."""
    P, kk, S = span.positions, span.hits, span.reach
    B, H, T, K = retrieval.scores.shape
    kk = min(kk, K)
    # Rank the matches as the next read does: a two-token match (the token before agrees too) first,
    # so that "quiet orchard" finds the fact and not the haystack's other orchards.
    rank = retrieval.scores.float()
    if retrieval.prev_token_ids is not None and retrieval.query_prev_ids is not None:
        query_prev = retrieval.query_prev_ids[:, None, :, None]
        rank = rank + span.two_token_bonus * ((retrieval.prev_token_ids == query_prev) & (query_prev >= 0))
    top, order = rank.topk(kk, dim=-1)
    found = torch.isfinite(top)
    slots = torch.where(found, retrieval.slots.gather(-1, order), torch.full_like(order, -1))  # (B, H, T, kk)
    top = torch.where(found, top, torch.zeros_like(top))
    carry = getattr(bank, "_span_carry", None)
    if carry is None or carry[0].shape[:2] != (B, H) or carry[0].shape[-1] != kk:
        carry = (torch.full((B, H, P - 1, kk), -1, dtype=slots.dtype, device=slots.device),
                 torch.zeros((B, H, P - 1, kk), device=slots.device))
    hits = torch.cat([carry[0], slots], dim=2)  # (B, H, P - 1 + T, kk)
    ranks = torch.cat([carry[1], top], dim=2)
    bank._span_carry = (hits[:, :, -(P - 1):].clone(), ranks[:, :, -(P - 1):].clone()) if P > 1 else carry
    win = hits.unfold(2, P, 1).reshape(B, H, T, kk * P)  # (B, H, T, kk, P) flattened
    win_rank = ranks.unfold(2, P, 1).reshape(B, H, T, kk * P)
    offsets = torch.arange(-S, S + 1, device=slots.device)
    cand = win[..., None] + offsets  # (B, H, T, kk * P, 2S + 1)
    A = bank.allocated_chunks
    positions = bank.chunk_positions[retrieval.streams]  # (B, A)
    flat = lambda x: x.clamp(0, A - 1).reshape(B, -1)  # noqa: E731
    base_pos = positions.gather(1, flat(win)).reshape(win.shape)
    cand_pos = positions.gather(1, flat(cand)).reshape(cand.shape)
    ok = (win >= 0)[..., None] & (base_pos >= 0)[..., None] & (cand >= 0) & (cand < A) \
        & (cand_pos == base_pos[..., None] + offsets)
    cand = torch.where(ok, cand, torch.full_like(cand, -1))
    which = offsets.add(S).expand_as(cand)
    hit_rank = win_rank[..., None].expand_as(cand)
    return cand.reshape(B, H, T, -1), which.reshape(B, H, T, -1), hit_rank.reshape(B, H, T, -1)


def span_read(bank: MemoryBank, retrieval, q: torch.Tensor, span: SpanRead, scale: float):
    """q (B, Hq, T, D) the memory layer's query, pre-positional. Returns out (B, Hq, T, D), weights
    (B, Hq, T, N), ids (B, H, T, N), mix (B, Hq, T) in (0, 1)."""
    cand, which, hit_rank = span_candidates(bank, retrieval, span)
    B, H, T, N = cand.shape
    Hq, D = q.shape[1], q.shape[-1]
    G = Hq // H
    valid = cand >= 0
    idx = cand.clamp_min(0)
    keys = bank.keys[retrieval.streams][:, :, :, 0]  # (B, H, A, D)
    values = bank.values[retrieval.streams][:, :, :, 0]
    gather = lambda x: x.gather(2, idx.reshape(B, H, T * N, 1).expand(B, H, T * N, D)).reshape(B, H, T, N, D)  # noqa: E731
    k, v = gather(keys).to(q.dtype), gather(values).to(q.dtype)
    ids = bank.token_ids[retrieval.streams][:, :, 0].gather(1, idx.reshape(B, -1)).reshape(B, H, T, N)
    ids = torch.where(valid, ids, torch.full_like(ids, -1))
    qg = q.reshape(B, H, G, T, D)
    logits = torch.einsum("bhgtd,bhtnd->bhgtn", qg, k).reshape(B, Hq, T, N) * scale
    logits = logits * span.log_scale.exp()[None, :, None, None]
    bias = span.offset_bias[:, which[0, 0, 0]][None, :, None, :]  # (1, Hq, 1, N): every row's offsets are alike
    # how good the match is that a candidate sits beside (a two-token match scores above 1)
    bias = bias + span.hit_weight[None, :, None, None] * hit_rank.repeat_interleave(G, dim=1)
    mask = valid.repeat_interleave(G, dim=1)
    weights = torch.softmax((logits + bias).float().masked_fill(~mask, float("-inf")), dim=-1)
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    out = torch.einsum("bhgtn,bhtnd->bhgtd", weights.to(v.dtype).reshape(B, H, G, T, N), v).reshape(B, Hq, T, D)
    mix = torch.sigmoid(torch.einsum("bhtd,hd->bht", q.float(), span.mix_weight.float()) + span.mix_bias[None, :, None])
    mix = torch.where(mask.any(-1), mix, torch.zeros_like(mix))
    if getattr(span, "capture", False):  # the supervised runs read the weights' memory positions back
        positions = bank.chunk_positions[retrieval.streams]  # (B, A)
        cand_pos = positions.gather(1, idx.reshape(B, -1)).reshape(B, H, T, N).masked_fill(~valid, -1)
        span.captured = (weights, cand_pos, mix)
    return out, weights, ids, mix


def install(model: LongMem, span: SpanRead | None) -> None:
    """Patch the model so that the memory layer's next read also reads spans (span None: unchanged)."""
    if span is None:
        return
    layer = model.sidenet.memory_layer
    object.__setattr__(layer, "span", span)  # not a submodule: its own optimiser group, its own file
    scale = model.adapter.attention_scale(layer.backbone_layer)
    original_retriever = LongMem._retriever
    original_read = sidenet_module.next_token_read

    def retriever(self, bank, *args, **kwargs):
        retrieve = original_retriever(self, bank, *args, **kwargs)

        def with_span(side_q):
            retrieval = retrieve(side_q)
            if isinstance(bank, MemoryBank) and retrieval is not None:
                retrieval.span = span_read(bank, retrieval, side_q, span, scale)
            return retrieval

        return with_span

    def next_token_read(retrieval, temperature, prev_bonus=None, rerank=None):
        out, weights, match = original_read(retrieval, temperature, prev_bonus, rerank)
        extra = getattr(retrieval, "span", None)
        if extra is None:
            return out, weights, match
        s_out, s_weights, s_ids, mix = extra
        m = mix.to(out.dtype)[..., None]
        out = (1 - m) * out + m * s_out.to(out.dtype)
        weights = torch.cat([(1 - m) * weights, m * s_weights.to(weights.dtype)], dim=-1)
        retrieval.next_token_ids = torch.cat([retrieval.next_token_ids, s_ids], dim=-1)
        retrieval.span = None  # read once
        return out, weights, match

    LongMem._retriever = retriever
    sidenet_module.next_token_read = next_token_read
    original_reset = MemoryBank.reset

    def reset(self, streams=None):
        self._span_carry = None
        return original_reset(self, streams)

    MemoryBank.reset = reset


def value_targets(episode, region: int) -> list[tuple[int, int]] | None:
    """For a facts episode: [(query position t, episode position of the value token t predicts)], one
    per value token of the asked fact, or None where the value is not found exactly once before the
    question (a repeated word value, or the same words in the prose)."""
    if episode.kind != "facts" or episode.answer is None:
        return None
    where = episode.answer.nonzero().flatten()
    start, value = int(where[0]), episode.ids[where[:-1]]  # the answer's tokens less the closing "."
    if value.numel() == 0:
        return None
    hay = episode.ids[:region]
    found = [p for p in range(region - value.numel() + 1) if torch.equal(hay[p : p + value.numel()], value)]
    if len(found) != 1:
        return None
    return [(start + i - 1, found[0] + i) for i in range(value.numel())]


def supervised_step(model: LongMem, episode, optimizer, scheduler, cfg: TrainConfig, distractors, span: SpanRead,
                    weight: float, mix_weight: float = 1.0, first_tokens: int = 0) -> dict:
    """The recipe's train_step for one episode, plus a cross-entropy of the span read's attention on
    the asked value's memory slot, and of its mix, at the positions that predict the value."""
    W, n = model.config.memory.window, cfg.segments_per_episode
    model.train()
    bank = model.new_bank(1)
    ids, labels = episode.ids[None], episode.labels[None]
    with model.frozen_precision(cfg.frozen_precision(model.device)):
        distractors.fill(bank, ids)
        base = int(bank.tokens_seen[0])  # memory position of the episode's first token
        model.write_memory(ids[:, : (n - 1) * W], bank)
        j = n - 1
        seg, lab = ids[:, j * W :], labels[:, j * W :]
        targets = value_targets(episode, (n - 1) * W) if weight > 0 else None
        if targets and first_tokens:
            targets = targets[:first_tokens]
        span.capture = targets is not None
        out = model(seg, bank=bank, labels=None, update_memory=True, previous_ids=ids[:, j * W - 1],
                    context_ids=model.memory_context(ids, j * W))
        span.capture = False
        answer = episode.answer[None, j * W :] if episode.answer is not None else torch.zeros_like(lab, dtype=torch.bool)
        weights = 1.0 + (cfg.answer_weight - 1.0) * answer[:, 1:].float()
        nll = next_token_nll(out.logits, lab, model.returns_log_probs)
        scored = (lab[:, 1:] != -100).float() * weights
        loss = (nll * scored).sum() / scored.sum()
        attn_loss = mix_loss = torch.zeros(())
        found = 0.0
        if targets is not None:
            span_weights, cand_pos, mix = span.captured  # (1, Hq, W, N), (1, H, W, N), (1, Hq, W)
            span.captured = None
            Hq, H = span_weights.shape[1], cand_pos.shape[1]
            t = torch.tensor([q - j * W for q, _ in targets])
            goal = torch.tensor([base + v for _, v in targets])
            hit = (cand_pos[0][:, t] == goal[None, :, None]).repeat_interleave(Hq // H, dim=0)  # (Hq, L, N)
            present = hit.any(-1)  # (Hq, L)
            if present.any():
                p = (span_weights[0][:, t] * hit).sum(-1)
                attn_loss = -torch.log(p[present] + 1e-6).mean()
                mix_loss = -torch.log(mix[0][:, t][present].float() + 1e-6).mean()
            found = present.float().mean().item()
        (loss + weight * (attn_loss + mix_weight * mix_loss)).backward()
    params = [p for p in model.sidenet.parameters() if p.requires_grad] + list(span.parameters())  # clipped together
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    copy_gate = out.readout.copy_gate
    return {"loss": loss.item(), "attn_loss": attn_loss.item(), "mix_loss": mix_loss.item(), "target_found": found,
            "copy_gate": 0.0 if copy_gate is None else copy_gate.float().mean().item()}


def tokenize(tokenizer, path: Path) -> torch.Tensor:
    return tokenizer(path.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]


def evaluate_recall(model: LongMem, lengths, trials: int, tasks) -> dict:
    tok = model.tokenizer
    settings = EvalSettings(task="recall", window=model.config.memory.window, recall_tasks=tuple(tasks),
                            recall_lengths=tuple(lengths), recall_trials=trials,
                            recall_styles=("restate", "paraphrase"))  # the suite as these runs measured it
    text = (AUSTEN / HELD_OUT).read_text()
    items, _ = recall_items([(HELD_OUT, text)], lambda s: np.asarray(tok(s, add_special_tokens=False).input_ids), settings)
    cells = {}
    model.eval()
    with torch.no_grad():
        for it in items:
            x = torch.as_tensor(it["prompt"])[None]
            answer = model.generate(x, bank=model.new_bank(1), max_new_tokens=it["max_new_tokens"]).texts[0]
            score = recall_score(answer, it["answers"])
            cell = cells.setdefault(f"{it['task']}/{it['length']}/{it['style']}", [])
            cell.append(score)
            print(json.dumps({"item": it["id"], "style": it["style"], "answers": it["answers"], "text": answer,
                              "score": score}), flush=True)
    return {c: {"mean": float(np.mean(v)), "n": len(v)} for c, v in sorted(cells.items())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-span", action="store_true", help="the product's read alone (the baseline)")
    ap.add_argument("--positions", type=int, default=8, help="P: query positions whose matches are read around")
    ap.add_argument("--hits", type=int, default=2, help="top matches per position")
    ap.add_argument("--reach", type=int, default=6, help="S: tokens read on each side of a match")
    ap.add_argument("--mix-init", type=float, default=-2.0)
    ap.add_argument("--hit-weight-init", type=float, default=0.0,
                    help="initial weight of a candidate's match score in its logit (per head)")
    ap.add_argument("--curriculum", default="plain:0.2,repeat:0.1,passkey:0.1,facts:0.6")
    ap.add_argument("--eval-lengths", type=int, nargs="*", default=[16384])
    ap.add_argument("--eval-trials", type=int, default=10)
    ap.add_argument("--eval-tasks", nargs="*", default=["single", "multikey"])
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--supervise", type=float, default=0.0,
                    help="weight of the span attention's and mix's cross-entropy on the asked value (0: off)")
    ap.add_argument("--supervise-mix", type=float, default=1.0, help="the mix's share of that weight")
    ap.add_argument("--supervise-tokens", type=int, default=0,
                    help="supervise the positions that predict the value's first N tokens (0: all of them)")
    args = ap.parse_args()
    if args.supervise > 0 and args.no_span:
        ap.error("--supervise trains the span read: drop --no-span")
    torch.manual_seed(0)
    model = load_model()
    tok = model.tokenizer
    books = [tokenize(tok, p) for p in sorted(AUSTEN.glob("*.txt")) if p.name != HELD_OUT]
    model.calibrate_key_center(books[0][None, :8192])
    layer = model.sidenet.memory_layer
    span = None if args.no_span else SpanRead(model.adapter.num_heads, model.adapter.head_dim, args.positions,
                                               args.hits, args.reach, args.mix_init, args.hit_weight_init)
    install(model, span)
    cfg = TrainConfig(steps=args.steps, curriculum=args.curriculum, frozen_dtype="float32").validate()  # as recorded
    window = model.config.memory.window
    sampler = EpisodeSampler(books, window, cfg.segments_per_episode, cfg.curriculum, cfg.seed, tok)
    distractors = DistractorMemory(model, distractor_segments(books, window, cfg), cfg.distractor_tokens)
    optimizer, scheduler = make_optimizer(model.sidenet, cfg)
    if span is not None:  # the span read's few parameters learn at the memory learning rate
        optimizer.add_param_group({"params": list(span.parameters()), "weight_decay": 0.0, "lr": cfg.memory_lr})
        scheduler.base_lrs.append(cfg.memory_lr)
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
    t0 = time.time()
    for step in range(cfg.steps):
        if args.supervise > 0:
            metrics = supervised_step(model, sampler.sample(), optimizer, scheduler, cfg, distractors, span, args.supervise,
                                      args.supervise_mix, args.supervise_tokens)
        else:
            metrics = train_step(model, [[sampler.sample()]], optimizer, scheduler, cfg, distractors=distractors)
        if step % args.log_every == 0 or step == cfg.steps - 1:
            extra = {}
            if span is not None:
                extra["span_mix_bias"] = [round(x, 2) for x in span.mix_bias.tolist()]
            print(json.dumps({"step": step, "elapsed_s": round(time.time() - t0), "loss": round(metrics["loss"], 4),
                              "copy_gate": round(metrics.get("copy_gate", 0.0), 3), **extra,
                              **{k: round(metrics[k], 4) for k in ("attn_loss", "mix_loss", "target_found") if k in metrics}}),
                  flush=True)
    train_s = round(time.time() - t0)
    if args.out:
        model.save_pretrained(args.out)
        if span is not None:
            torch.save(span.state_dict(), args.out / "span.pt")
    t1 = time.time()
    recall = evaluate_recall(model, args.eval_lengths, args.eval_trials, args.eval_tasks)
    report = {"span": None if span is None else vars(args) | {"out": str(args.out)}, "train_s": train_s,
              "eval_s": round(time.time() - t1), "recall": recall}
    print(json.dumps(report, indent=2), flush=True)
    if args.out:
        (args.out / "span_report.json").write_text(json.dumps(report, indent=2) + "\n")
    del layer


if __name__ == "__main__":
    sys.exit(main())
