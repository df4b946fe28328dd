"""Planted facts: keys, values and sentence templates, shared by training episodes and the recall
suite. Each side has its own templates and its own key words (training: TRAIN_TEMPLATES with
TRAIN_ADJECTIVES / TRAIN_NOUNS; evaluation: evaluation/recall.py), so a model evaluated on recall
has never seen the sentence frames or the entities it is asked about (tests/test_recall.py)."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

VALUE_KINDS = ("number", "word", "code")


@dataclass(frozen=True)
class Template:
    fact: str  # one planted sentence: {key}, {value}, {kind}
    restate: str  # a question that repeats the fact's words up to the value
    paraphrase: str  # a question in other words
    many: str  # a question for several values (multivalue, multiquery): {keys}


TRAIN_TEMPLATES = (
    Template(fact=" Note: the {kind} assigned to {key} is {value}.",
             restate=" Note: the {kind} assigned to {key} is",
             paraphrase=" Which {kind} was assigned to {key}? It was",
             many=" List every {kind} assigned to {keys}:"),
    Template(fact=" For {key}, use the {kind} {value}.",
             restate=" For {key}, use the {kind}",
             paraphrase=" If you need the {kind} for {key}, it is",
             many=" The {kind}s to use for {keys} are"),
    Template(fact=" Written on {key} was the {kind} {value}.",
             restate=" Written on {key} was the {kind}",
             paraphrase=" What {kind} did someone write on {key}? They wrote",
             many=" The {kind}s written on {keys} were"),
    Template(fact=" They agreed that {key} would carry the {kind} {value} from now on.",
             restate=" They agreed that {key} would carry the {kind}",
             paraphrase=" From now on, the {kind} carried by {key} is",
             many=" The {kind}s carried by {keys} are"),
    # the value before the key: a question cannot be answered by continuing the fact's own words
    Template(fact=" {value} is the {kind} that belongs to {key}.",
             restate=" The {kind} that belongs to {key} is",
             paraphrase=" Q: {key} owns which {kind}? A:",
             many=" Q: name the {kind}s belonging to {keys}. A:"),
    Template(fact=" Somebody painted {value} on {key}; it was the {kind} for it.",
             restate=" The {kind} painted on {key} was",
             paraphrase=" Q: what did somebody paint on {key} as its {kind}? A:",
             many=" Q: which {kind}s were painted on {keys}? A:"),
    Template(fact=" Memo to self - {key}: {kind} {value}.",
             restate=" Memo to self - {key}: {kind}",
             paraphrase=" Q: my memo gave {key} what {kind}? A:",
             many=" Q: what did my memo give {keys} as {kind}s? A:"),
    Template(fact=" User: bear in mind that {key} has the {kind} {value}. Assistant: Noted.",
             restate=" User: recall what {key} has. Assistant: {key} has the {kind}",
             paraphrase=" User: tell me the {kind} of {key}. Assistant: It is",
             many=" User: tell me every {kind} of {keys}. Assistant: They are"),
    Template(fact=" Everyone in town knew {key} by its {kind}, {value}.",
             restate=" Everyone in town knew {key} by its {kind},",
             paraphrase=" Q: by which {kind} did the town know {key}? A:",
             many=" Q: by which {kind}s did the town know {keys}? A:"),
)
TRAIN_ADJECTIVES = ("red", "old", "small", "tall", "green", "wooden", "broken", "empty", "eastern", "shiny", "heavy",
                    "little", "second", "yellow", "stone", "paper")
TRAIN_NOUNS = ("box", "gate", "cart", "tower", "bridge", "lamp", "chest", "boat", "mill", "well", "barn", "kettle",
               "clock", "shelf", "basket", "drum")
TRAIN_WORDS = ("pepper", "willow", "granite", "maple", "copper", "thunder", "pebble", "cedar", "lemon", "river",
               "silk", "canyon", "hazel", "ember", "frost", "walnut")


def value(kind: str, rng: random.Random, words) -> str:
    if kind == "number":
        return str(rng.randrange(1_000_000, 10_000_000))
    if kind == "word":
        return rng.choice(words)
    return "".join(rng.choices(string.ascii_uppercase, k=2)) + "-" + str(rng.randrange(1000, 10000))


def key(rng: random.Random, taken: set, adjectives, nouns) -> str:
    """A key ("the red box") not in `taken` (which it joins)."""
    while True:
        k = f"the {rng.choice(adjectives)} {rng.choice(nouns)}"
        if k not in taken:
            taken.add(k)
            return k


def fact_set(rng: random.Random, template: Template, kind: str, count: int, adjectives, nouns, words):
    """`count` facts of one template and kind with distinct keys: [(key, value, sentence)]."""
    taken: set = set()
    out = []
    for _ in range(count):
        k, v = key(rng, taken, adjectives, nouns), value(kind, rng, words)
        out.append((k, v, template.fact.format(kind=kind, key=k, value=v)))
    return out
