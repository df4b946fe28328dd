"""Memory-augmented adaptation of the SideNet with Ray Train.

Driver: corpus -> documents (Ray Data's streaming reads) -> tokens (batched, in Ray tasks) -> the
TorchTrainer's dataset, read as a stream. Every worker turns the stream into the run's episodes by
the curriculum (longmem.training.episode_stream: seeded by document, so a resumed run sees exactly
the data an uninterrupted one would) and keeps its share; no one holds the whole corpus. The driver
reads only the corpus's head: the key centre and the distractor pool come from it. Each worker
holds its own frozen backbone and per-row memory banks; only the SideNet is wrapped by DDP.
Checkpoints (SideNet + optimizer + schedule + step) every N steps; a run started again with the
same name and storage path resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from longmem.backbone import cache_dir, resolve_backbone
from longmem.loading import ModelSource, load_source
from longmem.model import WEIGHTS_NAME, InputError, LongMem, refuse_non_checkpoint, replace_folder
from longmem.training import (DistractorMemory, TrainConfig, distractor_segments, episode_stream, make_optimizer,
                              require_copy_head, train_step)

STATE_NAME = "trainer_state.pt"
MODEL_DIR = "model"
# The distractor pool is drawn from the corpus's first this many times its own size of tokens.
DISTRACTOR_HEAD_FACTOR = 8


@dataclass
class TrainJob:
    corpus: list[str]
    out: str  # the final checkpoint: a new or empty folder, or a checkpoint to replace
    # Where the SideNet starts: a fresh one (the recipe by default) or a checkpoint to continue.
    model: ModelSource | dict = field(default_factory=ModelSource)
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    name: str = "longmem-sidenet"
    storage_path: str | None = None  # default: <cache>/train
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 0
    text_field: str = "text"
    log_every: int = 10
    stop_after: int | None = None  # end early after this step (the run stays resumable)
    # A fresh model that centres keys gets its centre from the corpus's first this many tokens
    # (LongMem.calibrate_key_center); a checkpoint keeps its own.
    key_center_tokens: int = 8192
    train: dict = field(default_factory=dict)  # TrainConfig fields
    # The local window the final model reads at (its config's memory.window), where it differs from
    # the window it trains at: a runtime setting, so a model trained on short segments can read
    # longer ones. None: the training window.
    read_window: int | None = None
    # Later stages, each continuing the one before: TrainConfig fields over `train` (the recipe's
    # second stage trains the copy head alone). Each is its own resumable run, `<name>-stage<k>`.
    then: list[dict] = field(default_factory=list)
    # After the last stage: evaluations of the final model, each written to <out>/evaluation/<name>/
    # (report.json / .md / .png): [{task, data, settings, name (default: the task)}], as for
    # pipelines.evaluate.EvalJob.
    evaluate: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.model = ModelSource.from_dict(self.model)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.train).validate()

    def stages(self) -> list["TrainJob"]:
        """One single-stage job per stage; each later one starts from the checkpoint the one before
        writes (under the storage path), the last writes `out`."""
        if not self.then:
            return [self]
        folder = Path(self.storage()) / f"{self.name}-stages"
        outs = [str(folder / f"stage-{k + 1}") for k in range(len(self.then))] + [self.out]
        jobs = [dataclasses.replace(self, out=outs[0], then=[], evaluate=[])]
        for k, extra in enumerate(self.then):
            jobs.append(dataclasses.replace(self, out=outs[k + 1], then=[], evaluate=[], name=f"{self.name}-stage{k + 2}",
                                            model=ModelSource(checkpoint=outs[k], dtype=self.model.dtype),
                                            train={**self.train, **extra}, key_center_tokens=0))
        return jobs

    def validate(self) -> "TrainJob":
        """Everything that can be checked before Ray starts: settings, model, and the output folder."""
        for stage in self.stages():
            stage.train_config()
        self.model.validate()
        if self.workers <= 0:
            raise InputError(f"workers must be positive, got {self.workers}")
        if self.key_center_tokens < 0:
            raise InputError(f"key_center_tokens must be >= 0, got {self.key_center_tokens}")
        if self.read_window is not None:
            if not isinstance(self.read_window, int) or self.read_window <= 0:
                raise InputError(f"read_window must be a positive number of tokens, got {self.read_window!r}")
            self.model.config().with_overrides({"memory.window": self.read_window})  # a ConfigError if it cannot be
        refuse_non_checkpoint(Path(self.out))
        for eval_job in self.eval_jobs(self.model):  # before hours of training, not after
            eval_job.validate()
            missing = [d for d in eval_job.data if "://" not in d and not Path(d).exists()]
            if missing:
                raise InputError(f"evaluate data not found: {', '.join(missing)}")
        return self

    def eval_jobs(self, model) -> list:
        """job.evaluate as EvalJobs of `model` (the final checkpoint's source)."""
        from pipelines.evaluate import EvalError, EvalJob

        jobs = []
        for spec in self.evaluate:
            spec = dict(spec)
            missing = {"task", "data"} - set(spec)
            if missing:
                raise EvalError(f"every evaluate entry needs task and data; one lacks {', '.join(sorted(missing))}")
            task, data, name = spec.pop("task"), spec.pop("data"), spec.pop("name", None)
            unknown = set(spec) - {"settings"}
            if unknown:
                raise EvalError(f"unknown evaluate field(s): {', '.join(sorted(unknown))} (use task, data, name, settings)")
            out = Path(self.out) / "evaluation" / (name or task)
            jobs.append(EvalJob(task=task, data=[data] if isinstance(data, str) else list(data), out=str(out),
                                model=model, settings=spec.get("settings", {}),
                                num_cpus_per_actor=max(1.0, self.workers * self.cpus_per_worker)))
        names = [Path(j.out).name for j in jobs]
        if len(set(names)) < len(names):
            raise EvalError(f"evaluate entries need distinct names (they name the report folders): {names}")
        return jobs

    def storage(self) -> str:
        return self.storage_path or str(cache_dir() / "train")


def build_model(job: dict, device="cpu") -> LongMem:
    return load_source(ModelSource.from_dict(job["model"]), device=device)


def corpus_stream(job: TrainJob):
    """The tokenised corpus as a Ray Dataset (rows: doc_id, tokens, num_tokens, digest, skip), read
    in a fixed order: episodes follow the order documents arrive in."""
    from pipelines.corpus import Tokenize, read_documents

    source = resolve_backbone(job.model.config().backbone.name)
    # The stream's tasks reserve no CPU: Ray Train leaves Ray Data only the CPUs its workers do not
    # hold, and workers that hold every CPU (one worker a core) must still be fed.
    dataset = read_documents(job.corpus, job.text_field, num_cpus=0).map_batches(Tokenize(source), batch_size=4,
                                                                                  num_cpus=0)
    dataset.context.execution_options.preserve_order = True  # read here (tests); Train gets its own options
    return dataset


def read_corpus_head(job: TrainJob, tokens: int, batch: int = 4) -> tuple[list[np.ndarray], dict]:
    """The usable documents from the start of the corpus (in the stream's order) until they hold
    `tokens` tokens, read and tokenised here, and what was read: counts, skips, and whether that was
    the whole corpus."""
    from pipelines.corpus import Tokenize, iter_documents_here

    tokenize = Tokenize(resolve_backbone(job.model.config().backbone.name))
    docs: list[np.ndarray] = []
    skipped: dict[str, int] = {}
    rows = iter_documents_here(job.corpus, job.text_field)
    whole, total = True, 0
    while whole:
        block = [r for _, r in zip(range(batch), rows)]
        if not block:
            break
        out = tokenize({k: [r[k] for r in block] for k in ("doc_id", "text", "skip")})
        for ids, skip in zip(out["tokens"], out["skip"]):
            if total >= max(tokens, 1):
                whole = False  # there is more: stop reading here
                break
            if skip:
                skipped[skip] = skipped.get(skip, 0) + 1
            else:
                docs.append(np.asarray(ids, dtype=np.int64))
                total += docs[-1].size
    return docs, {"documents": len(docs), "tokens": int(total), "skipped": skipped,
                  "corpus_read": "whole" if whole else f"first {total} tokens"}


def train_loop_per_worker(job: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig(**job["train"])
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    model = build_model(job, device=device)
    if job["key_center"] is not None:  # the driver's calibration: every worker gets the same centre
        model.sidenet.key_center.copy_(torch.tensor(job["key_center"]))
        model._sync_key_center()
    optimizer, scheduler = make_optimizer(model.sidenet, cfg)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            from safetensors.torch import load_file

            model.sidenet.load_state_dict(load_file(str(Path(d) / MODEL_DIR / WEIGHTS_NAME)))
            state = torch.load(Path(d) / STATE_NAME, map_location=device, weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = state["step"]
    wrapper = model.sidenet
    if world > 1:
        wrapper = ray.train.torch.prepare_model(model.sidenet, move_to_device=False,
                                                parallel_strategy_kwargs={"find_unused_parameters": True})
        model.run_sidenet_through(wrapper)

    # Every worker reads the whole corpus stream, draws the run's whole episode sequence from it and
    # keeps episodes i % world == rank: the same split on every run, so resuming at step s means
    # skipping exactly s steps of episodes.
    shard = ray.train.get_dataset_shard("train")

    def corpus_pass():
        for r in shard.iter_rows():
            if not r["skip"]:
                yield r["digest"], r["tokens"]

    episodes = episode_stream(corpus_pass, model.config.memory.window, cfg, model.tokenizer)
    rows = (e for i, e in enumerate(episodes) if i % world == rank)
    per_step = cfg.grad_accum * cfg.batch_size

    def next_step_batches():
        eps = [next(rows) for _ in range(per_step)]
        return [eps[i : i + cfg.batch_size] for i in range(0, per_step, cfg.batch_size)]

    distractors = None
    if cfg.distractor_tokens:
        segments = [torch.as_tensor(s, dtype=torch.long) for s in job["distractor_segments"]]
        t_pool = time.time()
        distractors = DistractorMemory(model, segments, cfg.distractor_tokens, cfg.frozen_precision(model.device))
        if rank == 0:
            print(f"[train] distractor pool: {len(segments)} segments encoded in {time.time() - t_pool:.0f}s; "
                  f"{distractors.per_episode} start every episode's memory", flush=True)
    for _ in range(start * per_step):
        next(rows)
    t0 = time.time()
    for step in range(start, cfg.steps):
        torch.manual_seed(cfg.seed * 100_003 + step)
        metrics = train_step(model, next_step_batches(), optimizer, scheduler, cfg, sidenet=wrapper,
                             distractors=distractors)
        metrics["step"] = done = step + 1
        stop = job.get("stop_after") and done >= job["stop_after"]
        if rank == 0 and (done % job["log_every"] == 0 or done == cfg.steps or step == start):
            print(f"[train] step {done}/{cfg.steps} loss {metrics['loss']:.4f} "
                  f"tok/s {metrics['tokens_per_s'] * world:.0f} gate {metrics['gate_mean']:.3f} "
                  f"memory share {metrics['memory_share']:.3f}"
                  + (f" copy gate {metrics['copy_gate']:.3f}" if "copy_gate" in metrics else "")
                  + f" ({time.time() - t0:.0f}s)", flush=True)
        if done % job["checkpoint_every"] == 0 or done == cfg.steps or stop:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    model.save_pretrained(Path(tmp) / MODEL_DIR)
                    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                "step": done, "train": job["train"]}, Path(tmp) / STATE_NAME)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
        else:
            ray.train.report(metrics)
        if stop:
            return


def run_training(job: TrainJob, address: str | None = None, progress=print) -> dict:
    """Train (or resume) every stage, write the final SideNet to job.out as a save_pretrained folder,
    then run job.evaluate into <out>/evaluation/. A stage whose checkpoint is already written whole
    is not run again, so running a finished job again only evaluates."""
    job.validate()  # before starting anything
    stages = job.stages()
    summaries = []
    for k, stage in enumerate(stages, 1):
        done = Path(stage.out) / "train_summary.json"
        finished = json.loads(done.read_text()) if done.is_file() else {}
        same = finished.get("train", stage.train) == stage.train and finished.get("name", stage.name) == stage.name
        if finished.get("steps") == stage.train_config().steps and same:
            progress(f"[train] stage {k}/{len(stages)}: finished before, reusing {stage.out}")
            summaries.append(finished.get("stages", [finished])[-1] if k == len(stages) else finished)
            continue
        progress(f"[train] stage {k}/{len(stages)}: {stage.train_config().steps} steps -> {stage.out}")
        summaries.append(_run_stage(stage, address))
        if job.stop_after and summaries[-1]["steps"] < stage.train_config().steps:
            return summaries[-1]  # stopped early: the run stays resumable
    summary = {**summaries[-1], "stages": summaries, "seconds": round(sum(s["seconds"] for s in summaries), 1)}
    if job.read_window:
        set_read_window(Path(job.out), job.read_window)
        summary["read_window"] = job.read_window
    if len(stages) > 1:
        (Path(job.out) / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if job.evaluate:
        summary["evaluation"] = evaluate_model(job, address, progress)
    return summary


def set_read_window(checkpoint: Path, window: int) -> None:
    """Write `window` as the checkpoint's memory.window (checked as any runtime setting is), atomically."""
    from longmem.config import LongMemConfig
    from longmem.model import CONFIG_NAME

    path = checkpoint / CONFIG_NAME
    config = LongMemConfig.load(path)
    if config.memory.window == window:
        return
    updated = config.with_overrides({"memory.window": window}, checkpoint=True)
    tmp = path.with_name(f".{CONFIG_NAME}.tmp")
    updated.save(tmp)
    tmp.replace(path)


def evaluate_model(job: TrainJob, address: str | None = None, progress=print) -> dict:
    """job.evaluate on the final model: one report folder per entry under <out>/evaluation/."""
    from pipelines.evaluate import evaluate

    results = {}
    for eval_job in job.eval_jobs(ModelSource(checkpoint=job.out)):
        t0 = time.time()
        report = evaluate(eval_job, address=address, progress=progress)
        results[Path(eval_job.out).name] = {"out": eval_job.out, "seconds": round(time.time() - t0, 1),
                                            "overall": report["results"].get("overall")}
    return results


def _run_stage(job: TrainJob, address: str | None = None) -> dict:
    """One stage: train (or resume) and write its SideNet to job.out."""
    from pipelines.ray_env import init_ray

    cfg = job.train_config()
    init_ray(address)
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.time()
    probe = build_model({"model": job.model.to_dict()})
    if cfg.copy_head_only:
        require_copy_head(probe.sidenet)  # here, not first in every worker
    window = probe.config.memory.window
    dataset = corpus_stream(job)
    pool = math.ceil(cfg.distractor_tokens / window) * cfg.distractor_pool * window if cfg.distractor_tokens else 0
    docs, summary = read_corpus_head(job, max(job.key_center_tokens, DISTRACTOR_HEAD_FACTOR * pool))
    if not docs:
        raise InputError(f"no usable documents at the start of {job.corpus}: {summary['skipped']}")
    length = window * cfg.segments_per_episode
    fits = sum(d.size >= length for d in docs)
    if summary["corpus_read"] == "whole" and not fits:
        raise InputError(f"no training document holds one episode ({cfg.segments_per_episode} segments x {window} "
                         f"tokens = {length})")
    key_center = None
    if job.key_center_tokens > 0 and probe.config.memory.center_keys and not job.model.checkpoint:
        tokens = corpus_head(docs, job.key_center_tokens)
        key_center = probe.calibrate_key_center(tokens).tolist()
        print(f"[train] key centre set from {tokens.shape[1]} corpus tokens", flush=True)
    # Every worker encodes the same distractor pool (the driver draws it once, by the run's seed).
    distractors = [s.tolist() for s in distractor_segments(docs, window, cfg)]
    summary.update(episodes=cfg.steps * cfg.grad_accum * cfg.batch_size * job.workers)
    if summary["corpus_read"] == "whole":
        summary.update(too_short_for_an_episode=len(docs) - fits)
    print(f"[train] {summary['documents']} documents, {summary['tokens']} tokens ({summary['corpus_read']} of the "
          f"corpus, streamed to the workers); {summary['episodes']} episodes; skipped {summary['skipped'] or 'none'}",
          flush=True)
    del probe

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**asdict(job), "model": job.model.to_dict(), "key_center": key_center,
                           "distractor_segments": distractors},
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.use_gpu,
                                     resources_per_worker={"CPU": job.cpus_per_worker}),
        run_config=RunConfig(
            name=job.name,
            storage_path=job.storage(),
            checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints),
            failure_config=FailureConfig(max_failures=job.max_failures),
        ),
        datasets={"train": dataset},
        # Every worker reads the whole stream in the corpus's order (episodes follow it, and a resumed
        # run skips what it already trained on); Train's default ingest options would not keep it.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {job.name} ended without a checkpoint: {result.error}")
    out = Path(job.out)
    refuse_non_checkpoint(out)  # again: the folder may have been filled while training ran
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_NAME, map_location="cpu", weights_only=True)
            shutil.copytree(Path(d) / MODEL_DIR, tmp, dirs_exist_ok=True)
        summary.update(name=job.name, train=job.train, steps=state["step"], seconds=round(time.time() - t0, 1), out=str(out),
                       checkpoint=result.checkpoint.path, metrics=result.metrics)
        (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        replace_folder(tmp, out)  # the finished checkpoint appears whole, in one rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def corpus_head(docs: list[np.ndarray], tokens: int) -> torch.Tensor:
    """(1, n) the corpus's first `tokens` tokens, without copying all of it."""
    head, need = [], tokens
    for doc in docs:
        if need <= 0:
            break
        head.append(doc[:need])
        need -= len(head[-1])
    return torch.as_tensor(np.concatenate(head), dtype=torch.long)[None]
