"""Reports: item results aggregated into one report, and report.json/.md/.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .tasks import READINGS, EvalSettings


# ---------------------------------------------------------------------------- perplexity aggregation
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


def aggregate_recall(results: list[dict], settings: EvalSettings) -> dict:
    """Mean score and 95% interval per reading for every (task, length) cell, and per question style."""
    from .recall import interval

    results = sorted(results, key=lambda r: r["id"])

    def rows(key):
        cells: dict = {}
        for r in results:
            cells.setdefault(key(r), []).append(r)
        out = []
        for cell, members in sorted(cells.items()):
            row = {"cell": list(cell), "trials": len(members)}
            for reading in READINGS:
                mean, half = interval([m["scores"][reading] for m in members])
                row[reading], row[f"{reading}_ci"] = round(mean, 4), round(half, 4)
            out.append(row)
        return out

    return {"by_cell": rows(lambda r: (r["task"], r["length"])),
            "by_style": rows(lambda r: (r["task"], r["length"], r["style"])),
            "trials": [{k: r[k] for k in ("id", "task", "length", "depth", "style", "answers", "scores", "texts")}
                       for r in results]}


def aggregate(results: list[dict], settings: EvalSettings) -> dict:
    if settings.task == "perplexity":
        return aggregate_perplexity(results, settings, settings.window)
    if settings.task == "recall":
        return aggregate_recall(results, settings)
    return aggregate_choice(results, settings)


# ---------------------------------------------------------------------------- report
GROUP_NAME = {"suffix": "prefix tokens", "icl": "seed"}


RECALL_READINGS = {"longmem_memory": "LongMem, memory", "longmem_no_memory": "memory off",
                   "backbone": "backbone, local window", "backbone_long": "backbone, native window"}


def recall_markdown(report: dict) -> list[str]:
    res = report["results"]
    native = report["settings"]["long_window"]
    lines = [f"Recall (string match; mean ± 95% interval over trials). The backbone's native window is its "
             f"last {native} tokens; where the prompt fits it, that reading is the in-context reference.", "",
             "| task | prompt tokens | trials | " + " | ".join(RECALL_READINGS.values()) + " |",
             "|---" * (len(RECALL_READINGS) + 3) + "|"]
    for row in res["by_cell"]:
        task, length = row["cell"]
        cells = [f"{100 * row[r]:.0f}% ± {100 * row[r + '_ci']:.0f}" for r in RECALL_READINGS]
        lines.append(f"| {task} | {length:,} | {row['trials']} | " + " | ".join(cells) + " |")
    lines += ["", "By question style (restate: the fact's own words; paraphrase: other words, a quiz line; chat: "
              "the paraphrase as a user turn of the chat template):", "",
              "| task | prompt tokens | style | trials | " + " | ".join(RECALL_READINGS.values()) + " |",
              "|---" * (len(RECALL_READINGS) + 4) + "|"]
    for row in res["by_style"]:
        task, length, style = row["cell"]
        cells = [f"{100 * row[r]:.0f}% ± {100 * row[r + '_ci']:.0f}" for r in RECALL_READINGS]
        lines.append(f"| {task} | {length:,} | {style} | {row['trials']} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown_table(report: dict) -> str:
    task, res = report["task"], report["results"]
    if task == "recall":
        return "\n".join([f"### recall: {report.get('title', '')}".rstrip(": "), "", *recall_markdown(report)]) + "\n"
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
    if task == "recall":
        rows = res["by_cell"]
        width = 0.8 / len(READINGS)
        for i, r in enumerate(READINGS):
            ax.bar([j + i * width for j in range(len(rows))], [100 * row[r] for row in rows], width, label=r,
                   yerr=[100 * row[f"{r}_ci"] for row in rows])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))],
                      [f"{row['cell'][0]}\n{row['cell'][1] // 1024}k" for row in rows], fontsize=7)
        ax.set_ylabel("recall (%)")
    elif task == "perplexity":
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
