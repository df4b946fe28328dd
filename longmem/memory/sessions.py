"""Session memories that outlive a process: a MemoryBank whose additions are written through to
storage, and the store that creates, opens, counts and deletes them.

    store = SessionStore("/mnt/longmem/sessions", new_bank=model.new_bank)   # or "s3://bucket/sessions"
    sid = store.create(owner)                 # <root>/<owner>/<sid>/session.json
    bank = store.open(owner, sid)             # a SessionBank: the saved state, then every part since
    model.remember_text(text, bank)
    bank.flush(documents=1)                   # what was added becomes one part file, written atomically
    bank.sync()                               # parts written since by another process: applied here

Storage goes through pyarrow.fs, so the root may be a local folder, a shared mount or an object
store URI. A session folder holds `session.json`, `base-*.safetensors` (the bank's whole state, the
MemoryBank's own tensors) and `part-*.safetensors` (the keys, values and ids of the additions since,
in the memory's dtype). Names start with a nanosecond clock, so every process applies parts in the
order they were written. When the parts since the base hold more tokens than the bank's capacity,
flush writes a new base and deletes what it replaces.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import torch

from .base import StoreError

SESSION_FILE = "session.json"
_ID = re.compile(r"^mem-[0-9a-f]{24}$")
_OWNER = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError):  # a relative local path
        import os

        fs, root = pafs.LocalFileSystem(), os.path.abspath(uri)
    return fs, root.rstrip("/")


class SessionStore:
    def __init__(self, uri: str, new_bank):
        """uri: where sessions live; new_bank(): an empty MemoryBank of the serving model."""
        self.uri, self.new_bank = uri, new_bank
        self.fs, self.root = _filesystem(uri)
        self.fs.create_dir(self.root, recursive=True)

    def _dir(self, owner: str, session_id: str) -> str:
        if not _OWNER.match(owner) or not _ID.match(session_id):
            raise KeyError(session_id)
        return f"{self.root}/{owner}/{session_id}"

    def create(self, owner: str) -> dict:
        session_id = "mem-" + uuid.uuid4().hex[:24]
        folder = self._dir(owner, session_id)
        self.fs.create_dir(folder, recursive=True)
        meta = {"id": session_id, "owner": owner, "created": int(time.time())}
        _write(self.fs, f"{folder}/{SESSION_FILE}", json.dumps(meta).encode())
        return meta

    def exists(self, owner: str, session_id: str) -> bool:
        import pyarrow.fs as pafs

        try:
            folder = self._dir(owner, session_id)
        except KeyError:
            return False
        return self.fs.get_file_info(f"{folder}/{SESSION_FILE}").type == pafs.FileType.File

    def sessions_of(self, owner: str) -> list[str]:
        import pyarrow.fs as pafs

        if not _OWNER.match(owner):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{owner}", allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and _ID.match(i.base_name))

    def open(self, owner: str, session_id: str) -> "SessionBank":
        """The session's bank with everything saved applied; KeyError if there is no such session."""
        if not self.exists(owner, session_id):
            raise KeyError(session_id)
        bank = SessionBank(self, owner, session_id, self.new_bank())
        bank.sync()
        return bank

    def delete(self, owner: str, session_id: str) -> None:
        if not self.exists(owner, session_id):
            raise KeyError(session_id)
        self.fs.delete_dir(self._dir(owner, session_id))


