"""Evaluation suite: task builders, scoring, aggregation and the Ray Data pipeline.

The oracle tests replace the model at the scoring interface: what they test is that the task
builders put the answer where the task says (memory only) and that scoring and aggregation read
the scores correctly, end to end on a local Ray."""

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import AUSTEN, ROOT, tiny_longmem

pytestmark = pytest.mark.slow

TINY = {"memory.window": 32, "memory.capacity_tokens": 1024, "memory.dtype": "float32"}


def tiny_source(tiny_dir, **settings):
    """The evaluation job's model section: a fresh model on the tiny backbone."""
    return {"backbone": str(tiny_dir), "overrides": {**TINY, **settings}}


class MemoryLookupOracle:
    """Scores a candidate 1 when the context's last tokens followed by the candidate occur in memory
    (and only the memory reading may look there); every other reading gets no information."""

    def __init__(self, settings):
        self.tail = 6

    def token_nll(self, ids):
        raise AssertionError("not a perplexity scorer")

    def choice_scores(self, memory, context, candidates):
        memory, context = np.asarray(memory).tolist(), np.asarray(context).tolist()
        text = ",".join(map(str, memory))
        scores = {"backbone": [0.0] * len(candidates), "backbone_long": [0.0] * len(candidates),
                  "longmem_no_memory": [0.0] * len(candidates)}
        found = []
        for cand in candidates:
            pattern = ",".join(map(str, context[-self.tail:] + np.asarray(cand).tolist()))
            assert pattern not in ",".join(map(str, context)), "the answer must not be in the local context"
            found.append(1.0 if pattern in text else 0.0)
        scores["longmem_memory"] = found
        return scores


def run_eval(task, data, out, **kw):
    from pipelines.evaluate import EvalJob, evaluate

    job = EvalJob(task=task, data=[str(d) for d in data], out=str(out), **kw)
    return evaluate(job, progress=lambda *_: None)


