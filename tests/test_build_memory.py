"""Building a sharded memory with Ray Data on a real local Ray, and reading it back."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import longmem_on
from longmem.memory import StoreError
from longmem.memory.store import MemoryStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SETTINGS = dict(memory__window=64, memory__chunk_size=4, memory__sink_tokens=4, memory__dtype="float32", memory__metric="ip")


def overrides(**settings):
    return {k.replace("__", "."): v for k, v in settings.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, austen_text):
    folder = tmp_path_factory.mktemp("memory-corpus")
    for i, size in enumerate((3000, 1800, 2600)):
        (folder / f"part{i}.txt").write_text(austen_text[i * 4000 : i * 4000 + size])
    (folder / "empty.txt").write_text("  \n")
    (folder / "blob.txt").write_bytes(b"\x00\x01" * 50)
    (folder / "bad.txt").write_bytes(b"caf\xe9 au lait" * 20)
    rows = [{"text": austen_text[20000:21500]}, {"title": "no text"}, {"text": "Hi."}]
    (folder / "notes.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    return folder


def build(tiny_dir, corpus, out, **kw):
    from pipelines.build_memory import BuildJob, build_memory

    model = {"backbone": str(tiny_dir), "overrides": overrides(**{**SETTINGS, **kw.pop("settings", {})})}
    settings = dict(corpus=[str(corpus)], out=str(out), model=model, batch_size=3)
    settings.update(kw)
    return build_memory(BuildJob(**settings), progress=lambda _m: None)


@pytest.fixture(scope="module")
def one_shard(ray_local, tiny_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("mem1") / "memory"
    return out, build(tiny_dir, corpus, out)


@pytest.fixture(scope="module")
def three_shards(ray_local, tiny_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("mem3") / "memory"
    return out, build(tiny_dir, corpus, out, shards=3, max_actors=2, batch_size=2)


def reference_chunks(tiny_dir, corpus):
    """Each usable document fed to its own in-process MemoryBank stream by LongMem.write_memory."""
    from longmem.model import LongMem

    model = longmem_on(str(tiny_dir), **SETTINGS, memory__capacity_tokens=4096)
    tok = model.tokenizer
    texts = {str(p): p.read_text() for p in sorted(corpus.glob("part*.txt"))}
    for i, line in enumerate((corpus / "notes.jsonl").read_text().splitlines()):
        if line.startswith("{\"text\""):
            texts[f"{corpus / 'notes.jsonl'}#{i}"] = json.loads(line)["text"]
    chunks = {}
    for doc_id, text in texts.items():
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        if ids.shape[1] < SETTINGS["memory__chunk_size"]:
            continue
        bank = model.new_bank(1)
        model.write_memory(ids, bank)
        n = int(bank.count[0])
        for j in range(n):
            chunks[(doc_id, int(bank.chunk_positions[0, j]))] = (
                bank.token_ids[0, j].numpy(), bank.keys[0, :, j].numpy(), bank.values[0, :, j].numpy())
    return model, chunks


def test_store_holds_the_chunks_a_bank_holds_and_search_is_exact(one_shard, tiny_dir, corpus):
    out, summary = one_shard
    assert summary["skipped"] == {"empty": 1, "too short": 1, "binary": 1, "undecodable": 1, "no 'text' field": 1, "bad json": 1}
    assert summary["documents"] == 4 and summary["shards"] == 1 and summary["chunks"] > 0
    store = MemoryStore.open(out, verify=True)
    model, reference = reference_chunks(tiny_dir, corpus)
    shard = store.shards[0]
    got = {(d, int(p)): i for i, (d, p) in enumerate(zip(shard.doc_ids, shard.positions))}
    assert set(got) == set(reference)
    for key, (ids, keys, values) in reference.items():
        i = got[key]
        assert np.array_equal(shard.token_ids[i], ids)
        np.testing.assert_allclose(shard.keys[i], keys, atol=1e-5)  # padded windows: last-bit differences only
        np.testing.assert_allclose(shard.values[i], values, atol=1e-5)
    # a search through the store == exact top-k over the reference chunks
    store.check_model(model.memory_spec)
    order = list(reference)
    chunk_keys = torch.tensor(np.stack([reference[c][1].mean(axis=1) for c in order]))  # (N, Hkv, D)
    queries = torch.randn(1, 5, model.adapter.num_heads, model.adapter.head_dim, generator=torch.Generator().manual_seed(0))
    hits = store.search(queries, k=6)
    G = model.adapter.num_heads // model.adapter.num_kv_heads
    for h in range(model.adapter.num_heads):
        for t in range(5):
            exact = (chunk_keys[:, h // G] @ queries[0, t, h]).topk(6).indices.tolist()
            want = [order[j][1] for j in exact]
            assert hits.positions[0, h, t].tolist() == want


def test_three_shards_give_the_same_search_as_one(one_shard, three_shards):
    (out1, s1), (out3, s3) = one_shard, three_shards
    assert s3["chunks"] == s1["chunks"] and s3["shards"] == 3
    one, three = MemoryStore.open(out1), MemoryStore.open(out3)
    assert all(s.num_chunks > 0 for s in three.shards)
    queries = torch.randn(2, 7, 4, 16, generator=torch.Generator().manual_seed(1))
    a, b = one.search(queries, k=8, with_next=True), three.search(queries, k=8, with_next=True)
    ident = lambda store, r: [[[(store_doc(store, int(s)), int(p)) for s, p in zip(ss, pp)]  # noqa: E731
                               for ss, pp in zip(sh, ph)] for sh, ph in zip(r.slots.flatten(0, 1), r.positions.flatten(0, 1))]
    assert ident(one, a) == ident(three, b)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.keys, b.keys)
    torch.testing.assert_close(a.next_values, b.next_values)
    assert torch.equal(a.next_mask, b.next_mask)


def test_a_sharded_search_moves_only_the_winners_and_equals_merging_every_shards_top_k(three_shards):
    """The two-phase search (scores from every shard, then the winners' entries from their shards)
    returns what merging each shard's full top-k returns, and gathers exactly k entries a query head."""
    from longmem.memory import merge_retrievals
    from longmem.memory.store import entries_of, pick_winners, search_queries

    out3, _ = three_shards
    three = MemoryStore.open(out3)
    queries = torch.randn(2, 7, 4, 16, generator=torch.Generator().manual_seed(2))
    got = three.search(queries, k=8, with_next=True)
    offsets = np.cumsum([0] + [s.num_chunks for s in three.shards])[:-1]
    parts = []
    for i, off in enumerate(offsets):  # each shard alone, as the one-phase reply of a whole shard
        r = MemoryStore.open(out3, shards=[i]).search(queries, k=8, with_next=True)
        r.slots = torch.where(r.slots >= 0, r.slots + int(off), r.slots)
        parts.append(r)
    want = merge_retrievals(parts, 8)
    for name in ("keys", "values", "token_mask", "scores", "slots", "positions", "token_ids", "next_values",
                 "next_mask", "prev_token_ids", "next_token_ids"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    q = search_queries(queries)
    scores, owner, rows = pick_winners([s.search(q, 8) for s in three.shards], 8)
    won = [len(entries_of(owner, rows, i, three.spec.num_kv_heads)[0]) for i in range(3)]
    assert sum(won) == q.shape[0] * 4 * 8 and all(won), won


def store_doc(store, slot):
    for shard in store.shards:
        if slot < shard.num_chunks:
            return shard.doc_ids[slot]
        slot -= shard.num_chunks
    raise AssertionError


def test_next_values_follow_the_document(one_shard):
    """A shard's row r + 1 continues row r only inside one document, at the next position."""
    out, _ = one_shard
    store = MemoryStore.open(out)
    shard = store.shards[0]
    rows = np.arange(shard.num_chunks)[:, None, None].repeat(4, axis=1)  # every chunk, all 4 query heads
    got = shard.gather(rows, with_next=True)
    for i in range(shard.num_chunks - 1):
        joined = shard.doc_ids[i] == shard.doc_ids[i + 1] and shard.positions[i + 1] == shard.positions[i] + 4
        assert bool(got["next_joined"][i, 0, 0]) == joined and bool(got["prev_joined"][i + 1, 0, 0]) == joined
        np.testing.assert_array_equal(got["next_first_values"][i, 0, 0], shard.values[i + 1, 0, 0])
        assert got["next_first_ids"][i, 0, 0] == shard.token_ids[i + 1, 0]
    hits = store.search(torch.randn(1, 3, 4, 16), k=5, with_next=True)  # and what the read gets from them
    assert bool(hits.next_mask.any()) and bool((hits.next_token_ids >= 0).any())


def test_killed_build_resumes_to_the_same_manifest(ray_local, three_shards, tiny_dir, corpus, tmp_path):
    out3, _ = three_shards
    out = tmp_path / "memory"
    cmd = [sys.executable, "-m", "pipelines.cli", "build-memory", "--corpus", str(corpus), "--out", str(out),
           "--backbone", str(tiny_dir), "--shards", "3", "--max-actors", "2", "--batch-size", "1",
           *[arg for k, v in overrides(**SETTINGS).items() for arg in ("--set", f"{k}={v}")]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / ".parts").exists() and any((out / ".parts").rglob("*.npz")):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    with pytest.raises(StoreError, match="has not finished"):
        MemoryStore.open(out)
    summary = build(tiny_dir, corpus, out, shards=3, max_actors=2, batch_size=2)
    assert (out / "manifest.json").read_text() == (out3 / "manifest.json").read_text()
    again = build(tiny_dir, corpus, out, shards=3)  # idempotent: nothing left to do
    assert again["shards_reused"] == 3 and summary["chunks"] == again["chunks"]


@pytest.mark.timeout(300)
def test_encoder_actors_that_take_every_cpu_still_finish(ray_local, three_shards, tiny_dir, corpus, tmp_path):
    """2 actors x 1 CPU on the 2-CPU local Ray: nothing else the build needs may wait for a free CPU
    (this stalled for good when windows were cut by 1-CPU tasks streaming beside the actors)."""
    out3, _ = three_shards
    out = tmp_path / "memory"
    build(tiny_dir, corpus, out, shards=3, min_actors=2, max_actors=2, num_cpus_per_actor=1.0, batch_size=2)
    assert (out / "manifest.json").read_text() == (out3 / "manifest.json").read_text()


def test_shard_tasks_ask_for_memory_that_does_not_grow_with_the_shard():
    """A shard is written as a stream and indexed in blocks: its task asks Ray for a bounded
    amount, the same for 1M and 10M tokens, and less for a small shard."""
    from longmem.memory import MemorySpec
    from longmem.memory.writer import shard_task_memory

    smollm2 = MemorySpec(num_kv_heads=3, head_dim=64, chunk_size=1, metric="cosine")
    assert shard_task_memory(10_000_000, smollm2) == shard_task_memory(1_000_000, smollm2) < 2 << 30
    assert shard_task_memory(10_000, smollm2) < shard_task_memory(1_000_000, smollm2)


def test_a_rebuild_is_a_new_generation_and_readers_of_the_old_one_keep_working(ray_local, tiny_dir, corpus, tmp_path):
    """Rebuilding in place (here: other shard counts) writes new shard folders and swaps the
    manifest; a store opened on the old manifest still searches, and the same corpus in 1 or 2
    token-range shards searches the same. Folders two generations old are collected."""
    out = tmp_path / "memory"
    first = build(tiny_dir, corpus, out, shards=1)
    old = MemoryStore.open(out)
    queries = torch.randn(1, 4, 4, 16, generator=torch.Generator().manual_seed(3))
    before = old.search(queries, k=5, with_next=True)
    second = build(tiny_dir, corpus, out, shards=2)
    assert (first["generation"], second["generation"], second["shards_collected"]) == (1, 2, 0)
    assert all((out / s.directory.name).is_dir() for s in old.shards)  # the old generation stays
    again = old.search(queries, k=5, with_next=True)
    new = MemoryStore.open(out)
    assert len(new.shards) == 2 and new.num_chunks == old.num_chunks
    for hits in (again, new.search(queries, k=5, with_next=True)):
        for name in ("scores", "positions", "token_ids", "next_mask", "next_token_ids", "prev_token_ids"):
            assert torch.equal(getattr(hits, name), getattr(before, name)), name
        torch.testing.assert_close(hits.next_values, before.next_values)
    third = build(tiny_dir, corpus, out, shards=3)
    assert third["generation"] == 3 and third["shards_collected"] == 1
    assert not any((out / s.directory.name).exists() for s in old.shards)
    assert {p.name for p in out.glob("shard-*")} == {s.directory.name for s in new.shards} | {
        s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"]}


def test_bad_builds_are_refused(ray_local, one_shard, tiny_dir, corpus, tmp_path):
    from pipelines.corpus import CorpusError

    out1, _ = one_shard
    with pytest.raises(CorpusError, match="no such file"):
        build(tiny_dir, tmp_path / "missing", tmp_path / "m0")
    with pytest.raises(StoreError, match="different model"):  # same folder, other memory settings
        build(tiny_dir, corpus, out1, settings={"memory__chunk_size": 8})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        build(tiny_dir, corpus, tmp_path / "busy")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "empty.txt").write_text("")
    with pytest.raises(StoreError, match="no usable documents"):
        build(tiny_dir, junk, tmp_path / "m1")
    with pytest.raises(StoreError, match="no finished memory"):
        MemoryStore.open(tmp_path / "busy")


def test_cli_build_memory_reports_bad_input_in_one_line(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    run = lambda *a: subprocess.run([sys.executable, "-m", "pipelines.cli", *a], capture_output=True, text=True, env=env)  # noqa: E731
    r = run("build-memory", "--corpus", str(tmp_path / "nothing"), "--out", str(tmp_path / "m"), "--shards", "0")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    r = run("memory-info", str(tmp_path))
    assert r.returncode == 2 and "no finished memory" in r.stderr


def test_real_backbone_over_one_chapter(ray_local, tmp_path, austen_text):
    """SmolLM2 over a chapter: the store searched with a passage's own keys finds that passage."""
    import dataclasses

    chapter = austen_text[:12000]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "chapter.txt").write_text(chapter)
    from pipelines.build_memory import BuildJob, build_memory

    summary = build_memory(BuildJob(corpus=[str(tmp_path / "corpus")], out=str(tmp_path / "mem"), shards=2),
                           progress=lambda _m: None)
    assert summary["documents"] == 1 and summary["memory_tokens"] > 2000
    assert summary["bytes_per_token"] < 1700  # fp16 keys + values 768 B, a float32 index key per token 768 B
    model = longmem_on()
    c = model.config.memory.chunk_size
    store = MemoryStore.open(tmp_path / "mem", verify=True)
    store.check_model(model.memory_spec)
    ids = model.encode(chapter)[:, :512]
    keys = model.backbone_states(ids).memory_keys  # (1, 512, Hkv, D)
    hits = store.search(keys[:, 100:164], k=4)  # tokens 100..163 of window 0, each KV head's key searching
    starts = hits.positions[0]  # (Hkv, 64, k)
    original = torch.arange(100, 164)[None, :, None]
    found = ((starts <= original) & (original < starts + c)).any(-1).any(0).float().mean().item()
    assert found > 0.9
    with pytest.raises(StoreError, match="chunk_size"):
        store.check_model(dataclasses.replace(model.memory_spec, chunk_size=8))


def test_corpus_files_stream_out_in_blocks_with_stable_row_ids(ray_local, tmp_path):
    """A JSON-lines and a Parquet file of many rows are read by Ray Data's file datasource as a
    stream of blocks of documents (never one row per file, never the whole file at once), each
    row with its file row number as id and bad rows counted, not fatal."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from pipelines.corpus import ROWS_PER_BLOCK, _read_corpus_file, read_documents

    n = 2 * ROWS_PER_BLOCK + 10
    lines = [json.dumps({"text": f"note {i}"}) for i in range(n)]
    lines[3], lines[7] = "{broken", json.dumps({"title": "no text"})
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": [f"row {i}" if i % 50 else None for i in range(n)]}), tmp_path / "big.parquet",
                   row_group_size=100)
    fs = pafs.LocalFileSystem()
    with fs.open_input_stream(str(tmp_path / "big.jsonl")) as f:  # what a read task yields, in turn
        assert [t.num_rows for t in _read_corpus_file(f, "big.jsonl", "text")] == [ROWS_PER_BLOCK] * 2 + [10]
    with fs.open_input_file(str(tmp_path / "big.parquet")) as f:
        assert sum(1 for _ in _read_corpus_file(f, "big.parquet", "text")) == 3
    rows = {r["doc_id"]: r for r in read_documents([str(tmp_path)]).take_all()}
    assert len(rows) == 2 * n
    jsonl, parquet = str(tmp_path / "big.jsonl"), str(tmp_path / "big.parquet")
    assert rows[f"{jsonl}#{n - 1}"]["text"] == f"note {n - 1}" and rows[f"{parquet}#{n - 1}"]["text"] == f"row {n - 1}"
    assert rows[f"{jsonl}#3"]["skip"] == "bad json" and rows[f"{jsonl}#7"]["skip"] == "no 'text' field"
    assert sum(r["skip"] == "not text" for r in rows.values()) == len(range(0, n, 50))
