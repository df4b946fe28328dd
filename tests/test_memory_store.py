"""The on-disk memory format read by the model, without Ray: a built memory reads like a bank."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_longmem
from longmem.config import LongMemConfig
from longmem.memory.encoder import MemoryEncoder, write_memory_dir
from longmem.memory import CombinedMemory, StoreError
from longmem.memory.base import import_faiss
from longmem.memory.store import MemoryStore, list_shards
from longmem.model import InputError, LongMem

# The defaults, in chunks of 4, with every path of memory acting at step 0 (plain layer copies, a
# live value read beside the copy head).
SETTINGS = dict(memory__chunk_size=4, memory__capacity_tokens=1024, sidenet__init="paper", read__scale_init=1.0)


@pytest.fixture(scope="module")
def model_and_docs():
    torch.manual_seed(0)
    model = tiny_longmem("llama", **SETTINGS)
    g = torch.Generator().manual_seed(1)
    docs = [(f"doc{i}", torch.randint(0, 100, (n,), generator=g).numpy()) for i, n in enumerate((96, 70, 128))]
    return model, docs


def encoder_for(model):
    return MemoryEncoder(model)


@pytest.mark.parametrize("shards", [1, 3])
def test_model_reads_a_built_memory_as_it_reads_a_bank(tmp_path, model_and_docs, shards):
    model, docs = model_and_docs
    doc_id, ids = docs[2]
    write_memory_dir(tmp_path / "m", encoder_for(model), [(doc_id, ids)], shards=1)
    store = MemoryStore.open(tmp_path / "m", verify=True)
    bank = model.new_bank(1)
    model.write_memory(torch.as_tensor(ids)[None], bank)
    query = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(5))
    from_bank, from_store = model(query, bank=bank), model(query, bank=store)
    torch.testing.assert_close(from_store.logits, from_bank.logits, atol=1e-4, rtol=1e-4)
    # sharding the corpus changes nothing; a bank + the corpus reads both
    write_memory_dir(tmp_path / f"s{shards}", encoder_for(model), docs, shards=shards)
    write_memory_dir(tmp_path / "s1ref", encoder_for(model), docs, shards=1)
    sharded, single = MemoryStore.open(tmp_path / f"s{shards}"), MemoryStore.open(tmp_path / "s1ref")
    assert len(list_shards(tmp_path / f"s{shards}")) == shards
    torch.testing.assert_close(model(query, bank=sharded).logits, model(query, bank=single).logits)
    combined = CombinedMemory(model.new_bank(1), [single])  # empty session bank + corpus == corpus
    torch.testing.assert_close(model(query, bank=combined).logits, model(query, bank=single).logits)
    session = model.new_bank(1)
    out = model.generate(query, bank=CombinedMemory(session, [single]), max_new_tokens=40)
    assert len(out.token_ids[0]) == 40 and session.num_tokens(0) > 0  # the window shifted into the session bank


def test_token_level_memory_reads_the_same_from_a_store_as_from_a_bank(tmp_path):
    """chunk_size=1 (every token its own chunk, searched alone): the faiss store, the next-token
    successors across slots and the bank agree."""
    torch.manual_seed(0)
    model = tiny_longmem("llama", **dict(SETTINGS, memory__chunk_size=1, memory__retrieve_tokens=16))
    ids = torch.randint(0, 100, (1, 100), generator=torch.Generator().manual_seed(1))
    model.calibrate_key_center(ids)  # centred keys: the encoder must store what the bank stores
    write_memory_dir(tmp_path / "m", encoder_for(model), [("doc", ids[0].numpy())], shards=2)
    bank = model.new_bank(1)
    model.write_memory(ids, bank)
    query = ids[:, 40:60]  # a repeat: every token's twin is in memory
    from_bank, from_store = model(query, bank=bank), model(query, bank=MemoryStore.open(tmp_path / "m"))
    torch.testing.assert_close(from_store.logits, from_bank.logits, atol=1e-4, rtol=1e-4)
    retrieval = from_bank.readout.retrieval
    assert retrieval.keys.shape[-2] == 16 and bool(retrieval.next_mask.any())
    torch.testing.assert_close(from_store.readout.retrieval.next_values, retrieval.next_values, atol=1e-5, rtol=1e-5)
    assert torch.equal(from_store.readout.retrieval.prev_token_ids, retrieval.prev_token_ids)
    assert torch.equal(from_store.readout.retrieval.next_token_ids, retrieval.next_token_ids)
    assert (retrieval.prev_token_ids >= 0).any()
    model.calibrate_key_center(ids[:, :50])  # another centre: the built memory no longer matches
    with pytest.raises(InputError, match="key_center"):
        model(query, bank=MemoryStore.open(tmp_path / "m"))


def test_store_errors_are_clear(tmp_path, model_and_docs):
    model, docs = model_and_docs
    with pytest.raises(StoreError, match="no such memory directory"):
        MemoryStore.open(tmp_path / "nothing")
    write_memory_dir(tmp_path / "m", encoder_for(model), docs[:1])
    store = MemoryStore.open(tmp_path / "m")
    with pytest.raises(InputError, match="read-only|writable"):
        model(torch.zeros(1, 8, dtype=torch.long), bank=store, update_memory=True)
    other = tiny_longmem("llama", seed=1, **SETTINGS)
    with pytest.raises(InputError, match="different model"):
        other(torch.zeros(1, 8, dtype=torch.long), bank=store)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="format 99"):
        MemoryStore.open(tmp_path / "m")
    write_memory_dir(tmp_path / "n", encoder_for(model), docs[:1])
    shard = next((tmp_path / "n").glob("shard-00000-*"))  # shard folders are named by content
    keys = shard / "keys.npy"
    data = bytearray(keys.read_bytes())
    data[-1] ^= 0xFF
    keys.write_bytes(bytes(data))
    MemoryStore.open(tmp_path / "n")  # same size: only a checksum finds it
    with pytest.raises(StoreError, match="checksum"):
        MemoryStore.open(tmp_path / "n", verify=True)
    (shard / "values.npy").write_bytes(b"short")
    with pytest.raises(StoreError, match="wrong size"):
        MemoryStore.open(tmp_path / "n")


def test_faiss_indexes_agree_with_exact_search(tmp_path, model_and_docs):
    """flat == exact; IVF at full probe == exact; the kinds are recorded."""
    from longmem.memory.writer import build_index

    g = np.random.default_rng(0)
    x = g.standard_normal((5000, 16)).astype(np.float32)
    q = g.standard_normal((50, 16)).astype(np.float32)
    exact = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :8]
    flat, kind = build_index(x, "flat")
    assert kind == "flat" and np.array_equal(flat.search(q, 8)[1], exact)
    ivf, kind = build_index(x, "ivf")
    ivf.nprobe = ivf.nlist
    assert kind == "ivf" and np.mean([len(set(a) & set(b)) / 8 for a, b in zip(ivf.search(q, 8)[1], exact)]) > 0.99
    small, kind = build_index(x[:100], "ivfpq")  # too few vectors to train PQ: falls back
    assert kind == "ivf"


def test_exact_rerank_restores_product_quantised_recall():
    """IVF-PQ candidates re-scored exactly: the full candidate list gives exact top-k, and 4k
    candidates recover most of what PQ's coarse scores lose."""
    from longmem.memory.store import rerank_exact
    from longmem.memory.writer import build_index

    g = np.random.default_rng(0)
    centers = g.standard_normal((64, 32)).astype(np.float32)
    x = (centers[g.integers(0, 64, 20000)] + 0.3 * g.standard_normal((20000, 32))).astype(np.float32)
    q = x[g.integers(0, 20000, 64)] + 0.1 * g.standard_normal((64, 32)).astype(np.float32)
    exact = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :16]
    everything = np.tile(np.arange(len(x)), (len(q), 1))
    _, rows = rerank_exact(lambda r: x[r], q, np.zeros(everything.shape, np.float32), everything, 16)
    assert np.array_equal(rows, exact)
    pq, kind = build_index(x, "ivfpq")
    assert kind == "ivfpq"
    pq.nprobe = 16
    recall = lambda found: np.mean([len(set(a) & set(b)) / 16 for a, b in zip(found, exact)])  # noqa: E731
    plain = recall(pq.search(q, 16)[1])
    s, cand = pq.search(q, 64)
    reranked = recall(rerank_exact(lambda r: x[r], q, s, cand, 16)[1])
    assert reranked > plain + 0.3 and reranked > 0.75  # measured 0.40 -> 0.81
    cand[:, -5:] = -1  # missing candidates stay missing, never a wrong row
    _, rows = rerank_exact(lambda r: x[r], q, s, cand, 64)
    assert (rows[:, -5:] == -1).all()