def register_oracle():
    import ray.cloudpickle as cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def tokenize(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    return lambda text: np.asarray(tok(text, add_special_tokens=False).input_ids, dtype=np.int64)


@pytest.fixture(scope="module")
def docs(tmp_path_factory, austen_text):
    folder = tmp_path_factory.mktemp("docs")
    words = austen_text.split()
    (folder / "a.txt").write_text(" ".join(words[1000:1250]))
    (folder / "b.txt").write_text(" ".join(words[3000:3600]))
    (folder / "c.jsonl").write_text(json.dumps({"text": " ".join(words[5000:5100])}) + "\n"
                                    + json.dumps({"text": "Too short."}) + "\n" + json.dumps({"body": "x"}) + "\n")
    return folder


def test_perplexity_report_same_for_one_and_two_actors(ray_local, tiny_dir, docs, tmp_path):
    settings = {"long_window": 128, "min_doc_tokens": 40, "length_buckets": [200, 500]}
    # Without the copy head (which mixes in what memory says comes next from step 0), a fresh model
    # reads memory through its value path alone, which starts on a zero scale.
    model = tiny_source(tiny_dir, **{"read.copy_init": None, "read.copy_match_init": None})
    one = run_eval("perplexity", [docs], tmp_path / "one", model=model, settings=settings)
    two = run_eval("perplexity", [docs], tmp_path / "two", model=model, settings=settings,
                   max_actors=2, num_cpus_per_actor=0.5)
    assert one["results"] == two["results"]
    assert one["skipped"] == {"too short": 1, "no 'text' field": 1}
    res = one["results"]
    assert res["overall"]["documents"] == 3
    assert sum(b["documents"] for b in res["by_document_length"]) == 3
    # A fresh zero-init LongMem is its backbone: every LongMem reading equals the backbone exactly,
    # which also shows that all readings score the same tokens.
    for row in [res["overall"], *res["by_document_length"], *res["by_position"]]:
        assert row["longmem_no_memory"] == pytest.approx(row["backbone"], rel=1e-5)
        assert row["longmem_memory"] == pytest.approx(row["backbone"], rel=1e-5)
    assert res["overall"]["backbone_long"] != res["overall"]["backbone"]  # it sees more context past 32 tokens
    for name in ("report.json", "report.md", "report.png"):
        assert (tmp_path / "one" / name).stat().st_size > 0
    assert json.loads((tmp_path / "one" / "report.json").read_text())["results"] == res
    md = (tmp_path / "one" / "report.md").read_text()
    assert "| all |" in md and "longmem_memory" in md


def test_model_scorer_matches_a_segment_by_segment_reference():
    """token_nll (and perplexity_report, built on it) == reading the segments by hand."""
    import torch.nn.functional as F

    from longmem.evaluation import ModelScorer, perplexity_report

    model = tiny_longmem(read__scale_init=0.5)  # a live value read: memory changes the output
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    nll = ModelScorer(model, long_window=64).token_nll(ids[0].numpy())
    report = perplexity_report(model, ids)
    reference = {"backbone": [], "longmem_no_memory": [], "longmem_memory": []}
    bank = model.new_bank(1)
    with torch.no_grad():
        for start in range(0, ids.shape[1], model.config.memory.window):
            seg = ids[:, start : start + model.config.memory.window]
            if seg.shape[1] < 2:
                continue
            target = seg[0, 1:]
            previous = ids[:, start - 1] if start else None
            memory = model(seg, bank=bank, update_memory=True, previous_ids=previous,
                           context_ids=model.memory_context(ids, start)).logits
            for reading, logits in (("backbone", model.backbone_logits(seg)), ("longmem_no_memory", model(seg).logits),
                                    ("longmem_memory", memory)):
                reference[reading].append(F.cross_entropy(logits[0, :-1].float(), target, reduction="none"))
    for reading, parts in reference.items():
        expected = torch.cat(parts)
        values = nll[reading][~np.isnan(nll[reading])]
        assert len(values) == report["scored_tokens"] == len(expected)
        assert math.exp(values.mean()) == pytest.approx(math.exp(expected.mean().item()), rel=1e-5)
        assert report["perplexity"][reading] == pytest.approx(math.exp(expected.mean().item()), rel=1e-5)
    assert np.array_equal(np.isnan(nll["backbone_long"]), np.isnan(nll["backbone"]))
    assert report["perplexity"]["longmem_memory"] != pytest.approx(report["perplexity"]["longmem_no_memory"], rel=1e-4)


def test_choice_scores_equal_uncached_scoring_of_each_candidate():
    """The KV-cached scorer == scoring context + candidate from scratch for every reading, with the
    context's overflow in memory and the same local tokens for every reading."""
    from longmem.evaluation import ModelScorer

    model = tiny_longmem(read__scale_init=0.5)
    g = torch.Generator().manual_seed(1)
    memory = torch.randint(3, 128, (300,), generator=g).numpy()
    context = torch.randint(3, 128, (40,), generator=g).numpy()  # longer than fits: the head moves to memory
    cands = [torch.randint(3, 128, (n,), generator=g).numpy() for n in (5, 8, 3)]
    scorer = ModelScorer(model, long_window=64, length_normalize=False)
    scores = scorer.choice_scores(memory, context, cands)
    again = scorer.choice_scores(memory, context, cands)  # the encoded memory is reused, unchanged
    assert again == scores
    keep = 32 - 8
    local, far_memory = context[-keep:], np.concatenate([memory, context[:-keep]])
    bank = model.new_bank(1)
    model.write_memory(torch.as_tensor(memory)[None], bank)  # the shared memory, then the overflow
    model.write_memory(torch.as_tensor(context[:-keep])[None], bank)
    far = np.concatenate([far_memory, local])[-(64 - 8):]

    def logp(logits, cand):
        lp = torch.log_softmax(logits[0, -len(cand) - 1 : -1].float(), -1)
        return lp.gather(-1, torch.as_tensor(cand)[:, None]).sum().item()

    for i, cand in enumerate(cands):
        ids = torch.as_tensor(np.concatenate([local, cand]))[None]
        long_ids = torch.as_tensor(np.concatenate([far, cand]))[None]
        expected = {"backbone": logp(model.backbone_logits(ids), cand),
                    "longmem_no_memory": logp(model(ids).logits, cand),
                    "longmem_memory": logp(model(ids, bank=bank).logits, cand),
                    "backbone_long": logp(model.backbone_logits(long_ids), cand)}
        for reading, value in expected.items():
            assert scores[reading][i] == pytest.approx(value, rel=1e-4, abs=1e-4), reading
    assert scores["longmem_memory"] != scores["longmem_no_memory"]
    with pytest.raises(ValueError, match="does not fit"):
        ModelScorer(model).choice_scores(memory, context, [np.arange(3, 40)])


def test_suffix_oracle_reads_the_answer_from_memory_only(ray_local, tiny_dir, tokenize, tmp_path):
    """ChapterBreak JSON where the true opening (after the chapter's last words) was quoted early in
    the context: the memory reading of an oracle is exactly right, the others are at chance."""
    register_oracle()
    rng = random.Random(0)
    vocab = "the of and to a in that was her she he it his as with had for you not be".split()
    prose = lambda n: " ".join(rng.choice(vocab) for _ in range(n))  # noqa: E731
    data = {"pg19": {}, "ao3": {}}
    for book in range(4):
        examples = []
        for n in range(3):
            ending = f" zebra{book}x{n} quokka ended here."
            pos = f" Unique{book}y{n} opening words " + prose(30)  # quoted early: in memory, not in context
            ctx = prose(60) + ending + pos + " " + prose(40) + ending
            examples.append({"ctx": ctx, "pos": pos, "negs": [f"Other{book}z{n}w{i} " + prose(30) for i in range(5)]})
        data["ao3" if book % 2 else "pg19"][f"book{book}"] = examples
    data["ao3"]["broken"] = [{"ctx": "no candidates"}]
    path = tmp_path / "chapterbreak_ctx_test.json"
    path.write_text(json.dumps(data))
    settings = {"prefix_tokens": [128, 100000], "candidate_tokens": 12, "long_window": 64}
    report = run_eval("suffix", [path], tmp_path / "out", model=tiny_source(tiny_dir), settings=settings,
                      scorer_factory=MemoryLookupOracle, max_actors=2, num_cpus_per_actor=0.5)
    res = report["results"]
    assert res["overall"]["questions"] == 12
    assert res["overall"]["longmem_memory"] == 1.0
    for reading in ("backbone", "backbone_long", "longmem_no_memory"):
        assert res["overall"][reading] == pytest.approx(1 / 6, abs=1e-4)  # ties share the credit: chance
    assert report["skipped"] == {"missing ctx/pos/negs": 1, "context shorter than 100000 tokens": 12}
    assert (tmp_path / "out" / "report.png").exists()


def test_icl_oracle_reads_demonstrations_in_memory(ray_local, tiny_dir, tmp_path):
    """Every query has a copy among the demonstrations in memory, none in context: the oracle's
    memory reading is exactly right for every seed."""
    register_oracle()
    rng = random.Random(1)
    rows = []
    for i in range(8):
        text = " ".join(rng.choice("alpha beta gamma delta epsilon zeta eta theta".split()) for _ in range(12))
        rows += [{"text": f"{text} item{i}", "label": ["red", "green", "blue"][i % 3]}] * 6
    rows.append({"text": "no label here"})
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    settings = {"shots": 0, "memory_shots": 43, "queries": 5, "seeds": [0, 1, 2], "queries_per_item": 2,
                "long_window": 64, "template": "Text: {text}\nColour: {label}\n\n"}
    report = run_eval("icl", [path], tmp_path / "out", model=tiny_source(tiny_dir), settings=settings,
                      scorer_factory=MemoryLookupOracle)
    res = report["results"]
    assert res["overall"]["questions"] == 15
    assert [g["group"] for g in res["by_group"]] == [0, 1, 2]
    assert all(g["longmem_memory"] == 1.0 for g in res["by_group"])
    assert res["overall"]["longmem_no_memory"] == pytest.approx(1 / 3, abs=1e-4)
    assert report["skipped"] == {"missing text/label": 1}


def test_book_suffix_negatives_never_occur_in_the_prefix(tokenize):
    """A wrong opening found verbatim in memory would reward copying; the builder keeps them out."""
    from longmem.evaluation import EvalSettings, suffix_items_from_books

    book = (AUSTEN / "persuasion.txt").read_text()
    settings = EvalSettings(task="suffix", window=512, prefix_tokens=(4096, 16384), examples_per_length=30).validate()
    items, _ = suffix_items_from_books([("persuasion", book)], tokenize, settings)
    assert len(items) > 20
    for item in items:
        q = item["questions"][0]
        prefix = np.concatenate([item["memory"], q["context"]]).astype(np.int64).tobytes()
        found = [np.asarray(c, dtype=np.int64)[:16].tobytes() in prefix for c in q["candidates"]]
        assert not any(found), item["id"]
        assert len(set(map(bytes, (np.asarray(c).tobytes() for c in q["candidates"])))) == 6


def test_suffix_and_icl_from_books_end_to_end(ray_local, tiny_dir, tmp_path):
    """Chapter breaks and "which novel?" passages built from real books, scored by a tiny model."""
    books = [AUSTEN / "persuasion.txt", AUSTEN / "northangerabbey.txt"]
    suffix = run_eval("suffix", books, tmp_path / "suffix", model=tiny_source(tiny_dir),
                      settings={"prefix_tokens": [64, 256], "candidate_tokens": 8, "examples_per_length": 2,
                                "long_window": 64})
    res = suffix["results"]
    assert [g["group"] for g in res["by_group"]] == [64, 256]
    assert res["overall"]["questions"] == 8 and res["by_group"][0]["chance"] == pytest.approx(1 / 6, abs=1e-4)
    # A fresh model without memory is its backbone, so their answers agree exactly.
    for q in res["questions"]:
        assert q["backbone"] == q["longmem_no_memory"]
    icl = run_eval("icl", books, tmp_path / "icl", model=tiny_source(tiny_dir, **{"memory.window": 128}),
                   settings={"shots": 1, "memory_shots": 6, "queries": 4, "seeds": [0, 1], "long_window": 256})
    assert icl["results"]["overall"]["questions"] == 8
    assert icl["results"]["by_group"][0]["chance"] == 0.5  # two books, two labels
    assert "Persuasion" in (tmp_path / "icl" / "report.json").read_text()


def test_bad_evaluation_inputs(ray_local, tiny_dir, docs, tmp_path):
    from longmem.evaluation import EvalError

    kw = dict(model=tiny_source(tiny_dir))
    with pytest.raises(EvalError, match="must contain"):
        run_eval("icl", [docs], tmp_path / "o", settings={"template": "{text} only"}, **kw)
    rows = [{"text": f"passage {i}", "label": "yes" if i % 2 else "no"} for i in range(40)]
    labelled = tmp_path / "l.jsonl"
    labelled.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(EvalError, match="labels not in the label set"):
        run_eval("icl", [labelled], tmp_path / "o", settings={"labels": ["yes", "maybe"], "memory_shots": 4}, **kw)
    with pytest.raises(EvalError, match="needs 263 labelled rows"):
        run_eval("icl", [labelled], tmp_path / "o", **kw)
    with pytest.raises(EvalError, match="no usable perplexity examples"):
        run_eval("perplexity", [docs / "c.jsonl"], tmp_path / "o", settings={"min_doc_tokens": 10_000}, **kw)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(EvalError, match="not a ChapterBreak file"):
        run_eval("suffix", [bad], tmp_path / "o", settings={"candidate_tokens": 8, "prefix_tokens": [64]}, **kw)
    with pytest.raises(EvalError, match="candidate_tokens must be in"):
        run_eval("suffix", [bad], tmp_path / "o", **kw)  # 128-token candidates cannot fit a 32-token window
    with pytest.raises(EvalError, match="unknown task"):
        run_eval("rouge", [docs], tmp_path / "o", **kw)
    # The command line turns each into one line and exit status 2.
    cmd = [sys.executable, "-m", "pipelines.cli", "evaluate", "icl", "--data", str(labelled), "--out", str(tmp_path / "o"),
           "--backbone", str(tiny_dir), "--labels", "yes,maybe"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "labels not in the label set" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_job_entrypoint(tiny_dir, docs, tmp_path):
    """jobs/evaluate.py with its YAML config and --set overrides, as `ray job submit` runs it."""
    out = tmp_path / "report"
    cmd = [sys.executable, "jobs/evaluate.py", "--set", f"job.data=[{docs / 'b.txt'}]", "--set", f"job.out={out}",
           "--set", f"job.model.backbone={tiny_dir}", "--set", "job.model.overrides={memory.window: 32, memory.dtype: float32}",
           "--set", "job.max_actors=1", "--set", "job.settings={long_window: 64}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| all |" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "perplexity" and report["results"]["overall"]["documents"] == 1
