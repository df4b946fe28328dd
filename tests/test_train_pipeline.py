"""Ray Train on a real local Ray: 2 CPU workers (gloo), a tiny SideNet, real tokenised text."""

import json

import pytest
import torch

from conftest import longmem_on

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, austen_text):
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (folder / f"part{i}.txt").write_text(austen_text[i * 8000 : (i + 1) * 8000])
    (folder / "empty.txt").write_text("\n")
    (folder / "blob.txt").write_bytes(b"\x00\x01" * 50)
    (folder / "notes.jsonl").write_text('{"text": "' + austen_text[30000:33000].replace('"', "'").replace("\n", " ") + '"}\n{"title": 1}\n')
    return folder


def job(tiny_dir, corpus, out, name, storage, **kw):
    from pipelines.train_sidenet import TrainJob

    train = dict(steps=6, segments_per_episode=3, lr=1e-2, memory_lr=3e-2, warmup_steps=1,
                 curriculum="plain:0.5,repeat:0.5", seed=7, distractor_tokens=0)
    train.update(kw.pop("train", {}))
    model = {"backbone": str(tiny_dir), "overrides": TINY}
    return TrainJob(corpus=[str(corpus)], out=str(out), model=model, workers=2, cpus_per_worker=kw.pop("cpus_per_worker", 0.5), name=name,
                    storage_path=str(storage), checkpoint_every=3, log_every=1, train=train, **kw)


TINY = {"memory.window": 32, "memory.capacity_tokens": 256, "memory.dtype": "float32"}


def episode_loss(model, ids):
    bank = model.new_bank(1)
    losses = [model(seg, bank=bank, labels=seg, update_memory=True).loss.item() for seg in model.segments(ids)]
    return sum(losses) / len(losses)


