import pytest
import torch

from longmem.memory import MemoryBank, MemoryBankError


def reference_search(chunk_keys, queries, k, group):
    """Brute force: for each (b, t, h) score every chunk of KV head h // group, sort, take k."""
    B, T, Hq, D = queries.shape
    out = torch.empty(B, Hq, T, k, dtype=torch.long)
    scores = torch.empty(B, Hq, T, k)
    for b in range(B):
        for h in range(Hq):
            for t in range(T):
                s = torch.tensor([float(queries[b, t, h] @ ck) for ck in chunk_keys[b][h // group]])
                top = s.argsort(descending=True)[:k]
                out[b, h, t], scores[b, h, t] = top, s[top]
    return out, scores


def random_kv(B, T, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, D, generator=g), torch.randn(B, T, H, D, generator=g)


@pytest.mark.parametrize("c", [4, 1])  # 1: every token is its own chunk (token-level search)
def test_search_equals_brute_force_and_gqa_mapping(c):
    bank = MemoryBank(num_streams=2, num_kv_heads=2, head_dim=8, capacity_tokens=64, chunk_size=c, dtype=torch.float32)
    k, v = random_kv(2, 40)
    bank.add(k, v)
    queries = torch.randn(2, 5, 4, 8, generator=torch.Generator().manual_seed(1))  # 4 query heads, 2 KV heads
    hit = bank.search(queries, k=3)
    # chunk keys by hand: mean of each c-token chunk, per stream and head
    chunk_keys = k.reshape(2, 40 // c, c, 2, 8).mean(2).permute(0, 2, 1, 3)  # (B, Hkv, chunks, D)
    slots, scores = reference_search(chunk_keys, queries, 3, group=2)
    assert torch.equal(hit.slots, slots)
    torch.testing.assert_close(hit.scores, scores, rtol=1e-5, atol=1e-5)
    # returned tokens are the tokens of those chunks, from the right KV head (query head h -> KV head h // 2)
    b, h, t, j = 1, 3, 2, 0
    slot = int(hit.slots[b, h, t, j])
    torch.testing.assert_close(hit.keys[b, h, t, j * c : (j + 1) * c], k[b, slot * c : slot * c + c, h // 2])
    torch.testing.assert_close(hit.values[b, h, t, j * c : (j + 1) * c], v[b, slot * c : slot * c + c, h // 2])
    assert hit.positions[b, h, t, j] == slot * c
    assert hit.token_mask.all()


def test_fifo_keeps_exactly_the_newest_capacity_tokens():
    bank = MemoryBank(1, 1, 4, capacity_tokens=16, chunk_size=4, dtype=torch.float32)
    total = 0
    for step, T in enumerate([6, 7, 9, 3, 11]):  # ragged appends, partial chunks carried over
        keys = torch.arange(total, total + T, dtype=torch.float32)[None, :, None, None].expand(1, T, 1, 4).clone()
        bank.add(keys, keys.clone(), token_ids=torch.arange(total, total + T)[None])
        total += T
    complete = total // 4 * 4  # 36 tokens seen, 36 in whole chunks
    assert bank.num_tokens(0) == 16
    stored = sorted(int(x) for x in bank.token_ids[0].reshape(-1))
    assert stored == list(range(complete - 16, complete))
    # every stored key still matches its token id (no slot was half-overwritten)
    assert torch.equal(bank.keys[0, 0, :, :, 0].reshape(-1), bank.token_ids[0].reshape(-1).float())
    assert sorted(bank.chunk_positions[0].tolist()) == list(range(complete - 16, complete, 4))


def test_more_than_capacity_in_one_add_keeps_newest():
    bank = MemoryBank(1, 1, 2, capacity_tokens=8, chunk_size=4, dtype=torch.float32)
    keys = torch.arange(30, dtype=torch.float32)[None, :, None, None].expand(1, 30, 1, 2).clone()
    bank.add(keys, keys, token_ids=torch.arange(30)[None])
    assert sorted(bank.token_ids[0].reshape(-1).tolist()) == list(range(20, 28))


def test_streams_never_see_each_other():
    bank = MemoryBank(3, 1, 4, capacity_tokens=32, chunk_size=4, dtype=torch.float32)
    big = torch.full((1, 8, 1, 4), 100.0)
    bank.add(big, big, token_ids=torch.full((1, 8), 7), streams=[2])  # only stream 2 has strong keys
    small = torch.full((1, 8, 1, 4), 0.01)
    bank.add(small, small, token_ids=torch.full((1, 8), 5), streams=[0])
    q = torch.ones(2, 1, 1, 4)
    hit = bank.search(q, k=4, streams=[0, 1])
    assert hit.has_memory[0].all() and not hit.has_memory[1].any()  # stream 1 is empty
    assert (hit.values[0][hit.token_mask[0]] == 0.01).all()  # stream 0 never gets stream 2's chunks
    bank.reset([2])
    assert bank.num_tokens(2) == 0 and bank.num_tokens(0) == 8


def test_fewer_chunks_than_k_are_masked():
    bank = MemoryBank(1, 1, 4, capacity_tokens=64, chunk_size=4, dtype=torch.float32)
    k, v = random_kv(1, 9, H=1, D=4)  # 2 whole chunks + 1 pending token
    bank.add(k, v)
    hit = bank.search(torch.randn(1, 3, 2, 4), k=5)
    assert hit.token_mask.sum(-1).eq(8).all()
    assert (hit.positions >= 0).sum(-1).eq(2).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b: b.add(torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8)), "shape"),
        (lambda b: b.add(torch.zeros(1, 4, 2, 8), torch.zeros(1, 5, 2, 8)), "differ"),
        (lambda b: b.add(torch.zeros(1, 4, 2, 8, dtype=torch.long), torch.zeros(1, 4, 2, 8)), "floating"),
        (lambda b: b.add(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), streams=[5]), "stream ids"),
        (lambda b: b.add(torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8), streams=[0, 0]), "distinct"),
        (lambda b: b.search(torch.zeros(1, 4, 3, 8), k=2), "query heads"),
        (lambda b: b.search(torch.zeros(1, 4, 2, 8), k=0), "positive"),
        (lambda b: b.search(torch.zeros(3, 4, 2, 8), k=2), "streams"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    bank = MemoryBank(2, 2, 8, capacity_tokens=64, chunk_size=4, dtype=torch.float32)
    with pytest.raises(MemoryBankError, match=message):
        call(bank)


def test_bad_construction():
    with pytest.raises(MemoryBankError, match="multiple of chunk_size"):
        MemoryBank(1, 1, 8, capacity_tokens=30, chunk_size=4)
    with pytest.raises(MemoryBankError, match="dtype"):
        MemoryBank(1, 1, 8, dtype="int8")


def test_two_level_topk_equals_torch_topk():
    from longmem.memory.bank import exact_topk

    g = torch.Generator().manual_seed(0)
    for shape, k in [((2, 3, 50, 4096), 16), ((1, 1, 7, 1024), 64), ((1, 2, 5, 640), 3), ((1, 1, 2, 100), 16)]:
        scores = torch.randn(*shape, generator=g)
        scores[..., ::7] = float("-inf")  # empty slots
        values, index = exact_topk(scores, k)
        ref_values, _ = scores.topk(k, dim=-1)
        assert torch.equal(values, ref_values)
        assert torch.equal(scores.gather(-1, index), values)
    # a row whose top-k all sit in one block
    scores = torch.zeros(1, 1024)
    scores[0, 64:80] = torch.arange(16.0) + 1
    assert sorted(exact_topk(scores, 16)[1][0].tolist()) == list(range(64, 80))


def test_search_equals_brute_force_at_scale():
    """16k chunks: the two-level top-k path, against a plain matmul + topk reference."""
    H, D = 2, 16
    bank = MemoryBank(1, H, D, capacity_tokens=4 * 16384, chunk_size=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 4 * 16384, H, D, generator=g), torch.randn(1, 4 * 16384, H, D, generator=g)
    bank.add(k, v)
    q = torch.randn(1, 8, 4, D, generator=g)
    hit = bank.search(q, k=16)
    chunk_keys = k.reshape(16384, 4, H, D).mean(1)  # (chunks, H, D)
    for h in range(4):
        scores = q[0, :, h] @ chunk_keys[:, h // 2].T  # (T, chunks)
        ref = scores.topk(16, dim=-1)
        torch.testing.assert_close(hit.scores[0, h], ref.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(hit.slots[0, h].sort(-1).values, ref.indices.sort(-1).values)


def test_skip_first_counts_positions_but_stores_nothing():
    bank = MemoryBank(1, 1, 2, capacity_tokens=64, chunk_size=4, dtype=torch.float32)
    for start in (0, 12):  # two 12-token "windows", each opening with 4 sink tokens
        keys = torch.arange(start, start + 12, dtype=torch.float32)[None, :, None, None].expand(1, 12, 1, 2).clone()
        bank.add(keys, keys, token_ids=torch.arange(start, start + 12)[None], skip_first=4)
    stored = sorted(bank.token_ids[0, : int(bank.count[0])].reshape(-1).tolist())
    assert stored == list(range(4, 12)) + list(range(16, 24))
    assert sorted(bank.chunk_positions[0, :4].tolist()) == [4, 8, 16, 20]
    assert int(bank.tokens_seen[0]) == 24


def test_cosine_metric_ranks_by_angle_not_norm():
    bank = MemoryBank(1, 1, 2, capacity_tokens=8, chunk_size=4, dtype=torch.float32, metric="cosine")
    big_off_axis = torch.tensor([[10.0, 10.0]]).expand(4, 2)  # large norm, 45 degrees off
    small_aligned = torch.tensor([[0.1, 0.0]]).expand(4, 2)  # tiny norm, exactly aligned
    keys = torch.cat([big_off_axis, small_aligned])[None, :, None, :]
    bank.add(keys, keys)
    hit = bank.search(torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2), k=1)
    assert hit.positions.item() == 4 and abs(hit.scores.item() - 1.0) < 1e-6
    ip = MemoryBank(1, 1, 2, capacity_tokens=8, chunk_size=4, dtype=torch.float32)
    ip.add(keys, keys)
    assert ip.search(torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2), k=1).positions.item() == 0
    with pytest.raises(MemoryBankError, match="metric"):
        MemoryBank(1, 1, 2, metric="l2")


@pytest.mark.parametrize("c", [4, 1])
def test_next_values_are_the_values_of_the_following_token(c):
    """with_next pairs every retrieved token with the value of the token after it in its stream,
    across chunk and add() boundaries, and masks it where that token is unknown or evicted."""
    bank = MemoryBank(num_streams=1, num_kv_heads=2, head_dim=8, capacity_tokens=32, chunk_size=c, dtype=torch.float32)
    k, v = random_kv(1, 50)
    tok = torch.arange(1000, 1050)[None]  # token id = 1000 + position
    bank.add(k[:, :18], v[:, :18], token_ids=tok[:, :18], skip_first=2)  # positions 2..17 (c=4: 16, 17 wait)
    bank.add(k[:, 18:50], v[:, 18:50], token_ids=tok[:, 18:50])  # a 32-token ring: positions 18..49 survive
    queries = torch.randn(1, 6, 4, 8, generator=torch.Generator().manual_seed(3))
    hit = bank.search(queries, k=32 // c, with_next=True)
    assert hit.next_values.shape == hit.values.shape
    checked = 0
    for h in range(4):
        for t in range(6):
            for j in range(32 // c):
                start = int(hit.positions[0, h, t, j])
                for i in range(c):
                    p, col = start + i, j * c + i
                    torch.testing.assert_close(hit.values[0, h, t, col], v[0, p, h // 2])
                    known = p + 1 < 50
                    assert bool(hit.next_mask[0, h, t, col]) == known
                    # the token before: known while still stored (position 17 was overwritten)
                    assert int(hit.prev_token_ids[0, h, t, col]) == (1000 + p - 1 if p - 1 >= 18 else -1)
                    assert int(hit.next_token_ids[0, h, t, col]) == (1000 + p + 1 if known else -1)
                    if known:
                        torch.testing.assert_close(hit.next_values[0, h, t, col], v[0, p + 1, h // 2])
                        checked += 1
    assert checked > 0 and not hit.next_mask.all()  # position 49 has no successor yet
    assert (hit.prev_token_ids >= 0).any() and (hit.prev_token_ids == -1).any()
    plain = bank.search(queries, k=32 // c)
    assert plain.next_values is None and torch.equal(plain.values, hit.values)


def test_next_mask_breaks_where_the_ring_overwrote_the_successor():
    bank = MemoryBank(num_streams=1, num_kv_heads=1, head_dim=4, capacity_tokens=8, chunk_size=4, dtype=torch.float32)
    k, v = random_kv(1, 12, H=1, D=4)
    bank.add(k, v)  # chunks 0..2 written; chunk 2 (positions 8..11) overwrote chunk 0 in slot 0
    hit = bank.search(k[:, :1], k=2, with_next=True)
    by_start = {int(p): hit.next_mask[0, 0, 0, j * 4 : j * 4 + 4].tolist() for j, p in enumerate(hit.positions[0, 0, 0])}
    assert by_start == {4: [True] * 4, 8: [True, True, True, False]}


def test_text_shorter_than_the_skipped_sink_is_counted_not_stored():
    bank = MemoryBank(num_streams=1, num_kv_heads=1, head_dim=4, capacity_tokens=16, chunk_size=4, dtype=torch.float32)
    k, v = random_kv(1, 3, H=1, D=4)
    bank.add(k, v, skip_first=4)
    assert bank.num_tokens(0) == 0 and int(bank.tokens_seen[0]) == 3


@pytest.mark.parametrize("c", [1, 4])
def test_storage_grows_as_streams_fill_and_searches_exactly_like_a_preallocated_bank(c):
    """A bank allocates a few slots and doubles them as chunks arrive: an empty session costs little.
    Through growth, a ring that wraps, uneven streams and resets, it retrieves exactly what a bank
    with all its slots allocated up front retrieves (neighbours included)."""
    settings = dict(num_streams=2, num_kv_heads=2, head_dim=8, capacity_tokens=96 * c, chunk_size=c,
                    dtype=torch.float32, metric="cosine")
    growing, full = MemoryBank(**settings, initial_chunks=4), MemoryBank(**settings, initial_chunks=10**9)
    assert growing.allocated_chunks == 4 and full.allocated_chunks == 96
    assert growing.nbytes() * 20 < full.nbytes()
    seen = []
    for step, (T, streams) in enumerate([(5, [0]), (23, [0, 1]), (70, [1]), (150, [0, 1]), (9, [1, 0])]):
        k, v = random_kv(len(streams), T * c, seed=step)  # about T chunks
        ids = torch.randint(0, 50, k.shape[:2], generator=torch.Generator().manual_seed(step))
        for bank in (growing, full):
            bank.add(k, v, token_ids=ids, streams=streams, skip_first=1)
        seen.append(growing.allocated_chunks)
        q = random_kv(2, 6, seed=100 + step)[0].repeat_interleave(2, dim=2)  # 4 query heads
        a, b = growing.search(q, k=8, with_next=True), full.search(q, k=8, with_next=True)
        assert torch.equal(a.token_mask, b.token_mask) and torch.equal(a.scores, b.scores)
        hit = a.token_mask  # (B, Hq, T, K): what was retrieved must be the same; padding is masked
        for name in ("keys", "values", "next_values"):
            assert torch.equal(getattr(a, name)[hit], getattr(b, name)[hit]), (step, name)
        for name in ("token_ids", "next_token_ids", "prev_token_ids", "next_mask"):
            x, y = (getattr(r, name).reshape(hit.shape) for r in (a, b))
            assert torch.equal(x[hit], y[hit]), (step, name)
        assert torch.equal(a.positions, b.positions)
        if step == 2:
            for bank in (growing, full):
                bank.reset([0])
    assert seen == sorted(seen) and seen[-1] == 96  # grown by doubling, never past capacity
