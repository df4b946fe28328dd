"""Evaluation tasks: the settings, and the builders that turn input into work items.

- perplexity: whole documents (document_items).
- suffix:     ChapterBreak suffix identification, from books with chapter headings or the
  ChapterBreak JSON (suffix_items_from_books, suffix_items_from_chapterbreak).
- icl:        memory-augmented in-context learning from labelled rows (icl_items).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .recall import STYLES

READINGS = ("backbone", "backbone_long", "longmem_no_memory", "longmem_memory")
TASKS = ("perplexity", "suffix", "icl", "recall")
DEFAULT_TEMPLATE = "Passage: {text}\nNovel: {label}\n\n"


class EvalError(ValueError):
    """Input an evaluation cannot use; the message says which and why."""


@dataclass
class EvalSettings:
    """What a task builds and how items are scored (JSON-serialisable; travels to every actor)."""

    task: str = "perplexity"
    window: int = 512  # the model's local window, filled from its config
    long_window: int = 2048  # backbone_long reads this many tokens
    seed: int = 0
    # perplexity
    max_doc_tokens: int | None = None  # longer documents are cut to this many tokens
    min_doc_tokens: int = 64
    length_buckets: tuple[int, ...] = (4096, 16384, 65536)  # document-length bucket edges (tokens)
    # suffix
    prefix_tokens: tuple[int, ...] = (4096, 8192, 16384)
    candidate_tokens: int = 128
    num_candidates: int = 6
    examples_per_length: int = 20
    # icl
    template: str = DEFAULT_TEMPLATE
    shots: int = 3  # demonstrations in context
    memory_shots: int = 200  # demonstrations in memory
    seeds: tuple[int, ...] = (0, 1, 2)
    queries: int = 60
    queries_per_item: int = 20
    labels: tuple[str, ...] = ()  # allowed labels; empty = those found in the data
    # recall (evaluation/recall.py); backbone_long is the backbone's native window there
    recall_tasks: tuple[str, ...] = ("single", "multikey", "multivalue", "multiquery", "vartrack")
    recall_lengths: tuple[int, ...] = (4096, 16384, 32768, 65536)  # prompt tokens
    recall_trials: int = 20  # per task and length
    recall_styles: tuple[str, ...] = STYLES  # question styles, taken in turn
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # where the facts sit in the prompt

    def validate(self) -> "EvalSettings":
        if self.task not in TASKS:
            raise EvalError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.long_window < self.window:
            raise EvalError(f"long_window ({self.long_window}) must be at least the window ({self.window})")
        if self.task == "suffix":
            if self.candidate_tokens < 1 or self.candidate_tokens >= self.window:
                raise EvalError(f"candidate_tokens must be in [1, window={self.window}): got {self.candidate_tokens}")
            if self.num_candidates < 2:
                raise EvalError("num_candidates must be at least 2")
            if any(p < self.window for p in self.prefix_tokens):
                raise EvalError(f"every prefix length must be at least the window ({self.window}): {self.prefix_tokens}")
        if self.task == "recall":
            from .recall import RECALL_TASKS

            unknown = sorted(set(self.recall_tasks) - set(RECALL_TASKS))
            if unknown or not self.recall_tasks:
                raise EvalError(f"recall tasks must be among {', '.join(RECALL_TASKS)}, got {list(self.recall_tasks)}")
            if not self.recall_styles or set(self.recall_styles) - set(STYLES) or \
                    len(set(self.recall_styles)) < len(self.recall_styles):
                raise EvalError(f"recall styles must be distinct, among {', '.join(STYLES)}; got {list(self.recall_styles)}")
            if self.recall_trials < 1 or not self.recall_lengths or min(self.recall_lengths) < 2 * self.window:
                raise EvalError(f"recall needs trials >= 1 and prompt lengths of at least twice the window "
                                f"({2 * self.window}): got {self.recall_trials}, {list(self.recall_lengths)}")
            if not self.depths or not all(0 <= d <= 1 for d in self.depths):
                raise EvalError(f"depths are shares of the prompt in [0, 1], got {list(self.depths)}")
        if self.task == "icl":
            if "{text}" not in self.template or "{label}" not in self.template:
                raise EvalError("the ICL template must contain {text} and {label}")
            if self.template.index("{label}") < self.template.index("{text}"):
                raise EvalError("the ICL template must put {label} after {text}")
            if self.shots < 0 or self.memory_shots < 0 or self.queries < 1 or not self.seeds:
                raise EvalError("shots and memory_shots must be >= 0, queries >= 1, and at least one seed given")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalSettings":
        known = {f for f in cls.__dataclass_fields__}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**d)


# ---------------------------------------------------------------------------- perplexity
def document_items(documents: list[tuple[str, np.ndarray]], settings: EvalSettings) -> tuple[list[dict], dict]:
    """(doc_id, tokens) pairs -> document items; too-short documents are counted skips."""
    items, skipped = [], {}
    for doc_id, tokens in documents:
        tokens = np.asarray(tokens, dtype=np.int64)
        if settings.max_doc_tokens:
            tokens = tokens[: settings.max_doc_tokens]
        if len(tokens) < max(settings.min_doc_tokens, 2):
            skipped["too short"] = skipped.get("too short", 0) + 1
            continue
        items.append({"kind": "document", "id": doc_id, "tokens": tokens})
    return items, skipped

# ---------------------------------------------------------------------------- suffix identification
CHAPTER_HEADING = re.compile(r"^[ \t]*(?:chapter|CHAPTER|Chapter)[ \t]+(?:[IVXLCDM]+|\d+)\b[^\n]*$", re.MULTILINE)


def split_chapters(text: str) -> list[tuple[int, int]]:
    """(body start, body end) character spans of the chapters, headings excluded."""
    heads = list(CHAPTER_HEADING.finditer(text))
    spans = []
    for i, h in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        spans.append((h.end(), end))
    return spans


def suffix_items_from_books(books: list[tuple[str, str]], tokenize, settings: EvalSettings) -> tuple[list[dict], dict]:
    """Books with chapter headings -> ChapterBreak-style items, for every prefix length.

    Prefix = the last P tokens before a chapter break (the memory holds all but the local part);
    candidates = the true next-chapter opening + (num_candidates - 1) openings of other chapters of
    the same book that lie outside the prefix."""
    rng = random.Random(settings.seed)
    items, skipped = [], {}
    C = settings.candidate_tokens
    for name, text in books:
        heads = [h.start() for h in CHAPTER_HEADING.finditer(text)]
        spans = split_chapters(text)
        if len(spans) < settings.num_candidates + 1:
            skipped["fewer chapters than candidates"] = skipped.get("fewer chapters than candidates", 0) + 1
            continue
        # Tokenized once per book: the front matter, then each chapter (heading + body).
        blocks = [tokenize(text[: heads[0]])] + [tokenize(text[a:b]) for a, b in zip(heads, heads[1:] + [len(text)])]
        ends = np.cumsum([len(b) for b in blocks])  # ends[i] = tokens before chapter i's heading
        book = np.concatenate(blocks)
        openings = [tokenize(text[a:b].strip())[:C] for a, b in spans]
        usable = [j for j in range(len(spans)) if len(openings[j]) == C]
        if len(usable) < settings.num_candidates:
            skipped["chapters shorter than a candidate"] = skipped.get("chapters shorter than a candidate", 0) + 1
            continue
        for P in settings.prefix_tokens:
            breaks = [i for i in range(1, len(spans)) if ends[i] >= P and i in usable]
            rng.shuffle(breaks)
            for i in sorted(breaks[: settings.examples_per_length]):
                # Negatives never come from inside the prefix: a memory model would find such an
                # opening verbatim in memory and be rewarded for copying a wrong answer.
                outside = [j for j in usable if j > i or (j + 1 < len(ends) and ends[j + 1] <= ends[i] - P)]
                if len(outside) < settings.num_candidates - 1:
                    skipped["too few chapters outside the prefix"] = skipped.get("too few chapters outside the prefix", 0) + 1
                    continue
                negatives = rng.sample(outside, settings.num_candidates - 1)
                prefix = book[ends[i] - P : ends[i]]
                items.append(_choice_item(f"{name}/ch{i:03d}/{P}", prefix, openings[i],
                                          [openings[j] for j in negatives], P, settings, rng))
    return items, skipped


def suffix_items_from_chapterbreak(data: dict, tokenize, settings: EvalSettings) -> tuple[list[dict], dict]:
    """The ChapterBreak JSON: {"pg19"|"ao3": {book_id: [{"ctx", "pos", "negs"}, ...]}}."""
    if not isinstance(data, dict) or not any(isinstance(v, dict) for v in data.values()):
        raise EvalError("not a ChapterBreak file: expected {split: {book_id: [{ctx, pos, negs}, ...]}}")
    rng = random.Random(settings.seed)
    items, skipped = [], {}

    def skip(why):
        skipped[why] = skipped.get(why, 0) + 1

    for split in sorted(data):
        if not isinstance(data[split], dict):
            continue
        for book in sorted(data[split]):
            for n, ex in enumerate(data[split][book]):
                if not isinstance(ex, dict) or not all(isinstance(ex.get(f), str) for f in ("ctx", "pos")) \
                        or not isinstance(ex.get("negs"), list) or not all(isinstance(x, str) for x in ex["negs"]):
                    skip("missing ctx/pos/negs")
                    continue
                ctx = tokenize(ex["ctx"])
                cands = [tokenize(c)[: settings.candidate_tokens] for c in [ex["pos"], *ex["negs"]]]
                if any(len(c) == 0 for c in cands):
                    skip("empty candidate")
                    continue
                for P in settings.prefix_tokens:
                    if len(ctx) < P:
                        skip(f"context shorter than {P} tokens")
                        continue
                    items.append(_choice_item(f"{split}/{book}/{n}/{P}", ctx[-P:], cands[0], cands[1:], P, settings, rng))
    return items, skipped


def _choice_item(item_id, prefix, true, negatives, group, settings, rng) -> dict:
    candidates = [true, *negatives]
    order = list(range(len(candidates)))
    rng.shuffle(order)
    local = settings.window - max(len(c) for c in candidates)
    prefix = np.asarray(prefix, dtype=np.int64)
    return {"kind": "choice", "id": item_id, "memory": prefix[:-local],
            "questions": [{"id": item_id, "group": group, "context": prefix[-local:],
                           "candidates": [np.asarray(candidates[i], dtype=np.int64) for i in order],
                           "answer": order.index(0)}]}


# ---------------------------------------------------------------------------- in-context learning
def labelled_rows_from_books(books: list[tuple[str, str]], per_book: int = 120, words: int = 50, seed: int = 0) -> list[dict]:
    """"Which novel is this passage from?": passages of about `words` words cut at sentence ends,
    labelled with the book's title (its first non-empty line)."""
    rng = random.Random(seed)
    rows = []
    for name, text in books:
        title = _title(next((ln.strip() for ln in text.splitlines() if ln.strip()), name))
        spans = split_chapters(text)
        body = " ".join(text[spans[0][0] if spans else 0 :].split())
        sentences = re.split(r"(?<=[.!?])\s+", body)
        passages, cur = [], []
        for s in sentences:
            cur.append(s)
            if sum(len(x.split()) for x in cur) >= words:
                passages.append(" ".join(cur))
                cur = []
        passages = [p for p in passages if len(p.split()) <= 2 * words]
        for p in rng.sample(passages, min(per_book, len(passages))):
            rows.append({"text": p, "label": title})
    return rows


