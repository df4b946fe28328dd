"""Long-context recall in the style of RULER, generated offline from any haystack text.

Tasks (each a prompt of `length` tokens: haystack sentences with facts planted at a depth, and a
question at the end; scored by string match on greedy answers):

    single      one fact; its value
    multikey    one fact among distractor facts of the same form (other keys); the asked key's value
    multivalue  several values for one key; all of them (score: the share found)
    multiquery  several facts; the values of all their keys (score: the share found)
    vartrack    a chain of assignments (VAR A = 12345, VAR B = VAR A, ...); every variable that
                holds the value (score: the share found)

Every question names its key (in multikey it is what tells the asked fact from the distractors).
Facts are written and asked with EVAL_TEMPLATES and key words of their own, which no training
episode uses (training plants PASSKEY_FACT and facts.TRAIN_TEMPLATES; a test checks they never
share a sentence frame or a key word). Trials take the question styles in turn (`style`), so
recall of a copied sentence and of a question in other words are reported apart:

    restate     the fact's own words up to the value ("... the special magic number for X is:")
    paraphrase  other words, as a plain-text quiz line ("Question: which magic number ...? Answer:")
    chat        the paraphrase as one user turn of the model's chat template, the way a user asks
                a chat endpoint about a document in memory (the text before it is the document)
"""

from __future__ import annotations

import math
import random
import re
import string

import numpy as np

from ..facts import VALUE_KINDS, Template, key, value

RECALL_TASKS = ("single", "multikey", "multivalue", "multiquery", "vartrack")
STYLES = ("restate", "paraphrase", "chat")

# Evaluation only: never planted in training (tests/test_recall.py checks it).
EVAL_TEMPLATES = (
    Template(fact=" One of the special magic {kind}s for {key} is: {value}.",
             restate=" One of the special magic {kind}s for {key} is:",
             paraphrase=" Question: which magic {kind} was given for {key}? Answer:",
             many=" Question: what are all the special magic {kind}s for {keys}? Answer:"),
    Template(fact=" The archive lists {value} as the {kind} kept for {key}.",
             restate=" The {kind} that the archive lists as kept for {key} is",
             paraphrase=" Question: what {kind} is kept for {key}, according to the archive? Answer:",
             many=" Question: which {kind}s does the archive keep for {keys}? Answer:"),
)
VARIABLE_FACT = " VAR {name} = {value}."
VARIABLE_QUESTION = (" Question: find every variable that is assigned the value {value}, directly or through"
                     " another variable. Answer: the variables are")

ADJECTIVES = ("amber", "quiet", "northern", "silver", "hollow", "crimson", "gentle", "frozen", "distant", "velvet",
              "brisk", "hidden", "golden", "rusty", "narrow", "bright")
NOUNS = ("lantern", "harbour", "orchard", "falcon", "meadow", "compass", "violin", "glacier", "ledger", "cottage",
         "beacon", "thistle", "anchor", "prism", "quarry", "saddle")
WORDS = ("marble", "cascade", "juniper", "tundra", "quartz", "saffron", "lagoon", "cobalt", "emberly", "nimbus",
         "paprika", "zephyr", "bramble", "obsidian", "tamarind", "verdigris")


def _value(kind: str, rng: random.Random) -> str:
    return value(kind, rng, WORDS)


def _key(rng: random.Random, taken: set) -> str:
    return key(rng, taken, ADJECTIVES, NOUNS)


def needles(task: str, rng: random.Random, style: str, kind: str, template: Template):
    """(fact sentences, question, answers) for one trial of `task`."""
    taken: set = set()
    fill = lambda text, **kw: text.format(kind=kind, **kw)  # noqa: E731
    if task == "vartrack":
        value = str(rng.randrange(10_000, 100_000))
        # five capitals, as RULER names them: a name never matches an ordinary word by chance
        names = list(dict.fromkeys("".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(4)))
        chain = [VARIABLE_FACT.format(name=names[0], value=value)]
        chain += [VARIABLE_FACT.format(name=b, value=f"VAR {a}") for a, b in zip(names[:2], names[1:3])]
        chain.append(VARIABLE_FACT.format(name=names[3], value=str(rng.randrange(10_000, 100_000))))  # a distractor
        return chain, VARIABLE_QUESTION.format(value=value), names[:3]
    first = _key(rng, taken)
    if task in ("single", "multikey"):
        answer = _value(kind, rng)
        facts = [fill(template.fact, key=first, value=answer)]
        if task == "multikey":
            facts += [fill(template.fact, key=_key(rng, taken), value=_value(kind, rng)) for _ in range(3)]
        question = template.restate if style == "restate" else template.paraphrase  # chat: the paraphrase
        return facts, fill(question, key=first), [answer]
    if task == "multivalue":
        values = list(dict.fromkeys(_value(kind, rng) for _ in range(3)))
        return [fill(template.fact, key=first, value=v) for v in values], fill(template.many, keys=first), values
    keys = [first, _key(rng, taken), _key(rng, taken)]
    values = [_value(kind, rng) for _ in keys]
    facts = [fill(template.fact, key=k, value=v) for k, v in zip(keys, values)]
    return facts, fill(template.many, keys=", ".join(keys[:-1]) + " and " + keys[-1]), values