class SessionBank:
    """A MemoryBank (the `Memory` contract) whose additions are kept until `flush` writes them as
    one part. Other processes' parts are applied by `sync`."""

    read_only = False

    def __init__(self, store: SessionStore, owner: str, session_id: str, bank):
        self.store, self.owner, self.id, self.bank = store, owner, session_id, bank
        self.folder = store._dir(owner, session_id)
        self.num_kv_heads, self.head_dim, self.chunk_size = bank.num_kv_heads, bank.head_dim, bank.chunk_size
        self.device = bank.device
        self.applied: set[str] = set()  # part and base files whose content this bank holds
        self.base: str | None = None
        self._log: list[tuple] = []  # additions not yet flushed
        self._part_tokens = 0  # tokens the parts since the base hold
        self.documents = self.tokens = 0  # counted over every part, this process's and others'
        self.created = 0

    # --- the Memory contract
    def add(self, keys, values, token_ids=None, streams=None, skip_first: int = 0) -> None:
        if keys.shape[0] != 1:
            raise StoreError("a session memory has one stream: add one row at a time")
        self.bank.add(keys, values, token_ids=token_ids, skip_first=skip_first)
        ids = token_ids if token_ids is not None else torch.full(keys.shape[:2], -1, dtype=torch.long)
        self._log.append((keys.detach(), values.detach(), ids.detach(), int(skip_first)))

    def search(self, queries, k: int, streams=None, with_next: bool = False):
        return self.bank.search(queries, k, None, with_next=with_next)

    def reset(self, streams=None) -> None:
        raise StoreError("a session memory is deleted, not reset")

    def check_model(self, spec) -> None:
        self.bank.check_model(spec)

    def num_tokens(self, stream: int = 0) -> int:
        return self.bank.num_tokens(0)

    def passage_tokens(self, stream: int = 0):
        return self.bank.passage_tokens(0)

    @property
    def capacity_tokens(self) -> int:
        return self.bank.capacity_tokens

    @property
    def allocated_chunks(self) -> int:
        return self.bank.allocated_chunks

    @property
    def unsaved(self) -> bool:
        return bool(self._log)

    # --- storage
    def flush(self, documents: int = 0, tokens: int = 0) -> None:
        """Write the additions since the last flush as one part (with the counts they add)."""
        from safetensors.torch import save

        if not self._log and not documents:
            return
        dtype = self.bank.dtype
        tensors, adds = {}, []
        for i, (k, v, ids, skip) in enumerate(self._log):
            tensors[f"{i}.keys"] = k[0].to(dtype).cpu().contiguous()
            tensors[f"{i}.values"] = v[0].to(dtype).cpu().contiguous()
            tensors[f"{i}.token_ids"] = ids[0].long().cpu().contiguous()
            adds.append(skip)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.safetensors"
        meta = {"skip_first": json.dumps(adds), "documents": str(documents), "tokens": str(tokens)}
        _write(self.store.fs, f"{self.folder}/{name}", save(tensors, metadata=meta))
        self._part_tokens += sum(k.shape[1] for k, *_ in self._log)
        self._log.clear()
        self.applied.add(name)
        self.documents += documents
        self.tokens += tokens
        if self._part_tokens > self.bank.capacity_tokens:  # the log outgrew the bank: compact it
            self._write_base()

    def sync(self) -> None:
        """Apply what other processes wrote since this bank last looked. KeyError once the session
        was deleted."""
        for attempt in range(3):
            try:
                return self._sync()
            except FileNotFoundError:  # a part went while we read: another process compacted
                if attempt == 2:
                    raise

    def _sync(self) -> None:
        import pyarrow.fs as pafs

        infos = self.store.fs.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
        names = {i.base_name: i for i in infos if i.type == pafs.FileType.File}
        if SESSION_FILE not in names:
            raise KeyError(self.id)
        if not self.created:
            self.created = json.loads(_read(self.store.fs, f"{self.folder}/{SESSION_FILE}"))["created"]
        bases = sorted(n for n in names if n.startswith("base-"))
        newest = bases[-1] if bases else None
        if newest != self.base and newest is not None and newest not in self.applied:
            self._load_base(newest)  # another process compacted: start again from its base
        for name in sorted(n for n in names if n.startswith("part-")):
            if name not in self.applied:
                self._apply_part(name)

    def _apply_part(self, name: str) -> None:
        from safetensors.torch import load

        data = _read(self.store.fs, f"{self.folder}/{name}")
        tensors = load(data)
        meta = _metadata(data)
        for i, skip in enumerate(json.loads(meta["skip_first"])):
            self.bank.add(tensors[f"{i}.keys"][None].to(self.device), tensors[f"{i}.values"][None].to(self.device),
                          token_ids=tensors[f"{i}.token_ids"][None].to(self.device), skip_first=skip)
            self._part_tokens += tensors[f"{i}.keys"].shape[0]
        self.documents += int(meta["documents"])
        self.tokens += int(meta["tokens"])
        self.applied.add(name)

    def _load_base(self, name: str) -> None:
        from safetensors.torch import load

        data = _read(self.store.fs, f"{self.folder}/{name}")
        self.bank = self.store.new_bank()
        self.bank.load_state_dict(load(data))
        meta = _metadata(data)
        self.documents, self.tokens = int(meta["documents"]), int(meta["tokens"])
        self.base, self._part_tokens = name, 0
        self.applied = {name} | set(json.loads(meta["parts"]))

    def _write_base(self) -> None:
        """The bank's whole state as a new base; the parts it includes and older bases go."""
        from safetensors.torch import save

        included = sorted(n for n in self.applied if n.startswith("part-"))
        name = f"base-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.safetensors"
        meta = {"documents": str(self.documents), "tokens": str(self.tokens), "parts": json.dumps(included)}
        _write(self.store.fs, f"{self.folder}/{name}", save(self.bank.state_dict(), metadata=meta))
        old = [n for n in self.applied if n != name]
        self.base, self.applied, self._part_tokens = name, {name, *included}, 0
        for n in old:
            try:
                self.store.fs.delete_file(f"{self.folder}/{n}")
            except OSError:
                pass

    def info(self) -> dict:
        return {"id": self.id, "object": "memory", "created": self.created, "documents": self.documents,
                "tokens_added": self.tokens, "tokens_in_memory": self.bank.num_tokens(0),
                "capacity_tokens": self.bank.capacity_tokens}


def _write(fs, path: str, data: bytes) -> None:
    """Write a whole file under a temporary name, then move it into place: a reader sees all or nothing."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})
