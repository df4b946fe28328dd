"""Passage recall: memory finds the passages a prompt's last tokens ask about, and they are read at
the front of the local window (longmem/memory/passages.py, longmem/generation.py)."""

import numpy as np
import pytest
import torch

from longmem.config import ConfigError, PassageConfig
from longmem.generation import read_past
from longmem.memory.passages import find_passages
from tests.conftest import tiny_longmem

COMMON = np.arange(10, 20)  # "function words": everywhere in the haystack


def haystack(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(n) < 0.5, rng.choice(COMMON, n), rng.integers(20, 100, n))


def test_the_block_holding_the_questions_rare_tokens_is_found_and_common_words_find_nothing():
    ids = haystack(4000)
    fact = np.array([11, 120, 121, 12, 13, 122])  # two rare tokens (120, 121) and the value 122
    ids[2500:2506] = fact
    config = PassageConfig(blocks=4, block=32, margin=16)
    question = np.array([14, 121, 15, 120, 11])
    ranges = find_passages(ids, question, config, max_tokens=512)
    assert ranges and any(a <= 2500 and 2506 <= b for a, b in ranges)
    assert all(b - a <= 32 + 2 * 16 for a, b in ranges[:1])
    # a question of common words only: no block stands out from the background
    assert find_passages(ids, np.array([11, 12, 13, 14]), config, max_tokens=512) == []
    # nothing of the question in memory, an empty memory, or recall switched off
    assert find_passages(ids, np.array([125, 126]), config, max_tokens=512) == []
    assert find_passages(np.zeros(0, np.int64), question, config, max_tokens=512) == []
    assert find_passages(ids, question, PassageConfig(blocks=0), max_tokens=512) == []


def test_passages_keep_to_their_token_budget_best_blocks_first():
    ids = haystack(4000, seed=1)
    for at, rare in ((500, 120), (1500, 121), (3000, 122)):
        ids[at : at + 3] = rare
    config = PassageConfig(blocks=4, block=32, margin=16, stand_out=1.0)
    ranges = find_passages(ids, np.array([120, 121, 122]), config, max_tokens=64)
    assert sum(b - a for a, b in ranges) <= 64 and len(ranges) == 1
    everything = find_passages(ids, np.array([120, 121, 122]), config, max_tokens=10_000)
    assert [a < p < b for (a, b), p in zip(everything, (500, 1500, 3000))] == [True, True, True]
    assert everything == sorted(everything)  # in the order memory holds them


def test_a_distractor_of_the_facts_form_stays_out_when_it_falls_short_of_the_best_block():
    ids = haystack(4000, seed=2)
    template = [130, 131, 132]  # the frame every fact shares ("the special magic number for")
    for at, key, value in ((600, 140, 150), (640, 141, 151), (2400, 142, 152)):
        ids[at : at + 5] = template + [key, value]
    question = np.array([11, 130, 131, 132, 141, 12])  # asks for key 141 in the facts' own frame
    loose = find_passages(ids, question, PassageConfig(blocks=4, block=16, margin=0, stand_out=1.0, near_best=0.0), 512)
    tight = find_passages(ids, question, PassageConfig(blocks=4, block=16, margin=0, stand_out=1.0, near_best=0.8), 512)
    holds = lambda ranges, p: any(a <= p < b for a, b in ranges)  # noqa: E731
    assert holds(loose, 644) and holds(loose, 2404)  # the asked fact and a distractor far from it
    assert holds(tight, 644) and not holds(tight, 2404)


def test_passage_settings_are_checked_and_may_change_on_a_checkpoint():
    from longmem.config import RUNTIME_SETTINGS, LongMemConfig

    assert "passages.blocks" in RUNTIME_SETTINGS and "passages.stand_out" in RUNTIME_SETTINGS
    with pytest.raises(ConfigError, match="passages.block must be a positive integer"):
        LongMemConfig().with_overrides({"passages.block": 0})
    with pytest.raises(ConfigError, match="passages.stand_out"):
        LongMemConfig().with_overrides({"passages.stand_out": 0.5})
    with pytest.raises(ConfigError, match="passages.near_best"):
        LongMemConfig().with_overrides({"passages.near_best": 1.5})


def prompt_with_a_fact(model, length: int, fact_at: int):
    """(1, length) token ids: a haystack with a fact of rare tokens at fact_at, asked at the end."""
    ids = torch.as_tensor(haystack(length, seed=3))[None]
    ids[0, fact_at : fact_at + 4] = torch.tensor([120, 121, 122, 123])
    ids[0, -4:] = torch.tensor([11, 121, 120, 12])
    return ids


