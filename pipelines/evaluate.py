"""Evaluate LongMem with Ray Data: items spread over an autoscaling pool of model replicas.

    data --(driver: read, tokenize, build items)--> items --EvalActor pool (one model each)-->
    per-item results --(driver: sort by id, aggregate)--> report.json + report.md + report.png

Each item (a document, a ChapterBreak example, a group of ICL queries sharing one memory) is scored
on its own with a fresh memory, so the report does not depend on how many actors ran or in which
order items finished.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from longmem.config import LongMemConfig
from longmem.loading import ModelSource
from longmem.evaluation import (
    EvalError,
    EvalSettings,
    aggregate,
    document_items,
    icl_items,
    labelled_rows_from_books,
    read_labelled,
    score_item,
    suffix_items_from_books,
    suffix_items_from_chapterbreak,
    write_report,
)

TITLES = {
    "perplexity": "long-text perplexity (memory = the document's own past)",
    "suffix": "suffix identification (ChapterBreak protocol)",
    "icl": "memory-augmented in-context learning",
    "recall": "long-context recall (facts planted in a haystack, RULER-style)",
}
FALLBACK_NATIVE_WINDOW = 8192  # recall's backbone_long where a backbone's config names no context length


@dataclass
class EvalJob:
    task: str
    data: list[str]
    out: str
    # A trained checkpoint, or a fresh SideNet on a backbone (untrained: equal to the backbone).
    model: ModelSource | dict = field(default_factory=ModelSource)
    settings: dict = field(default_factory=dict)  # EvalSettings fields
    min_actors: int = 1
    max_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    text_field: str = "text"
    label_field: str = "label"
    scorer_factory: Callable | None = None  # settings dict -> Scorer; default: the model's ModelScorer

    def __post_init__(self):
        self.model = ModelSource.from_dict(self.model)

    def config(self) -> LongMemConfig:
        return self.model.config()

    def eval_settings(self) -> EvalSettings:
        settings = EvalSettings.from_dict({**self.settings, "task": self.task})
        settings.window = self.config().memory.window
        if self.task == "recall" and "long_window" not in self.settings:
            settings.long_window = native_window(self.config())
        return settings.validate()

    def validate(self) -> "EvalJob":
        if not self.data:
            raise EvalError("give at least one --data path")
        if not 1 <= self.min_actors <= self.max_actors:
            raise EvalError(f"need 1 <= min_actors <= max_actors, got {self.min_actors}..{self.max_actors}")
        self.model.validate()
        self.eval_settings()
        return self


class EvalActor:
    """Actor: one model replica (or the given scorer) scoring items."""

    def __init__(self, model, settings, num_threads, use_gpu, scorer_factory=None):
        import torch

        from longmem.evaluation import ModelScorer
        from longmem.loading import load_source

        torch.set_num_threads(max(1, num_threads))
        if scorer_factory is not None:
            self.scorer = scorer_factory(settings)
        else:
            device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
            model = load_source(model, device=device)
            self.scorer = ModelScorer(model, long_window=settings["long_window"])

    def __call__(self, batch: dict) -> dict:
        results = [json.dumps(score_item(self.scorer, pickle.loads(p))) for p in batch["payload"]]
        return {"id": batch["id"], "result": np.array(results, dtype=object)}


def native_window(config: LongMemConfig) -> int:
    """The backbone's own context length (SmolLM2-135M: 8,192; Gemma 3 270M: 32,768): what the
    backbone_long reading of recall reads, the last that many tokens."""
    from transformers import AutoConfig

    from longmem.backbone import resolve_backbone

    backbone = AutoConfig.from_pretrained(resolve_backbone(config.backbone.name)).get_text_config()
    return int(getattr(backbone, "max_position_embeddings", None) or FALLBACK_NATIVE_WINDOW)


def _tokenizer(config: LongMemConfig):
    from transformers import AutoTokenizer

    from longmem.backbone import resolve_backbone

    return AutoTokenizer.from_pretrained(resolve_backbone(config.backbone.name))


def _read_texts(paths: list[str], text_field: str) -> tuple[list[tuple[str, str]], dict]:
    """(doc_id, text) of every usable document, read by the shared Ray Data corpus reader."""
    from pipelines.corpus import read_documents

    docs, skipped = [], {}
    for row in read_documents(paths, text_field).iter_rows():
        if row["skip"]:
            skipped[row["skip"]] = skipped.get(row["skip"], 0) + 1
        else:
            docs.append((row["doc_id"], row["text"]))
    return sorted(docs), skipped


def build_items(job: EvalJob, settings: EvalSettings, config: LongMemConfig, progress=print) -> tuple[list[dict], dict]:
    tok = _tokenizer(config)
    tokenize = lambda text: np.asarray(tok(text, add_special_tokens=False).input_ids, dtype=np.int64)  # noqa: E731
    task = settings.task
    if task == "perplexity":
        texts, skipped = _read_texts(job.data, job.text_field)
        items, more = document_items([(d, tokenize(t)) for d, t in texts], settings)
    elif task == "suffix":
        jsons = [p for p in job.data if p.lower().endswith(".json")]
        items, skipped = [], {}
        for path in jsons:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise EvalError(f"{path}: no such file") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise EvalError(f"{path}: not a JSON file ({e})") from None
            got, sk = suffix_items_from_chapterbreak(data, tokenize, settings)
            items += got
            skipped = _merge(skipped, sk)
        books = [p for p in job.data if not p.lower().endswith(".json")]
        more = {}
        if books:
            texts, sk = _read_texts(books, job.text_field)
            got, more = suffix_items_from_books([(Path(d).stem, t) for d, t in texts], tokenize, settings)
            items += got
            skipped = _merge(skipped, sk)
    elif task == "recall":
        from longmem.evaluation.recall import chat_turn, recall_items

        texts, skipped = _read_texts(job.data, job.text_field)
        try:
            items, more = recall_items(texts, tokenize, settings, chat=chat_turn(tok))
        except ValueError as e:
            raise EvalError(str(e)) from None
    else:
        labelled = [p for p in job.data if p.lower().endswith((".jsonl", ".ndjson"))]
        rows, skipped = [], {}
        for path in labelled:
            if not Path(path).is_file():
                raise EvalError(f"{path}: no such file")
            got, sk = read_labelled(path, job.text_field, job.label_field)
            rows += got
            skipped = _merge(skipped, sk)
        books = [p for p in job.data if p not in labelled]
        if books:  # "which book is this passage from?", built from the books themselves
            texts, sk = _read_texts(books, job.text_field)
            rows += labelled_rows_from_books([(Path(d).stem, t) for d, t in texts], seed=settings.seed)
            skipped = _merge(skipped, sk)
        items, more = icl_items(rows, tokenize, settings)
    skipped = _merge(skipped, more)
    if not items:
        raise EvalError(f"no usable {task} examples in {', '.join(job.data)}"
                        + (f" (skipped: {skipped})" if skipped else ""))
    return items, skipped


def _item_tokens(item: dict) -> int:
    if item["kind"] == "document":
        return len(item["tokens"])
    if item["kind"] == "recall":
        return len(item["prompt"])
    return len(item["memory"]) + sum(len(q["context"]) + sum(len(c) for c in q["candidates"]) for q in item["questions"])


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def evaluate(job: EvalJob, address: str | None = None, progress=print) -> dict:
    """Run one evaluation; writes report.json/.md/.png into job.out and returns the report."""
    from pipelines.ray_env import init_ray

    job.validate()
    config, settings = job.config(), job.eval_settings()
    t0 = time.time()
    ray = init_ray(address)
    from ray.data import ActorPoolStrategy

    progress(f"[evaluate] {job.task}: building examples from {len(job.data)} path(s)")
    items, skipped = build_items(job, settings, config, progress)
    tokens = sum(_item_tokens(item) for item in items)
    progress(f"[evaluate] {len(items)} items, {tokens:,} tokens to read" + (f"; skipped {skipped}" if skipped else "")
             + f"; scoring on {job.min_actors}..{job.max_actors} actor(s) (progress is counted per item)")
    rows = [{"id": i, "payload": pickle.dumps(item)} for i, item in enumerate(items)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        EvalActor,
        fn_constructor_kwargs=dict(model=job.model.to_dict(), settings=settings.to_dict(), num_threads=math.ceil(job.num_cpus_per_actor),
                                   use_gpu=job.num_gpus_per_actor > 0, scorer_factory=job.scorer_factory),
        batch_size=1,
        num_cpus=job.num_cpus_per_actor,
        num_gpus=job.num_gpus_per_actor,
        compute=ActorPoolStrategy(min_size=job.min_actors, max_size=job.max_actors),
        batch_format="numpy",
    )
    results, t_score = [], time.time()
    for row in ds.iter_rows():
        results.append(json.loads(row["result"]))
        done = len(results)
        eta = (time.time() - t_score) / done * (len(items) - done)
        progress(f"[evaluate] {done}/{len(items)} items scored ({time.time() - t0:.0f} s, ~{eta:.0f} s left)")
    report = {
        "task": job.task,
        "title": TITLES[job.task],
        "model": {"checkpoint": job.model.checkpoint, "backbone": config.backbone.name,
                  "window": config.memory.window, "memory_tokens": config.memory.capacity_tokens,
                  "memory_read": config.read.mode, "sidenet_trained": bool(job.model.checkpoint)},
        "data": job.data,
        "settings": settings.to_dict(),
        "items": len(items),
        "skipped": skipped,
        "actors": [job.min_actors, job.max_actors],
        "seconds": round(time.time() - t0, 1),
        "results": aggregate(results, settings),
    }
    paths = write_report(report, job.out)
    progress(f"[evaluate] wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return report
