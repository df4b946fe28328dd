"""The recall suite: its generators, its scoring, and its pipeline with an oracle that reads memory."""

import json
import sys

import numpy as np
import pytest
import yaml

from conftest import AUSTEN, ROOT
from longmem.evaluation import EvalSettings
from longmem.evaluation.recall import (EVAL_TEMPLATES, RECALL_TASKS, interval, needles, recall_items, recall_score,
                                       split_sentences)

LOCAL = 64  # the local window of the oracle: what "the last LOCAL tokens" can see


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def tokenize_with(tok):
    return lambda text: np.asarray(tok(text, add_special_tokens=False).input_ids, dtype=np.int64)


def settings(**kw):
    base = dict(task="recall", window=32, recall_lengths=(512, 2048), recall_trials=6, depths=(0.1, 0.5, 0.9))
    return EvalSettings(**{**base, **kw}).validate()


def chat_turn(tok):
    return lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)


def test_items_plant_every_fact_at_its_depth_and_end_with_the_question(tok, austen_text):
    tokenize = tokenize_with(tok)
    items, _ = recall_items([("p", austen_text[:200_000])], tokenize, settings(recall_lengths=(2048, 4096)),
                            chat=chat_turn(tok))
    assert len(items) == len(RECALL_TASKS) * 2 * 6
    assistant = chat_turn(tok)("")[chat_turn(tok)("").rindex("<|im_end|>") + len("<|im_end|>"):]
    for item in items:
        prompt = item["prompt"]
        assert item["length"] <= len(prompt) <= item["length"] + 300, (item["id"], len(prompt))  # whole sentences
        text = tok.decode(prompt)
        for answer in item["answers"]:
            assert answer in text  # every expected value (or variable) is planted
        first = item["fact_positions"][0] / len(prompt)
        assert abs(first - item["depth"]) < 0.15, (item["id"], first, item["depth"])  # whole sentences
        if item["style"] == "chat":  # the question is a user turn, then the assistant's opening
            assert text.endswith(assistant) and "<|im_start|>user\n" in text[-400:], text[-400:]
            turn = text[text.rindex("<|im_start|>user\n"):]
            assert "Question:" not in turn and "Answer:" not in turn and turn.count("?") + turn.count(".") >= 1
            assert item["max_new_tokens"] > 20  # room for a sentence around the value
        else:
            assert text.rstrip().endswith(("is:", "is", "Answer:", "are"))  # the question closes the prompt
            assert "<|im_start|>" not in text
    # the styles in turn: each (task, length) cell asks every style twice in its six trials
    for task in RECALL_TASKS:
        cell = [i["style"] for i in items if i["task"] == task and i["length"] == 2048]
        assert sorted(cell) == sorted(["restate", "paraphrase", "chat"] * 2), cell
    # every style meets every value kind within nine trials
    nine, _ = recall_items([("p", austen_text[:200_000])], tokenize,
                           settings(recall_lengths=(2048,), recall_trials=9, recall_tasks=("single",)), chat=chat_turn(tok))
    assert sorted((i["style"], i["value_kind"]) for i in nine) == sorted(
        (s, k) for s in ("restate", "paraphrase", "chat") for k in ("number", "word", "code"))
    again, _ = recall_items([("p", austen_text[:200_000])], tokenize, settings(recall_lengths=(2048, 4096)),
                            chat=chat_turn(tok))
    assert all(np.array_equal(a["prompt"], b["prompt"]) for a, b in zip(items, again))  # seeded
    plain, _ = recall_items([("p", austen_text[:200_000])], tokenize,
                            settings(recall_lengths=(2048,), recall_styles=("restate", "paraphrase")))
    assert {i["style"] for i in plain} == {"restate", "paraphrase"}  # no chat template needed
    with pytest.raises(ValueError, match="chat template"):
        recall_items([("p", austen_text[:200_000])], tokenize, settings(recall_lengths=(2048,)))


def test_distractors_share_the_form_and_not_the_key():
    import random

    for template in EVAL_TEMPLATES:
        facts, question, answers = needles("multikey", random.Random(0), "paraphrase", "number", template)
        assert len(facts) == 4 and len(answers) == 1
        keys = [f.split(" for ")[-1].split(" is")[0] if " for " in f else f.split("kept for ")[-1] for f in facts]
        assert len(set(keys)) == 4  # four different keys
        frame = lambda f: "".join(c for c in f if not c.isdigit())  # noqa: E731
        assert len({len(frame(f).split()) for f in facts}) == 1  # the same form
        assert answers[0] in facts[0] and all(answers[0] not in f for f in facts[1:])
    facts, question, answers = needles("vartrack", random.Random(1), "restate", "number", EVAL_TEMPLATES[0])
    assert len(answers) == 3 and facts[1].endswith(f"= VAR {answers[0]}.") and facts[2].endswith(f"= VAR {answers[1]}.")