def test_shards_are_token_ranges_that_split_long_documents():
    """Documents in id order, cut at window boundaries into shards of balanced tokens: a long
    document spans shards, every window lands once and in order; a target size sets the count."""
    from longmem.memory.writer import plan_shards

    docs = [("b", 1000), ("a", 100), ("c", 40)]  # 'b' alone is most of the corpus
    plan = plan_shards(docs, window=64, shards=3)
    flat = [(p.doc_id, p.start) for shard in plan for p in shard]
    assert flat == [(d, s) for d, n in sorted(docs) for s in range(0, n, 64)]
    assert {p.doc_id for p in plan[0]} & {p.doc_id for p in plan[1]} == {"b"}  # 'b' is split
    sizes = [sum(p.length for p in shard) for shard in plan]
    assert max(sizes) - min(sizes) <= 64 and sum(sizes) == 1140
    assert len(plan_shards(docs, window=64, shard_tokens=300)) == 4  # ceil(1140 / 300)
    assert plan_shards(docs, window=64, shards=3) == plan  # deterministic
    assert sum(1 for shard in plan_shards(docs, window=64, shards=40) if not shard) == 40 - len(flat)


def test_more_shards_than_windows_leaves_empty_shards_that_search_fine(tmp_path, model_and_docs):
    model, docs = model_and_docs
    write_memory_dir(tmp_path / "m", encoder_for(model), docs[:2], shards=8)  # 6 windows of 32 tokens
    store = MemoryStore.open(tmp_path / "m")
    assert sorted(s.num_chunks == 0 for s in store.shards) == [False] * 6 + [True] * 2
    write_memory_dir(tmp_path / "one", encoder_for(model), docs[:2], shards=1)
    query = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(query, bank=store).logits, model(query, bank=MemoryStore.open(tmp_path / "one")).logits)
    hits = store.search(torch.randn(1, 3, 4, 16), k=5, with_next=True)
    assert hits.token_ids.shape == (1, 4, 3, 5, 4)
    warmed = store.prewarm(budget_bytes=10**12)  # empty shards too
    assert warmed["complete"] and warmed["bytes"] > 0


