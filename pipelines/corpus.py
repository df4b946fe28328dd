"""Read corpora with Ray Data: folders, globs or files of .txt, .jsonl/.json (a text field) and
.parquet (a text column), local or on object storage (any pyarrow filesystem URI).

Every file is read as bytes by `read_binary_files` and parsed in Ray tasks, so one reader gives
each document a stable id (`path` for text files, `path#row` for rows of jsonl/parquet) and the
same accounting: empty, undecodable or binary documents are kept as rows with a `skip` reason,
counted in the summary, and never crash the pipeline.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


class CorpusError(ValueError):
    """A corpus path that cannot be read; the message names it."""


def expand_corpus(paths: list[str]) -> list[str]:
    """Folders (recursively), globs and files -> sorted list of supported files (URIs kept)."""
    files: list[str] = []
    for raw in paths:
        fs, path = pafs.FileSystem.from_uri(raw) if "://" in raw else (pafs.LocalFileSystem(), raw)
        prefix = raw[: len(raw) - len(path)] if "://" in raw and raw.endswith(path) else ""
        if any(ch in path for ch in "*?["):
            import glob

            if prefix:
                raise CorpusError(f"{raw}: globs are supported for local paths only; give a folder URI")
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise CorpusError(f"{raw}: the pattern matches no file")
            files += [m for m in matches if m.lower().endswith(SUFFIXES)]
            continue
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise CorpusError(f"{raw}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files += sorted(prefix + f.path for f in found if f.is_file and f.path.lower().endswith(SUFFIXES))
        elif path.lower().endswith(SUFFIXES):
            files.append(prefix + path)
        else:
            raise CorpusError(f"{raw}: unsupported file type; use {', '.join(SUFFIXES)}")
    if not files:
        raise CorpusError(f"no .txt, .jsonl or .parquet files under {', '.join(paths)}")
    return sorted(dict.fromkeys(files))


def _decode(data: bytes) -> tuple[str, str]:
    if b"\x00" in data[:4096]:
        return "", "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "", "undecodable"
    return (text, "") if text.strip() else ("", "empty")


@dataclass
class ParseFiles:
    """map_batches function: rows of (path, bytes) -> rows of (doc_id, text, skip)."""

    text_field: str = "text"

    def __call__(self, batch: dict) -> dict:
        ids, texts, skips = [], [], []

        def emit(doc_id, text, skip):
            ids.append(doc_id)
            texts.append(text)
            skips.append(skip)

        for path, data in zip(batch["path"], batch["bytes"]):
            lower = path.lower()
            if lower.endswith(PARQUET_SUFFIXES):
                import pyarrow.parquet as pq

                try:
                    table = pq.read_table(io.BytesIO(data))
                except Exception:  # noqa: BLE001 - any parse failure is a counted skip
                    emit(path, "", "unreadable")
                    continue
                if self.text_field not in table.column_names:
                    emit(path, "", f"no '{self.text_field}' column")
                    continue
                for i, value in enumerate(table.column(self.text_field).to_pylist()):
                    if not isinstance(value, str):
                        emit(f"{path}#{i}", "", "not text")
                    else:
                        emit(f"{path}#{i}", value, "" if value.strip() else "empty")
            elif lower.endswith(JSON_SUFFIXES):
                content, skip = _decode(data)
                if skip:
                    emit(path, "", skip)
                    continue
                for i, line in enumerate(content.splitlines()):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        emit(f"{path}#{i}", "", "bad json")
                        continue
                    value = record.get(self.text_field) if isinstance(record, dict) else None
                    if not isinstance(value, str):
                        emit(f"{path}#{i}", "", f"no '{self.text_field}' field")
                    else:
                        emit(f"{path}#{i}", value, "" if value.strip() else "empty")
            else:
                text, skip = _decode(data)
                emit(path, text, skip)
        return {"doc_id": np.array(ids, dtype=object), "text": np.array(texts, dtype=object),
                "skip": np.array(skips, dtype=object)}


def read_documents(paths: list[str], text_field: str = "text"):
    """Ray Dataset of (doc_id, text, skip) rows; `skip` is "" for usable documents."""
    import ray.data

    files = expand_corpus(paths)
    ds = ray.data.read_binary_files(files, include_paths=True)
    return ds.map_batches(ParseFiles(text_field), batch_size=8, batch_format="numpy")


_TOKENIZERS: dict = {}


def _tokenizer(source: str):
    if source not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[source] = AutoTokenizer.from_pretrained(source)
    return _TOKENIZERS[source]


@dataclass
class Tokenize:
    """map_batches function: (doc_id, text, skip) -> adds `tokens` (int32 arrays), `num_tokens` and
    `digest` (of the tokens: what a document's encoded windows are keyed by). One tokenizer call
    a batch."""

    tokenizer_source: str
    max_tokens: int | None = None  # longer documents are skipped, not truncated

    def __call__(self, batch: dict) -> dict:
        tok = _tokenizer(self.tokenizer_source)
        skips = list(batch["skip"])
        todo = [i for i, skip in enumerate(skips) if not skip]
        encoded = tok([batch["text"][i] for i in todo], add_special_tokens=False).input_ids if todo else []
        tokens = [np.zeros(0, np.int32) for _ in skips]
        for i, ids in zip(todo, encoded):
            ids = np.asarray(ids, dtype=np.int32)
            if ids.size == 0:
                skips[i] = "empty"
            elif self.max_tokens and ids.size > self.max_tokens:
                skips[i], ids = "too long", np.zeros(0, np.int32)
            tokens[i] = ids
        out = dict(batch)
        out.pop("text")
        out["tokens"] = np.array(tokens + [None], dtype=object)[:-1]  # keep ragged arrays as objects
        out["num_tokens"] = np.array([t.size for t in tokens], dtype=np.int64)
        out["digest"] = np.array([hashlib.sha1(t.tobytes()).hexdigest()[:20] for t in tokens], dtype=object)
        out["skip"] = np.array(skips, dtype=object)
        return out
