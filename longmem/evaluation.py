"""The paper's three evaluations, Ray-free: task builders, the scoring interface, aggregation, reports.

Every figure is given for four readings of the same tokens:
    backbone           the frozen backbone with the local window W
    backbone_long      the frozen backbone with a larger window (the headroom a longer context gives)
    longmem_no_memory  the SideNet with memory disabled (what adaptation alone gives)
    longmem_memory     the SideNet reading memory of everything before its local window

Tasks turn input into *items*; a `Scorer` scores an item; `aggregate` turns item results into one
report. The Ray pipeline (pipelines/evaluate.py) only spreads items over actors, so any scorer with
the same interface (a model, or a stub in tests) gives the same report.

- perplexity: per-token NLL of whole documents read segment by segment (memory = the document's own
  past), bucketed by document length and by position in the document.
- suffix:     ChapterBreak suffix identification: the prefix up to a chapter break, candidates =
  the true next-chapter opening + other chapter openings; the lowest mean NLL wins.
- icl:        memory-augmented in-context learning: k demonstrations in context + N in memory;
  the label with the highest log-likelihood wins.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

READINGS = ("backbone", "backbone_long", "longmem_no_memory", "longmem_memory")
TASKS = ("perplexity", "suffix", "icl")
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


# ---------------------------------------------------------------------------- scoring interface
class Scorer(Protocol):
    def token_nll(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """ids (N,) -> per reading an (N,) float array: NLL of token i, NaN where not scored."""

    def choice_scores(self, memory: np.ndarray, context: np.ndarray, candidates: list[np.ndarray]) -> dict[str, list[float]]:
        """Log-likelihood of each candidate after `context`, with `memory` (the far past) in memory."""


class ModelScorer:
    """The Scorer of a LongMem model. Every reading scores exactly the same tokens."""

    def __init__(self, model, long_window: int | None = 2048, length_normalize: bool = True):
        self.model = model.eval()
        self.window = model.config.window
        self.long_window = long_window
        self.length_normalize = length_normalize
        self._memory_key, self._memory_bank = None, None

    def _tensor(self, ids) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.model.device)[None]

    @staticmethod
    def _nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        # logits (1, T, V) predicting targets (1, T)
        return F.cross_entropy(logits[0].float(), targets[0], reduction="none").cpu().numpy()

    @torch.no_grad()
    def token_nll(self, ids: np.ndarray, window: int | None = None, progress=None) -> dict[str, np.ndarray]:
        """Segments of `window` (default: the model's) read in order, memory = the earlier segments.
        backbone_long stays NaN when the scorer has no long_window."""
        model, N = self.model, len(ids)
        W = window or self.window
        out = {r: np.full(N, np.nan, dtype=np.float64) for r in READINGS}
        x = self._tensor(ids)
        bank = model.new_bank(1)
        starts = range(0, N, W)
        for i, s in enumerate(starts):
            seg = x[:, s : s + W]
            if seg.shape[1] >= 2:
                states = model.backbone_states(seg)  # one frozen pass serves three readings
                t, span = seg[:, 1:], slice(s + 1, s + seg.shape[1])
                out["backbone"][span] = self._nll(model.adapter.logits(states.hidden[-1])[:, :-1], t)
                out["longmem_no_memory"][span] = self._nll(model(seg, states=states).logits[:, :-1], t)
                mem = model(seg, bank=bank, update_memory=True, states=states,
                            previous_ids=x[:, s - 1] if s else None).logits
                out["longmem_memory"][span] = self._nll(mem[:, :-1], t)
            if progress:
                progress(i + 1, len(starts))
        L = self.long_window
        for s in range(0, N, L) if L else ():
            seg = x[:, s : s + L]
            if seg.shape[1] < 2:
                continue
            out["backbone_long"][s + 1 : s + seg.shape[1]] = self._nll(model.backbone_logits(seg)[:, :-1], seg[:, 1:])
        # The same tokens for every reading: the first token of each local window is never scored.
        out["backbone_long"][np.arange(0, N, W)] = np.nan
        return out

    def _bank(self, memory: np.ndarray, overflow: np.ndarray):
        """The memory of `memory`, then `overflow`; questions sharing a memory (ICL) encode it once."""
        import copy

        if not len(memory) and not len(overflow):
            return None
        key = hashlib.sha1(memory.tobytes()).hexdigest()
        if self._memory_key != key:
            bank = self.model.new_bank(1)  # the model's memory size: beyond it the oldest tokens are evicted
            if len(memory):
                self.model.write_memory(self._tensor(memory), bank)
            self._memory_key, self._memory_bank = key, bank
        bank = self._memory_bank
        if len(overflow):
            bank = copy.deepcopy(bank)
            self.model.write_memory(self._tensor(overflow), bank)
        return bank

    @torch.no_grad()
    def choice_scores(self, memory, context, candidates) -> dict[str, list[float]]:
        """The context is encoded once per reading and every candidate continues it from a KV cache
        (cropped back after each), which is exact and saves re-reading the context per candidate."""
        from transformers import DynamicCache

        from .sidenet import LayerCache

        model, W, L = self.model, self.window, self.long_window
        longest = max(len(c) for c in candidates)
        if longest >= W:
            raise EvalError(f"a candidate of {longest} tokens does not fit the {W}-token window")
        context = np.asarray(context, dtype=np.int64)
        memory = np.asarray(memory, dtype=np.int64)
        if len(context) == 0:
            raise EvalError("a choice question needs at least one context token")
        # Context that does not fit beside the longest candidate moves to memory, so each reading
        # sees the same local tokens and LongMem loses nothing.
        keep = W - longest
        overflow = context[:-keep] if len(context) > keep else context[:0]
        context = context[len(overflow):]
        bank = self._bank(memory, overflow)
        memory = np.concatenate([memory, overflow])
        far = np.concatenate([memory, context])
        far = far[len(far) - min(len(far), L - longest):]

        ctx, n_ctx = self._tensor(context), len(context)
        prev_ctx = self._tensor(memory[-1:]) if len(memory) else None  # the token before the context
        cache = DynamicCache(config=model.backbone.config)
        states = model.backbone_states(ctx, cache=cache)
        sides = {"longmem_no_memory": [LayerCache() for _ in model.sidenet.layers],
                 "longmem_memory": [LayerCache() for _ in model.sidenet.layers]}
        banks = {"longmem_no_memory": None, "longmem_memory": bank}
        first = {"backbone": model.adapter.logits(states.hidden[-1])[:, -1:]}
        for r, side in sides.items():
            first[r] = model(ctx, bank=banks[r], states=states, side_caches=side, backbone_cache=cache,
                             previous_ids=prev_ctx).logits[:, -1:]
        saved = {r: [(c.keys, c.values) for c in side] for r, side in sides.items()}
        long_cache = DynamicCache(config=model.backbone.config)
        long_states = model.adapter.run(self._tensor(far), [model.adapter.num_layers], model.memory_layer, cache=long_cache)
        first["backbone_long"] = model.adapter.logits(long_states.hidden[-1])[:, -1:]

        scores = {r: [] for r in READINGS}
        for cand in candidates:
            cand = np.asarray(cand, dtype=np.int64)
            n, t = len(cand), self._tensor(cand)
            st = model.backbone_states(t, cache=cache)
            logits = {"backbone": model.adapter.logits(st.hidden[-1])}
            for r, side in sides.items():
                logits[r] = model(t, bank=banks[r], states=st, side_caches=side, position_offset=n_ctx,
                                  backbone_cache=cache, previous_ids=ctx[:, -1]).logits
            ls = model.adapter.run(t, [model.adapter.num_layers], model.memory_layer, cache=long_cache)
            logits["backbone_long"] = model.adapter.logits(ls.hidden[-1])
            for r in READINGS:
                # the first candidate token is predicted by the context's last position
                nll = self._nll(torch.cat([first[r], logits[r][:, :-1]], dim=1), t).sum()
                scores[r].append(float(-nll / n if self.length_normalize else -nll))
            cache.crop(-n)  # drop the candidate's tokens again
            long_cache.crop(-n)
            for r, side in sides.items():
                for c, (k, v) in zip(side, saved[r]):
                    c.keys, c.values = k, v
        return scores


def score_item(scorer: Scorer, item: dict) -> dict:
    """One work item -> its JSON-able result (what an actor sends back)."""
    if item["kind"] == "document":
        nll = scorer.token_nll(np.asarray(item["tokens"]))
        return {"kind": "document", "id": item["id"], "tokens": len(item["tokens"]),
                "nll": {r: [None if math.isnan(v) else float(v) for v in a] for r, a in nll.items()}}
    results = []
    for q in item["questions"]:
        scores = scorer.choice_scores(item["memory"], q["context"], q["candidates"])
        results.append({"id": q["id"], "group": q["group"], "answer": q["answer"],
                        "scores": {r: [float(s) for s in v] for r, v in scores.items()}})
    return {"kind": "choice", "id": item["id"], "questions": results}


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


def _bucket_name(lo: int, hi: float) -> str:
    k = lambda n: f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)  # noqa: E731
    return f"{k(lo)}+" if hi == math.inf else f"{k(lo)}-{k(int(hi))}"


def _ppl_row(nll: dict[str, list[np.ndarray]]) -> dict:
    row = {}
    for r in READINGS:
        values = np.concatenate(nll[r]) if nll[r] else np.zeros(0)
        values = values[~np.isnan(values)]
        row[r] = float(math.exp(values.mean())) if len(values) else None
        row["scored_tokens"] = int(len(values))
    return _with_gains(row)


def _with_gains(row: dict) -> dict:
    b, bl, nm, m = (row.get(r) for r in READINGS)
    if nm and m:
        row["memory_gain_pct"] = round(100 * (nm - m) / nm, 3)
    if b and bl and m and b != bl:
        row["long_window_gap_closed_pct"] = round(100 * (b - m) / (b - bl), 1)
    return row


def aggregate_perplexity(results: list[dict], settings: EvalSettings, window: int) -> dict:
    edges = [0, *settings.length_buckets, math.inf]
    pos_edges = [0, window, *[e for e in (4096, 16384, 65536) if e > window], math.inf]
    by_len = {(lo, hi): {r: [] for r in READINGS} for lo, hi in zip(edges, edges[1:])}
    by_pos = {(lo, hi): {r: [] for r in READINGS} for lo, hi in zip(pos_edges, pos_edges[1:])}
    docs_in = {key: 0 for key in by_len}
    total = {r: [] for r in READINGS}
    per_doc = []
    for res in sorted(results, key=lambda r: r["id"]):
        arrays = {r: np.array([np.nan if v is None else v for v in res["nll"][r]]) for r in READINGS}
        n = res["tokens"]
        key = next(k for k in by_len if k[0] <= n < k[1])
        docs_in[key] += 1
        for r in READINGS:
            by_len[key][r].append(arrays[r])
            total[r].append(arrays[r])
            for lo, hi in by_pos:
                by_pos[(lo, hi)][r].append(arrays[r][int(lo) : int(min(hi, n))])
        per_doc.append({"id": res["id"], "tokens": n, **_ppl_row({r: [arrays[r]] for r in READINGS})})
    return {
        "overall": {"documents": len(per_doc), **_ppl_row(total)},
        "by_document_length": [{"bucket": _bucket_name(lo, hi), "documents": docs_in[(lo, hi)], **_ppl_row(v)}
                               for (lo, hi), v in by_len.items() if docs_in[(lo, hi)]],
        "by_position": [{"bucket": _bucket_name(lo, hi), **_ppl_row(v)}
                        for (lo, hi), v in by_pos.items() if any(len(a) for a in v["backbone"])],
        "documents": per_doc,
    }


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


# ---------------------------------------------------------------------------- choice aggregation
def _credit(scores: list[float], answer: int) -> float:
    """1 if the answer scores highest, 1/n when it ties with n-1 others, else 0."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return 1.0 / len(tied) if answer in tied else 0.0


def aggregate_choice(results: list[dict], settings: EvalSettings) -> dict:
    questions = sorted((q for r in results for q in r["questions"]), key=lambda q: q["id"])
    groups: dict = {}
    for q in questions:
        g = groups.setdefault(q["group"], {r: [] for r in READINGS})
        for r in READINGS:
            g[r].append(_credit(q["scores"][r], q["answer"]))
    rows = []
    for g in sorted(groups):
        row = {"group": g, "questions": len(groups[g]["backbone"]),
               "chance": round(1 / len(questions[0]["scores"]["backbone"]), 4) if questions else None}
        row.update({r: round(float(np.mean(groups[g][r])), 4) for r in READINGS})
        rows.append(row)
    overall = {"questions": len(questions)}
    for r in READINGS:
        per_group = [row[r] for row in rows]
        overall[r] = round(float(np.mean([c for g in groups.values() for c in g[r]])), 4) if questions else None
        overall[f"{r}_std_over_groups"] = round(float(np.std(per_group)), 4) if len(per_group) > 1 else 0.0
    return {"overall": overall, "by_group": rows,
            "questions": [{"id": q["id"], "group": q["group"], "answer": q["answer"],
                           **{r: int(np.argmax(q["scores"][r])) for r in READINGS}} for q in questions]}


def aggregate(results: list[dict], settings: EvalSettings) -> dict:
    if settings.task == "perplexity":
        return aggregate_perplexity(results, settings, settings.window)
    return aggregate_choice(results, settings)


# ---------------------------------------------------------------------------- report
GROUP_NAME = {"suffix": "prefix tokens", "icl": "seed"}


def markdown_table(report: dict) -> str:
    task, res = report["task"], report["results"]
    head = "| {} | " + " | ".join(READINGS) + " | {} |"
    lines = [f"### {task}: {report.get('title', '')}".rstrip(": "), ""]
    if task == "perplexity":
        cols = ("memory gain %", "gap closed %")
        for name, rows in (("document length", res["by_document_length"]), ("position in document", res["by_position"])):
            lines += [f"Perplexity by {name} (scored tokens):", "",
                      "| bucket | tokens | " + " | ".join(READINGS) + f" | {cols[0]} | {cols[1]} |",
                      "|---" * (len(READINGS) + 4) + "|"]
            for row in rows + [{"bucket": "all", **res["overall"]}]:
                cells = [f"{row[r]:.2f}" if row[r] is not None else "-" for r in READINGS]
                lines.append(f"| {row['bucket']} | {row['scored_tokens']:,} | " + " | ".join(cells)
                             + f" | {row.get('memory_gain_pct', '-')} | {row.get('long_window_gap_closed_pct', '-')} |")
            lines.append("")
    else:
        lines += [head.format(GROUP_NAME[task], "questions · chance"), "|---" * (len(READINGS) + 2) + "|"]
        for row in res["by_group"] + [{"group": "all", "questions": res["overall"]["questions"],
                                       "chance": res["by_group"][0]["chance"] if res["by_group"] else None,
                                       **{r: res["overall"][r] for r in READINGS}}]:
            cells = [f"{100 * row[r]:.1f}%" if row[r] is not None else "-" for r in READINGS]
            chance = f"{100 * row['chance']:.1f}%" if row["chance"] else "-"
            lines.append(f"| {row['group']} | " + " | ".join(cells) + f" | {row['questions']} · {chance} |")
        lines.append("")
    if report.get("skipped"):
        lines.append("Skipped: " + ", ".join(f"{k}: {v}" for k, v in sorted(report["skipped"].items())))
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, res = report["task"], report["results"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if task == "perplexity":
        rows = res["by_position"]
        xs = range(len(rows))
        for r in READINGS:
            ax.plot(xs, [row[r] for row in rows], marker="o", label=r)
        ax.set_xticks(list(xs), [row["bucket"] for row in rows])
        ax.set_xlabel("position in document (tokens)")
        ax.set_ylabel("perplexity")
    else:
        rows = res["by_group"]
        width = 0.8 / len(READINGS)
        for i, r in enumerate(READINGS):
            ax.bar([j + i * width for j in range(len(rows))], [100 * row[r] for row in rows], width, label=r)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [str(row["group"]) for row in rows])
        if rows:
            ax.axhline(100 * rows[0]["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xlabel(GROUP_NAME[task])
        ax.set_ylabel("accuracy (%)")
    ax.set_title(f"LongMem {task}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: str | Path) -> dict[str, str]:
    """report.json, report.md and report.png in `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "report.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(paths["json"])
    paths["markdown"].write_text(markdown_table(report))
    plot(report, paths["plot"])
    return {k: str(v) for k, v in paths.items()}