def test_every_memory_keeps_the_contract_and_returns_the_same_retrieval(tmp_path):
    """A bank, a built store (1 or 2 shards) and their combinations, holding one document, return
    the same retrieval for the same queries, next-token neighbours included."""
    from longmem.memory import Memory

    model = tiny_longmem("llama", **dict(SETTINGS, memory__chunk_size=1, memory__retrieve_tokens=16))
    doc = torch.randint(0, 100, (1, 100), generator=torch.Generator().manual_seed(4))
    bank = model.new_bank(1)
    model.write_memory(doc, bank)
    write_memory_dir(tmp_path / "m", encoder_for(model), [("doc", doc[0].numpy())], shards=2)
    store = MemoryStore.open(tmp_path / "m")
    memories = {"bank": bank, "store": store, "bank+nothing": CombinedMemory(bank, []),
                "empty bank+store": CombinedMemory(model.new_bank(1), [store]), "store alone": CombinedMemory(None, [store])}
    queries = torch.randn(1, 7, 2, 16, generator=torch.Generator().manual_seed(5))
    results = {}
    for name, memory in memories.items():
        assert isinstance(memory, Memory), name
        memory.check_model(model.memory_spec)
        results[name] = memory.search(queries, 16, with_next=True)
    reference = results["bank"]
    for name, r in results.items():
        torch.testing.assert_close(r.scores, reference.scores, msg=name)
        for field in ("positions", "token_ids", "next_mask", "prev_token_ids", "next_token_ids"):
            assert torch.equal(getattr(r, field), getattr(reference, field)), (name, field)
        for field in ("keys", "values", "next_values"):
            torch.testing.assert_close(getattr(r, field), getattr(reference, field), msg=f"{name} {field}")
    with pytest.raises(StoreError, match="read-only"):
        store.add(torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16))
    with pytest.raises(StoreError, match="read-only"):
        CombinedMemory(None, [store]).add(torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16))
    CombinedMemory(bank, [store]).reset()  # resets the session bank only
    assert bank.num_tokens(0) == 0 and store.num_chunks > 0