def chat_question(question: str) -> str:
    """A quiz line as a user would type it: " Question: which ...? Answer: the x are" -> "Which ...?"."""
    text = question.strip().removeprefix("Question:").split(" Answer:")[0].strip()
    return text[:1].upper() + text[1:]


def chat_turn(tok):
    """text -> one user turn and the assistant's opening, as the serve's chat route renders it;
    None for a tokenizer without a chat template."""
    if not getattr(tok, "chat_template", None):
        return None
    return lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)


def split_sentences(text: str) -> list[str]:
    text = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def recall_items(haystacks: list[tuple[str, str]], tokenize, settings, chat=None) -> tuple[list[dict], dict]:
    """Haystack texts -> one item per (task, length, trial): a prompt of about `length` tokens whose
    facts sit at a depth (a share of the prompt before them) spread over `settings.depths`.
    `chat(text)` renders one user turn and the assistant's opening (the tokenizer's chat
    template); the chat style needs it."""
    sentences = [tokenize(" " + s) for _, text in haystacks for s in split_sentences(text)]
    sentences = [s for s in sentences if len(s)]
    total = sum(len(s) for s in sentences)
    if not sentences or total < max(settings.recall_lengths):
        raise ValueError(f"the haystack holds {total} tokens; the longest prompt needs {max(settings.recall_lengths)}")
    items, styles = [], settings.recall_styles
    for task in settings.recall_tasks:
        for length in settings.recall_lengths:
            rng = random.Random(f"{settings.seed}/{task}/{length}")
            for trial in range(settings.recall_trials):
                style = styles[trial % len(styles)]
                depth = settings.depths[trial % len(settings.depths)]
                # every style meets every value kind: where the style count is a multiple of the
                # kind count, the kinds shift by one each round of them
                shift = trial // len(VALUE_KINDS) if len(styles) % len(VALUE_KINDS) == 0 else 0
                kind = VALUE_KINDS[(trial + shift) % len(VALUE_KINDS)]
                template = EVAL_TEMPLATES[(trial // len(styles)) % len(EVAL_TEMPLATES)]
                facts, question, answers = needles(task, rng, style, kind, template)
                if style == "chat":
                    if chat is None:
                        raise ValueError("the chat question style needs a model whose tokenizer has a chat "
                                         "template; leave chat out of recall_styles")
                    question = chat(chat_question(question))
                prompt, at = _plant(sentences, [tokenize(f) for f in facts], tokenize(question), length, depth, rng)
                # a chat answer is a sentence around the value
                new_tokens = (12 if len(answers) == 1 else 8 * len(answers) + 8) + (20 if style == "chat" else 0)
                items.append({"kind": "recall", "id": f"{task}/{length:06d}/{trial:03d}", "group": f"{task}/{length}",
                              "task": task, "length": length, "depth": depth, "style": style, "value_kind": kind,
                              "prompt": prompt, "fact_positions": at, "answers": answers,
                              "max_new_tokens": new_tokens})
    return items, {}


def _plant(sentences, facts, question, length: int, depth: float, rng: random.Random):
    """Consecutive haystack sentences (wrapping around) filling `length` tokens with the question;
    the facts go in after the sentence at `depth` of the haystack part, spaced a little apart."""
    budget = length - len(question) - sum(len(f) for f in facts)
    start = rng.randrange(len(sentences))
    taken, n = [], 0
    while n < budget:
        s = sentences[(start + len(taken)) % len(sentences)]
        taken.append(s)
        n += len(s)
    cut, filled = 0, 0
    while cut < len(taken) and filled + len(taken[cut]) <= depth * n:
        filled += len(taken[cut])
        cut += 1
    pieces, positions, pos = [], [], 0
    spacing = max(1, min(4, (len(taken) - cut) // (len(facts) + 1)))  # sentences between facts
    for i, s in enumerate(taken):
        if i >= cut and (i - cut) % spacing == 0 and len(positions) < len(facts):
            f = facts[len(positions)]
            positions.append(pos)
            pieces.append(f)
            pos += len(f)
        pieces.append(s)
        pos += len(s)
    for f in facts[len(positions):]:
        positions.append(pos)
        pieces.append(f)
        pos += len(f)
    pieces.append(question)
    return np.concatenate(pieces).astype(np.int64), positions


def recall_score(text: str, answers: list[str]) -> float:
    """The share of the expected strings found in the generated text (case-insensitive)."""
    low = text.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def interval(scores: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Wilson's for 0/1 scores)."""
    n = len(scores)
    if n == 0:
        return float("nan"), float("nan")
    mean = float(np.mean(scores))
    if all(s in (0.0, 1.0) for s in scores):
        z = 1.96
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return mean, max(abs(centre + half - mean), abs(mean - (centre - half)))
    return mean, 1.96 * float(np.std(scores, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
