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

Modules: `tasks` (settings and task builders), `scoring` (the Scorer interface, ModelScorer,
perplexity_report), `reports` (aggregation, report.json/.md/.png), `probes` (copy and passkey
probes; not imported here, as it loads the model).
"""

from __future__ import annotations

from .reports import aggregate, markdown_table, write_report
from .scoring import ModelScorer, Scorer, perplexity_report, score_item
from .tasks import (
    DEFAULT_TEMPLATE,
    READINGS,
    TASKS,
    EvalError,
    EvalSettings,
    document_items,
    icl_items,
    labelled_rows_from_books,
    read_labelled,
    split_chapters,
    suffix_items_from_books,
    suffix_items_from_chapterbreak,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "READINGS",
    "TASKS",
    "EvalError",
    "EvalSettings",
    "ModelScorer",
    "Scorer",
    "aggregate",
    "document_items",
    "icl_items",
    "labelled_rows_from_books",
    "markdown_table",
    "perplexity_report",
    "read_labelled",
    "score_item",
    "split_chapters",
    "suffix_items_from_books",
    "suffix_items_from_chapterbreak",
    "write_report",
]