def test_a_missing_faiss_is_a_clear_error_naming_the_extras(monkeypatch):
    import sys

    from longmem.memory.base import StoreError, import_faiss

    assert import_faiss().__name__ == "faiss"
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if neither extra were installed
    with pytest.raises(StoreError, match=r"longmem\[cpu\]"):
        import_faiss()


def test_ivf_shards_keep_their_lists_on_disk_and_at_full_probe_equal_exact_search(tmp_path):
    """An IVF shard is written in blocks with its inverted lists in a file beside the index (read
    memory-mapped, found beside the index when the folder moves); probing every list gives the
    exact search's chunks and scores."""
    import shutil

    model = tiny_longmem("llama", **dict(SETTINGS, memory__chunk_size=1, memory__retrieve_tokens=16))
    docs = [(f"d{i}", torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(i)).numpy())
            for i, n in enumerate((300, 200))]
    write_memory_dir(tmp_path / "flat", encoder_for(model), docs, shards=1, index="flat")
    write_memory_dir(tmp_path / "ivf", encoder_for(model), docs, shards=1, index="ivf")
    shutil.move(tmp_path / "ivf", tmp_path / "moved")
    [shard] = list_shards(tmp_path / "moved")
    assert shard["index"] == "ivf"
    meta = json.loads(next((tmp_path / "moved").glob("shard-*")).joinpath("shard.json").read_text())
    assert meta["recall@64"] >= 0.95 and 1 <= meta["nprobe"] <= meta["nlist"]  # probes measured on its own keys
    assert meta["codes"] == "float16"  # a shard that holds codes says so: its hits are rescored
    index_files = {p.name for p in next((tmp_path / "moved").glob("shard-*")).joinpath("index").iterdir()}
    assert index_files == {f"head-{h}.{ext}" for h in range(2) for ext in ("faiss", "ivfdata")}
    exact, ivf = MemoryStore.open(tmp_path / "flat"), MemoryStore.open(tmp_path / "moved", nprobe=10_000, verify=True)
    faiss = import_faiss()
    for index in ivf.shards[0].indexes:  # float16 codes, read in place (no prefetch threads per search)
        assert type(index).__name__ == "IndexIVFScalarQuantizer"
        assert faiss.downcast_InvertedLists(index.invlists).prefetch_nthread == 0
    queries = torch.randn(2, 6, 4, 16, generator=torch.Generator().manual_seed(7))
    a, b = exact.search(queries, 16, with_next=True), ivf.search(queries, 16, with_next=True)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.next_values, b.next_values)
    from longmem.memory.writer import index_kind_for

    assert index_kind_for("auto", 1000, 64) == "flat" and index_kind_for("auto", 10_000_000, 64) == "ivf"


def test_prewarm_reads_what_a_search_reads_index_first_within_its_budget(tmp_path, monkeypatch):
    """Prewarming reads every shard's index files, then keys, then values, in that order, stops
    at its budget, and leaves searches as they were."""
    import longmem.memory.store as store_module

    model = tiny_longmem("llama", **dict(SETTINGS, memory__chunk_size=1, memory__retrieve_tokens=16))
    docs = [(f"d{i}", torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(i)).numpy())
            for i, n in enumerate((300, 200))]
    write_memory_dir(tmp_path / "mem", encoder_for(model), docs, shards=2, index="ivf")
    store = MemoryStore.open(tmp_path / "mem")
    queries = torch.randn(1, 4, 4, 16, generator=torch.Generator().manual_seed(3))
    before = store.search(queries, 16, with_next=True)
    read = []
    real = store_module.prewarm_files
    monkeypatch.setattr(store_module, "prewarm_files", lambda paths, budget: read.extend(paths) or real(paths, budget))
    result = store.prewarm(budget_bytes=10**12)
    tiers = [[p for shard in store.shards for p in shard.search_files()[t]] for t in range(3)]
    assert read == tiers[0] + tiers[1] + tiers[2]
    assert [p.name for p in tiers[0]] == [f"head-{h}.ivfdata" for _ in range(2) for h in range(2)]
    total = sum(p.stat().st_size for p in read)
    assert result["bytes"] == result["of_bytes"] == total and result["complete"]
    part = store.prewarm(budget_bytes=1000)
    assert part["bytes"] == 1000 and not part["complete"]
    assert store.prewarm()["bytes"] > 0  # the default budget: a share of the memory available
    after = store.search(queries, 16, with_next=True)
    assert torch.equal(before.positions, after.positions) and torch.equal(before.scores, after.scores)
