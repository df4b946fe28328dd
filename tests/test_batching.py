"""Continuous batching: rows of different lengths, memories and settings decoded together give
what each gives decoded alone."""

import pytest
import torch

from conftest import tiny_longmem
from longmem.batching import BatchDecoder, Sampling
from longmem.memory import CombinedMemory

def prompt(T, seed):
    return torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(seed))


def model_with_memory_read(family="llama"):
    """A tiny model whose side layers and memory read change its output (not the zero init)."""
    return tiny_longmem(family, memory__retrieve_tokens=16, sidenet__init="paper")


def run_all(decoder):
    while decoder.busy:
        decoder.step()


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_batched_rows_equal_each_row_alone(family):
    """Rows of 5 to 70 tokens (the longer ones read their past through memory), each with its own
    bank, some sharing a built memory, joining at different steps and running past the window
    (their windows slide at different steps): the same greedy tokens as one at a time."""
    model = model_with_memory_read(family)
    shared = model.new_bank(1)
    model.write_memory(prompt(60, 99), shared)
    shared.read_only = True  # read like a built memory: shared by rows, never written
    lengths, new = [5, 31, 12, 70, 40, 9], [40, 12, 33, 25, 8, 45]

    def memory_of(i):
        bank = model.new_bank(1)
        return CombinedMemory(bank, [shared]) if i % 2 else bank

    alone = []
    for i, (T, n) in enumerate(zip(lengths, new)):
        out = model.generate(prompt(T, i), memory_of(i), max_new_tokens=n)
        alone.append(out.token_ids[0])

    decoder = BatchDecoder(model, max_rows=4)  # two rows wait for a free row
    rows = [decoder.submit(prompt(T, i), memory_of(i), Sampling(max_new_tokens=n))
            for i, (T, n) in enumerate(zip(lengths[:3], new[:3]))]
    for _ in range(5):
        decoder.step()
    rows += [decoder.submit(prompt(T, i + 3), memory_of(i + 3), Sampling(max_new_tokens=n))
             for i, (T, n) in enumerate(zip(lengths[3:], new[3:]))]
    run_all(decoder)
    assert decoder.max_batch == 4
    assert [r.result.token_ids for r in rows] == alone
    assert all(r.result.finish_reason == "length" for r in rows)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_rows_that_join_together_read_their_prompts_in_one_forward(family):
    """Six prompts of 3 to 70 tokens submitted at once (the longer ones write their past to memory
    first, so their local contexts start after a predecessor; one row has no memory): their local
    contexts are read in one left-padded forward, and every row decodes what it decodes alone."""
    model = model_with_memory_read(family)
    lengths = [5, 31, 3, 70, 40, 33]
    memories = [model.new_bank(1) if i != 2 else None for i in range(len(lengths))]
    alone = [model.generate(prompt(T, 10 + i), model.new_bank(1) if i != 2 else None, max_new_tokens=12).token_ids[0]
             for i, T in enumerate(lengths)]
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape))
    decoder = BatchDecoder(model, max_rows=8)
    rows = [decoder.submit(prompt(T, 10 + i), memories[i], Sampling(max_new_tokens=12)) for i, T in enumerate(lengths)]
    decoder.step()
    hook.remove()
    assert len(forwards) == 2 and forwards[0][0] == 6 and tuple(forwards[1]) == (6, 1)  # one read, one step
    run_all(decoder)
    assert [r.result.token_ids for r in rows] == alone


def test_rows_keep_their_own_sampling_stops_and_cancellation():
    model = model_with_memory_read()
    greedy = model.generate(prompt(10, 1), max_new_tokens=20).token_ids[0]
    sampled = model.generate(prompt(10, 1), max_new_tokens=20, temperature=1.0, seed=7).token_ids[0]
    decoder = BatchDecoder(model)
    seen = []
    a = decoder.submit(prompt(10, 1), None, Sampling(max_new_tokens=20), on_token=seen.append)
    b = decoder.submit(prompt(10, 1), None, Sampling(max_new_tokens=20, temperature=1.0, seed=7))
    stop_after = {"n": 0}

    def should_stop():
        stop_after["n"] += 1
        return stop_after["n"] > 5

    c = decoder.submit(prompt(15, 2), model.new_bank(1), Sampling(max_new_tokens=20), should_stop=should_stop)
    run_all(decoder)
    assert a.result.token_ids == greedy and seen == greedy
    assert b.result.token_ids == sampled
    assert c.result.finish_reason == "cancelled" and 0 < len(c.result.token_ids) < 20


def test_a_row_that_fails_ends_alone_with_its_error():
    model = model_with_memory_read()

    broken = model.new_bank(1)
    model.write_memory(prompt(40, 5), broken)  # an empty bank is never searched

    def unreachable(*args, **kwargs):
        raise RuntimeError("shard unreachable")

    broken.search = unreachable
    decoder = BatchDecoder(model)
    good = decoder.submit(prompt(8, 3), None, Sampling(max_new_tokens=6))
    bad = decoder.submit(prompt(8, 4), broken, Sampling(max_new_tokens=6))
    run_all(decoder)
    assert bad.result.finish_reason == "error" and "shard unreachable" in str(bad.result.error)
    assert good.result.token_ids == model.generate(prompt(8, 3), max_new_tokens=6).token_ids[0]


def test_a_search_started_during_the_frozen_pass_reads_what_a_search_after_it_reads():
    """With backbone-key search a memory that can `submit` is searched while the layers above the
    memory layer run; the output is the one of searching after the pass."""
    model = model_with_memory_read()
    bank = model.new_bank(1)
    model.write_memory(prompt(90, 5), bank)
    shared = model.new_bank(1)
    model.write_memory(prompt(60, 6), shared)
    shared.read_only = True

    class SearchOnly:  # the same memory without submit: searched after the pass
        def __init__(self, memory):
            self.memory = memory
            for name in ("num_kv_heads", "head_dim", "chunk_size", "read_only", "device"):
                setattr(self, name, getattr(memory, name))

        def search(self, *args, **kwargs):
            return self.memory.search(*args, **kwargs)

        def add(self, *args, **kwargs):
            return self.memory.add(*args, **kwargs)

        def reset(self, streams=None):
            return self.memory.reset(streams)

        def check_model(self, spec):
            return self.memory.check_model(spec)

    combined = CombinedMemory(bank, [shared])
    started, submit = [], combined.submit
    combined.submit = lambda *a, **kw: started.append(1) or submit(*a, **kw)
    x = prompt(20, 7)
    early, late = model(x, bank=combined), model(x, bank=SearchOnly(combined))
    assert started == [1]  # the search was started from inside the frozen pass
    torch.testing.assert_close(early.logits, late.logits)
    assert bool(early.readout.retrieval.has_memory.any())
