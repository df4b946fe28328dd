"""Session memories written through to storage: reopened elsewhere they search exactly alike."""

import pytest
import torch

from conftest import tiny_longmem
from longmem.memory.sessions import SessionStore


@pytest.fixture()
def model():
    return tiny_longmem("llama", memory__capacity_tokens=256)


def text_ids(n, seed):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def same_search(a, b, model):
    q = torch.randn(1, 5, model.adapter.num_kv_heads, model.adapter.head_dim, generator=torch.Generator().manual_seed(0))
    ra, rb = a.search(q, 8, with_next=True), b.search(q, 8, with_next=True)
    for name in ("scores", "positions", "token_ids", "next_token_ids"):
        assert torch.equal(getattr(ra, name), getattr(rb, name)), name
    torch.testing.assert_close(ra.keys, rb.keys)
    torch.testing.assert_close(ra.next_values, rb.next_values)


def test_a_session_reopened_by_another_process_holds_the_same_memory(tmp_path, model):
    store = SessionStore(str(tmp_path), new_bank=lambda: model.new_bank(1))
    sid = store.create("owner1")["id"]
    bank = store.open("owner1", sid)
    model.write_memory(text_ids(70, 1), bank)  # 70 tokens in windows of 32
    bank.flush(documents=1, tokens=70)
    model.write_memory(text_ids(10, 2), bank)
    bank.flush(documents=1, tokens=10)

    elsewhere = SessionStore(str(tmp_path), new_bank=lambda: model.new_bank(1)).open("owner1", sid)
    same_search(bank, elsewhere, model)
    assert elsewhere.info()["documents"] == 2 and elsewhere.info()["tokens_added"] == 80
    assert elsewhere.num_tokens() == bank.num_tokens() > 0

    model.write_memory(text_ids(20, 3), elsewhere)  # written by the other process: seen after sync
    elsewhere.flush(documents=1, tokens=20)
    bank.sync()
    same_search(bank, elsewhere, model)
    assert bank.info()["documents"] == 3


def test_the_log_is_compacted_into_a_base_and_readers_follow(tmp_path, model):
    store = SessionStore(str(tmp_path), new_bank=lambda: model.new_bank(1))
    sid = store.create("k")["id"]
    writer, reader = store.open("k", sid), store.open("k", sid)
    for i in range(12):  # 12 x 32 tokens > the 256-token capacity: the ring wraps, the log compacts
        model.write_memory(text_ids(32, 10 + i), writer)
        writer.flush(documents=1, tokens=32)
    files = sorted(p.name for p in (tmp_path / "k" / sid).iterdir())
    assert sum(f.startswith("base-") for f in files) == 1 and sum(f.startswith("part-") for f in files) < 12
    reader.sync()
    same_search(writer, reader, model)
    fresh = store.open("k", sid)
    same_search(writer, fresh, model)
    assert fresh.info()["documents"] == 12


def test_sessions_are_counted_per_owner_and_deleted(tmp_path, model):
    store = SessionStore(str(tmp_path), new_bank=lambda: model.new_bank(1))
    a = [store.create("a")["id"] for _ in range(2)]
    store.create("b")
    assert store.sessions_of("a") == sorted(a) and len(store.sessions_of("b")) == 1
    assert not store.exists("b", a[0])  # another owner's id is not found
    bank = store.open("a", a[0])
    store.delete("a", a[0])
    with pytest.raises(KeyError):
        bank.sync()
    with pytest.raises(KeyError):
        store.open("a", a[0])
    with pytest.raises(KeyError):
        store.open("a", "../../etc")