def test_evaluation_templates_and_haystack_are_never_trained_on():
    """Training plants PASSKEY_FACT / asks PASSKEY_QUESTION; recall uses other sentence frames, and
    the recipe's training corpus leaves the default haystack (Persuasion) out."""
    from longmem.training import PASSKEY_FACT, PASSKEY_QUESTION

    def frames(text):
        return {w for w in text.replace("{keys}", " ").replace("{key}", " ").replace("{value}", " ").replace("{kind}", " ").lower().split()
                if len(w) > 3}

    from longmem import facts
    from longmem.evaluation import recall

    trained = frames(PASSKEY_FACT) | frames(PASSKEY_QUESTION)
    for t in facts.TRAIN_TEMPLATES:
        trained |= frames(t.fact) | frames(t.restate) | frames(t.paraphrase) | frames(t.many)
    for train_words, eval_words in ((facts.TRAIN_ADJECTIVES, recall.ADJECTIVES), (facts.TRAIN_NOUNS, recall.NOUNS),
                                    (facts.TRAIN_WORDS, recall.WORDS)):
        assert not set(train_words) & set(eval_words)  # no entity or word value is both trained and asked
    for t in EVAL_TEMPLATES:
        for text in (t.fact, t.restate, t.paraphrase, t.many):
            assert len(frames(text) & trained) <= 1, text  # no shared phrasing beyond a stray word
    recipe = yaml.safe_load((ROOT / "jobs" / "configs" / "train_sidenet.yaml").read_text())["job"]["corpus"]
    # the held-out texts: the evaluations' novel, the second text of another kind, the demo's text
    assert not any(held in p for p in recipe for held in ("persuasion", "hamlet", "tempest"))
    assert any(p.startswith("shakespeare:") for p in recipe)  # plays are trained on: Hamlet is no stranger by kind


def test_scoring_and_intervals():
    assert recall_score("The answer is 1234567.", ["1234567"]) == 1.0
    assert recall_score("AB-1234 and cd-9999", ["ab-1234", "CD-9999", "EF-0000"]) == pytest.approx(2 / 3)
    assert recall_score("nothing", ["x1"]) == 0.0
    mean, half = interval([1.0] * 18 + [0.0] * 2)
    assert mean == 0.9 and 0.08 < half < 0.25  # Wilson (the wider side), 20 trials
    assert interval([1.0] * 20)[1] > 0  # never a zero-width interval on few trials
    assert split_sentences("One. Two!  Three?") == ["One.", "Two!", "Three?"]


def test_bad_recall_settings_are_clear_errors():
    from longmem.evaluation import EvalError

    with pytest.raises(EvalError, match="recall tasks must be among"):
        settings(recall_tasks=("needle",))
    with pytest.raises(EvalError, match="at least twice the window"):
        settings(recall_lengths=(40,))
    with pytest.raises(EvalError, match="depths are shares"):
        settings(depths=(1.5,))
    with pytest.raises(EvalError, match="recall styles must be distinct"):
        settings(recall_styles=("restate", "shouting"))
    with pytest.raises(EvalError, match="recall styles must be distinct"):
        settings(recall_styles=())


class RecallOracle:
    """Answers with every value its reading can see: the memory reading sees the whole prompt, the
    others its last LOCAL tokens. Loaded on the actors with the real tokenizer."""

    def __init__(self, settings):
        from transformers import AutoTokenizer

        from longmem.backbone import resolve_backbone

        self.tok = AutoTokenizer.from_pretrained(resolve_backbone("smollm2-135m-instruct"))

    def answers(self, prompt, max_new_tokens):
        full, local = self.tok.decode(prompt), self.tok.decode(prompt[-LOCAL:])
        return {"longmem_memory": full, "longmem_no_memory": local, "backbone": local, "backbone_long": local}


@pytest.mark.slow
def test_recall_report_through_the_pipeline_with_an_oracle(ray_local, tmp_path):
    import ray.cloudpickle as cloudpickle

    from pipelines.evaluate import EvalJob, evaluate

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    job = EvalJob(task="recall", data=[str(AUSTEN / "persuasion.txt")], out=str(tmp_path / "r"),
                  model={"overrides": {"memory.window": 32}},
                  settings={"recall_lengths": [512, 1024], "recall_trials": 4, "depths": [0.2, 0.6]},
                  scorer_factory=RecallOracle, max_actors=2, num_cpus_per_actor=0.5)
    report = evaluate(job, progress=lambda *_: None)
    cells = report["results"]["by_cell"]
    assert len(cells) == len(RECALL_TASKS) * 2 and all(c["trials"] == 4 for c in cells)
    for cell in cells:
        assert cell["longmem_memory"] == 1.0  # everything is in memory
        assert cell["backbone"] < 1.0  # the facts sit far before the last 64 tokens
    assert report["settings"]["long_window"] == 8192  # recall's native-window reading
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| single | 512 | 4 | 100% ±" in md and "paraphrase" in md
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert len(saved["results"]["trials"]) == len(RECALL_TASKS) * 2 * 4


def test_model_scorer_answers_four_ways_on_the_same_prompt(tiny_dir, tok, austen_text):
    """A fresh model without the copy head reads like its backbone: with memory, without it, and the
    backbone over the same local window give the same greedy answer."""
    from conftest import longmem_on
    from longmem.evaluation import ModelScorer

    model = longmem_on(str(tiny_dir), memory__window=64, read__copy_init=None, read__copy_match_init=None)
    items, _ = recall_items([("p", austen_text[:50_000])], tokenize_with(tok),
                            settings(window=64, recall_lengths=(300,), recall_trials=1, recall_tasks=("single",)))
    out = ModelScorer(model, long_window=256).answers(items[0]["prompt"], 6)
    assert set(out) == {"longmem_memory", "longmem_no_memory", "backbone", "backbone_long"}
    assert out["longmem_memory"] == out["longmem_no_memory"] == out["backbone"]


def test_every_question_names_its_key():
    import random

    from longmem.evaluation.recall import ADJECTIVES, NOUNS

    keys = [f"the {a} {n}" for a in ADJECTIVES for n in NOUNS]
    for template in EVAL_TEMPLATES:
        for style in ("restate", "paraphrase"):
            facts, question, answers = needles("multikey", random.Random(2), style, "code", template)
            asked = next(f for f in facts if answers[0] in f)
            key = next(k for k in keys if k in asked)
            assert key in question, (template.fact, style, question)