def test_two_workers_train_resume_and_match_uninterrupted(ray_local, tiny_dir, corpus, tmp_path):
    from longmem.model import LongMem
    from pipelines.train_sidenet import run_training

    storage = tmp_path / "runs"
    # Interrupted after the checkpoint at step 3, then started again under the same name.
    # key_center_tokens: the driver centres memory keys once, and every run gets the same centre;
    # distractor_tokens: every worker encodes the same distractor pool, drawn by the driver.
    # The workers hold every CPU, as the recipe's do (one worker a core): the corpus stream must
    # still reach them.
    extra = dict(key_center_tokens=64, train={"distractor_tokens": 64}, cpus_per_worker=1.0)
    first = run_training(job(tiny_dir, corpus, tmp_path / "a", "resumed", storage, stop_after=3, **extra))
    assert first["steps"] == 3
    # The driver read only the corpus's head (key centre, distractor pool); the workers stream it all.
    assert first["corpus_read"].startswith("first ") and first["documents"] < 4
    resumed = run_training(job(tiny_dir, corpus, tmp_path / "b", "resumed", storage, **extra))
    assert resumed["steps"] == 6
    straight = run_training(job(tiny_dir, corpus, tmp_path / "c", "straight", storage, **extra))

    a = LongMem.from_pretrained(tmp_path / "b", backbone=longmem_on(str(tiny_dir)).backbone)
    b = LongMem.from_pretrained(tmp_path / "c", backbone=longmem_on(str(tiny_dir)).backbone)
    for (name, p), (_, q) in zip(a.sidenet.state_dict().items(), b.sidenet.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    assert a.sidenet.key_center.abs().sum() > 0 and a.key_center_digest() == b.key_center_digest()

    # Training lowered the loss on the episodes it trained on (the stream's first 12, both workers'),
    # and the backbone is the untouched original.
    from longmem.training import TrainConfig, episode_stream
    from pipelines.train_sidenet import corpus_stream

    spec = job(tiny_dir, corpus, tmp_path / "unused", "straight", storage, **extra)
    rows = [r for r in corpus_stream(spec).take_all() if not r["skip"]]
    stream = episode_stream(lambda: ((r["digest"], r["tokens"]) for r in rows), 32, TrainConfig(**spec.train))
    trained_on = [next(stream).ids[None] for _ in range(12)]
    fresh = longmem_on(str(tiny_dir), memory__window=32, memory__capacity_tokens=256)
    before = sum(episode_loss(fresh, ids) for ids in trained_on) / 12
    after = sum(episode_loss(a, ids) for ids in trained_on) / 12
    assert after < before - 0.05, (after, before)
    assert a.config.backbone.fingerprint == fresh.config.backbone.fingerprint
    assert straight["metrics"]["step"] == 6


def test_the_corpus_head_stops_early_and_reads_in_the_streams_order(ray_local, tiny_dir, corpus):
    from pipelines.train_sidenet import corpus_stream, read_corpus_head

    spec = job(tiny_dir, corpus, corpus / "unused", "head", corpus / "unused")
    docs, summary = read_corpus_head(spec, 10**9)
    assert summary["corpus_read"] == "whole" and summary["documents"] == len(docs) == 4
    assert summary["skipped"] == {"empty": 1, "binary": 1, "no 'text' field": 1}
    assert summary["tokens"] == sum(d.size for d in docs)
    head, partial = read_corpus_head(spec, 10)
    assert len(head) == 1 and partial["corpus_read"] == f"first {head[0].size} tokens"
    streamed = [r["tokens"] for r in corpus_stream(spec).take_all() if not r["skip"]]
    assert [d.tolist() for d in docs] == [list(t) for t in streamed]  # what the workers read, in order


def test_bad_training_data_is_a_clear_error(ray_local, tiny_dir, tmp_path):
    from longmem.model import InputError
    from pipelines.corpus import CorpusError
    from pipelines.train_sidenet import run_training

    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("Too short to hold one episode.")
    with pytest.raises(InputError, match="no training document holds one episode"):
        run_training(job(tiny_dir, short, tmp_path / "o", "short", tmp_path / "runs"))
    with pytest.raises(CorpusError, match="no such file or folder"):
        run_training(job(tiny_dir, tmp_path / "missing", tmp_path / "o", "missing", tmp_path / "runs"))
    with pytest.raises(InputError, match="unknown curriculum kind"):
        run_training(job(tiny_dir, short, tmp_path / "o", "bad", tmp_path / "runs", train={"curriculum": "copy:1"}))
    with pytest.raises(InputError, match="read_window must be a positive number of tokens"):
        run_training(job(tiny_dir, short, tmp_path / "o", "bad", tmp_path / "runs", read_window=0))


def test_continuing_a_checkpoint_may_change_only_settings_no_weight_depends_on(tiny_dir, tmp_path):
    from longmem.config import ConfigError
    from pipelines.train_sidenet import build_model

    longmem_on(str(tiny_dir), memory__window=32, memory__capacity_tokens=256).save_pretrained(tmp_path / "ckpt")
    ckpt = str(tmp_path / "ckpt")
    model = build_model({"model": {"checkpoint": ckpt, "overrides": {"memory": {"chunk_size": 4, "capacity_tokens": 128}}}})
    assert (model.config.memory.chunk_size, model.config.memory.capacity_tokens, model.config.memory.window) == (4, 128, 32)
    with pytest.raises(ConfigError, match="read.prev_bonus_init comes from the checkpoint's weights"):
        build_model({"model": {"checkpoint": ckpt, "overrides": {"read.prev_bonus_init": 1.5}}})
    with pytest.raises(ConfigError, match="must be a multiple of memory.chunk_size 5"):
        build_model({"model": {"checkpoint": ckpt, "overrides": {"memory.chunk_size": 5}}})


def test_two_workers_train_the_copy_head_alone(ray_local, tiny_dir, corpus, tmp_path):
    from longmem.model import LongMem
    from pipelines.train_sidenet import TrainJob, run_training

    start = longmem_on(str(tiny_dir), memory__window=32, memory__capacity_tokens=256, read__scale_init=1.0,
                       read__copy_init=-1.0)
    start.save_pretrained(tmp_path / "start")
    run_training(TrainJob(corpus=[str(corpus)], out=str(tmp_path / "out"), model={"checkpoint": str(tmp_path / "start")},
                          workers=2, cpus_per_worker=0.5, name="copy-only", storage_path=str(tmp_path / "runs"),
                          train=dict(steps=2, segments_per_episode=3, lr=1e-2, memory_lr=3e-2, warmup_steps=1,
                                     curriculum="plain:0.5,repeat:0.5", seed=7, copy_head_only=True,
                                     distractor_tokens=0)))
    trained = LongMem.from_pretrained(tmp_path / "out", backbone=start.backbone)
    before = start.sidenet.state_dict()
    for name, p in trained.sidenet.state_dict().items():
        assert torch.equal(p, before[name]) != name.startswith("memory_copy."), name  # only the copy head moved


def test_a_two_stage_job_trains_the_copy_head_second_and_skips_a_finished_stage(ray_local, tiny_dir, corpus, tmp_path):
    from longmem.model import LongMem
    from pipelines.train_sidenet import run_training

    import dataclasses

    j = dataclasses.replace(job(tiny_dir, corpus, tmp_path / "final", "staged", tmp_path / "runs"), workers=1,
                            cpus_per_worker=1.0, then=[{"copy_head_only": True, "steps": 2}], read_window=64,
                            evaluate=[{"task": "perplexity", "data": str(corpus / "part0.txt"),
                                       "settings": {"max_doc_tokens": 256}}])
    first_out = j.stages()[0].out
    summary = run_training(j)
    assert [s["steps"] for s in summary["stages"]] == [6, 2]
    first = LongMem.from_pretrained(first_out, backbone=longmem_on(str(tiny_dir)).backbone)
    final = LongMem.from_pretrained(tmp_path / "final", backbone=first.backbone)
    # both stages train at the model's window of 32; the final model reads at the job's read_window
    assert (first.config.memory.window, final.config.memory.window) == (32, 64)
    before = first.sidenet.state_dict()
    for name, p in final.sidenet.state_dict().items():
        assert torch.equal(p, before[name]) != name.startswith("memory_copy."), name  # stage 2 moved the copy head only
    report = json.loads((tmp_path / "final" / "evaluation" / "perplexity" / "report.json").read_text())
    assert report["results"]["overall"]["scored_tokens"] > 0  # the job evaluated its model, next to it
    assert report["model"]["window"] == 64
    assert summary["evaluation"]["perplexity"]["out"] == str(tmp_path / "final" / "evaluation" / "perplexity")
    weights = tmp_path / "final" / "sidenet.safetensors"
    written = weights.read_bytes()
    again = run_training(j)  # both stages are finished: neither is trained again, only the evaluation runs
    assert [s["seconds"] for s in again["stages"]] == [s["seconds"] for s in summary["stages"]]
    assert weights.read_bytes() == written
    changed = dataclasses.replace(j, then=[{"copy_head_only": True, "steps": 2, "lr": 1e-3}], evaluate=[])
    rerun = run_training(changed)  # new settings for stage 2: it is trained again, stage 1 is not
    assert rerun["stages"][1]["train"]["lr"] == 1e-3  # run again under the new settings (it resumes its run)
    assert rerun["stages"][0]["seconds"] == summary["stages"][0]["seconds"]


def test_ray_workers_get_the_torch_allocator_settings(ray_local):
    """Workers of a local Ray started by init_ray inherit TORCH_ENV (huge pages for large CPU
    tensors), which torch reads when it is first imported in the worker."""
    from pipelines.ray_env import TORCH_ENV

    @ray_local.remote(num_cpus=0)
    def worker_env():
        import os

        return {key: os.environ.get(key) for key in TORCH_ENV}

    assert ray_local.get(worker_env.remote()) == TORCH_ENV