def test_the_window_reads_the_found_passage_first_and_what_it_pushes_out_goes_to_memory():
    model = tiny_longmem(memory__window=64, passages__blocks=4, passages__block=8, passages__margin=4,
                         passages__query_tokens=8)
    ids = prompt_with_a_fact(model, 200, fact_at=40)
    bank = model.new_bank(1)
    memory, _, local, previous = read_past(model, ids, bank, None)
    start = model.local_start(200)  # 192: the last 8 tokens are the prompt's own window
    # the fact's block (+/- margin), then the prompt's last tokens; here they fit without pushing out
    passage = local[0, : local.shape[1] - (200 - start)]
    assert 1 <= len(passage) <= 64 // 4
    text = ids[0].tolist()
    at = next(i for i in range(200) if text[i : i + len(passage)] == passage.tolist())
    assert at <= 40 and 44 <= at + len(passage)
    assert torch.equal(local[0, -(200 - start):], ids[0, start:])
    assert int(previous[0]) == text[at - 1]
    assert bank.num_tokens(0) == start

    # a window that is full: its oldest tokens give way and go to memory
    ids = prompt_with_a_fact(model, 256, fact_at=40)
    bank = model.new_bank(1)
    _, _, local, _ = read_past(model, ids, bank, None)
    assert local.shape[1] == 64
    n = 64 - (256 - bank.num_tokens(0))
    assert torch.equal(local[0, n:], ids[0, bank.num_tokens(0):]) and bank.num_tokens(0) > 192
    np.testing.assert_array_equal(bank.passage_tokens(0), ids[0, : bank.num_tokens(0)].numpy())


def test_without_a_match_in_memory_generation_is_unchanged():
    model = tiny_longmem(memory__window=64, passages__blocks=4)
    ids = torch.as_tensor(haystack(200, seed=5))[None]  # its last tokens ask for nothing rare
    ids[0, -8:] = torch.tensor([11, 12, 13, 14, 15, 16, 17, 18])
    off = tiny_longmem(memory__window=64, passages__blocks=0)
    off.load_state_dict(model.state_dict())
    a = model.generate(ids, bank=model.new_bank(1), max_new_tokens=8).token_ids
    b = off.generate(ids, bank=off.new_bank(1), max_new_tokens=8).token_ids
    assert a == b


def test_a_question_about_a_session_memory_reads_the_passage_as_the_start_of_its_window():
    """A short question about a fact held only in memory: its first logits are those of the same
    model without passage recall reading the passage and the question as one window."""
    model = tiny_longmem(memory__window=64, passages__blocks=4, passages__block=8, passages__margin=4,
                         passages__query_tokens=8)
    off = tiny_longmem(memory__window=64, passages__blocks=0)
    off.load_state_dict(model.state_dict())
    document = prompt_with_a_fact(model, 160, fact_at=60)[:, :-4]
    question = torch.tensor([[13, 14, 15, 16, 17, 18, 19, 10, 11, 121, 120, 12]])  # common words and two rare ones
    banks = []
    for m in (model, off):
        banks.append(m.new_bank(1))
        m.write_memory(document, banks[-1])
    (a, b), = find_passages(banks[0].passage_tokens(0), question[0].numpy(), model.config.passages, 16)
    assert a <= 60 and 64 <= b
    _, first = model.generate(question, bank=banks[0], max_new_tokens=1, return_logits=True)
    by_hand = off(torch.cat([document[:, a:b], question], dim=1), bank=banks[1], previous_ids=document[:, a - 1])
    torch.testing.assert_close(first[0], by_hand.logits[:, -1], rtol=1e-5, atol=1e-5)
    assert banks[0].num_tokens(0) == banks[1].num_tokens(0)  # nothing of the question left the window


def test_a_built_memory_gives_the_same_passages_as_a_bank_holding_the_same_text(tmp_path):
    """A question over a read-only built memory (two shards) reads what it reads over a bank
    holding the same document: the same passage, the same first logits."""
    from longmem.memory import CombinedMemory
    from longmem.memory.encoder import MemoryEncoder, write_memory_dir
    from longmem.memory.store import MemoryStore

    model = tiny_longmem(memory__window=64, passages__blocks=4, passages__block=8, passages__margin=4,
                         passages__query_tokens=8)
    document = prompt_with_a_fact(model, 160, fact_at=60)[:, :-4]
    write_memory_dir(tmp_path / "m", MemoryEncoder(model), [("doc", document[0].numpy())], shards=2)
    store = MemoryStore.open(tmp_path / "m")
    np.testing.assert_array_equal(store.passage_tokens(), document[0].numpy())
    bank = model.new_bank(1)
    model.write_memory(document, bank)
    question = torch.tensor([[13, 14, 15, 16, 17, 18, 19, 10, 11, 121, 120, 12]])
    _, _, from_bank, _ = read_past(model, question, bank, None)
    memory, _, from_store, _ = read_past(model, question, store, None)
    assert torch.equal(from_store, from_bank) and from_store.shape[1] > question.shape[1]
    assert memory is store  # nothing had to leave the window: the built memory is read as it is
    np.testing.assert_array_equal(CombinedMemory(model.new_bank(1), [store]).passage_tokens(0), document[0].numpy())
    a = model.generate(question, bank=bank, max_new_tokens=1, return_logits=True)[1]
    b = model.generate(question, bank=store, max_new_tokens=1, return_logits=True)[1]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