def _title(line: str) -> str:
    small = {"and", "of", "the", "a", "an", "in", "on"}
    words = line.lower().split()
    return " ".join(w if (i and w in small) else w.capitalize() for i, w in enumerate(words))


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label") -> tuple[list[dict], dict]:
    """Labelled .jsonl -> rows; lines with missing/invalid fields are counted skips."""
    rows, skipped = [], {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            skipped["bad json"] = skipped.get("bad json", 0) + 1
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str) or not rec[text_field].strip() \
                or not isinstance(rec.get(label_field), (str, int)):
            skipped[f"missing {text_field}/{label_field}"] = skipped.get(f"missing {text_field}/{label_field}", 0) + 1
            continue
        rows.append({"text": " ".join(rec[text_field].split()), "label": str(rec[label_field])})
    return rows, skipped


def icl_items(rows: list[dict], tokenize, settings: EvalSettings) -> tuple[list[dict], dict]:
    """k demonstrations in context + N in memory, per seed; queries are the same for every seed.
    Fills `settings.labels` with the label set used (candidate i is label i)."""
    labels = list(settings.labels) or sorted({r["label"] for r in rows})
    unknown = sorted({r["label"] for r in rows} - set(labels))
    if unknown:
        raise EvalError(f"labels not in the label set {labels}: {unknown[:5]}")
    if len(labels) < 2:
        raise EvalError(f"ICL needs at least two labels, found {labels}")
    settings.labels = tuple(labels)
    need = settings.queries + settings.shots + settings.memory_shots
    if len(rows) < need:
        raise EvalError(f"ICL needs {need} labelled rows (queries + shots + memory shots), found {len(rows)}")
    head, tail = settings.template.split("{label}", 1)
    demo = lambda r: tokenize(settings.template.format(text=r["text"], label=r["label"]))  # noqa: E731
    order = list(range(len(rows)))
    random.Random(settings.seed).shuffle(order)
    queries, pool = [rows[i] for i in order[: settings.queries]], [rows[i] for i in order[settings.queries :]]
    # The space before the label belongs to the label's tokens, as it does inside a demonstration.
    space = head[len(head.rstrip(" ")):]
    head = head.rstrip(" ")
    candidates = [tokenize(space + lab) for lab in labels]
    items = []
    for seed in settings.seeds:
        rng = random.Random(1000 + seed)
        picked = rng.sample(pool, settings.shots + settings.memory_shots)
        in_context, in_memory = picked[: settings.shots], picked[settings.shots :]
        memory = np.concatenate([demo(r) for r in in_memory]) if in_memory else np.zeros(0, np.int64)
        shots = np.concatenate([demo(r) for r in in_context]) if in_context else np.zeros(0, np.int64)
        for start in range(0, len(queries), settings.queries_per_item):
            questions = []
            for qi in range(start, min(start + settings.queries_per_item, len(queries))):
                q = queries[qi]
                prompt = tokenize(head.format(text=q["text"]))
                questions.append({"id": f"seed{seed}/q{qi:04d}", "group": seed,
                                  "context": np.concatenate([shots, prompt]).astype(np.int64),
                                  "candidates": [np.asarray(c, dtype=np.int64) for c in candidates],
                                  "answer": labels.index(q["label"])})
            items.append({"kind": "choice", "id": f"seed{seed}/{start:04d}", "memory": memory.astype(np.int64),
                          "questions": questions})
    return items, {}

