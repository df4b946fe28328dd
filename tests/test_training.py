import pytest
import torch

from conftest import longmem_on, tiny_longmem
from longmem.model import InputError
from longmem.training import (DistractorMemory, EpisodeSampler, TrainConfig, distractor_segments, episode_stream,
                              lr_factor, make_optimizer, parse_curriculum, train_step)


def docs(n=3, length=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (length,), generator=g) for _ in range(n)]


def test_curriculum_parsing_and_errors():
    assert parse_curriculum("plain:1,repeat:3") == {"plain": 0.25, "repeat": 0.75}
    for bad, message in [("plain:1,copy:1", "unknown curriculum kind"), ("plain:x", "not a number"),
                         ("plain:0", "no positive weight"), ("repeat:-1", "negative")]:
        with pytest.raises(InputError, match=message):
            parse_curriculum(bad)


def test_repeat_episodes_copy_a_span_from_two_segments_back():
    sampler = EpisodeSampler(docs(), window=32, segments=4, curriculum="repeat:1", seed=1)
    for _ in range(20):
        ep = sampler.sample()
        last = ep.ids[96:].tolist()
        earlier = ep.ids[:64].tolist()  # segments 0..1: >= 2 segments before the last
        # some run of >= 8 tokens of the last segment appears verbatim in the early segments
        assert any(last[i : i + 8] == earlier[j : j + 8] for i in range(0, 25) for j in range(0, 57))
        assert ep.kind == "repeat" and ep.ids.shape == (128,)


def test_sampler_skips_short_documents_and_refuses_when_none_fit():
    sampler = EpisodeSampler(docs() + [torch.arange(10)], window=32, segments=3, curriculum="plain:1")
    assert sampler.skipped == 1
    with pytest.raises(InputError, match="no training document holds one episode"):
        EpisodeSampler([torch.arange(10)], window=32, segments=3, curriculum="plain:1")
    with pytest.raises(InputError, match="need a tokenizer"):
        EpisodeSampler(docs(), window=32, segments=3, curriculum="passkey:1")


def test_episode_stream_reads_the_corpus_pass_by_pass_and_draws_by_document():
    # Documents of disjoint token ranges (an episode shows whose it is); the last is too short for one.
    corpus = [torch.arange(1000 * i, 1000 * i + 400) for i in range(4)] + [torch.arange(10)]
    cfg = TrainConfig(segments_per_episode=3, curriculum="plain:1,repeat:1", seed=3)
    passes = []

    def one_pass(order=None):
        passes.append(1)
        return ((f"doc{i}", corpus[i].numpy()) for i in (order or range(len(corpus))))

    def take(n, stream):
        return [next(stream) for _ in range(n)]

    # 4 episodes a document a pass (400 // 96); 40 episodes need three passes with a buffer of 8.
    first = take(40, episode_stream(one_pass, 32, cfg, shuffle=8))
    assert len(passes) == 3 and all(e.ids.shape == (96,) for e in first)
    again = take(40, episode_stream(one_pass, 32, cfg, shuffle=8))
    assert all(torch.equal(a.ids, b.ids) and a.kind == b.kind for a, b in zip(first, again))
    # Every episode is text of one document: its seed is the document's, not the read order's.
    assert all(len({int(w) // 1000 for w in e.ids}) == 1 for e in first)
    assert len({int(e.ids[0]) // 1000 for e in first[:8]}) > 1  # the buffer mixes documents
    unbuffered = take(16, episode_stream(lambda: one_pass([3, 2, 1, 0]), 32, cfg, shuffle=0))
    reversed_first = take(4, episode_stream(lambda: one_pass([3]), 32, cfg, shuffle=0))
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(unbuffered[:4], reversed_first))
    with pytest.raises(InputError, match="no training document holds one episode"):
        next(episode_stream(lambda: [("short", torch.arange(10))], 32, cfg))


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_training_lowers_loss_and_keeps_backbone_frozen():
    torch.manual_seed(0)
    model = tiny_longmem("llama", sidenet__init="paper")
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    cfg = TrainConfig(steps=30, segments_per_episode=3, lr=3e-3, memory_lr=3e-2, warmup_steps=2,
                      curriculum="plain:1", batch_size=2, distractor_tokens=0, trained_layers="all")
    sampler = EpisodeSampler(docs(n=2, length=200), window=32, segments=3, curriculum=cfg.curriculum, seed=0)
    optimizer, scheduler = make_optimizer(model.sidenet, cfg)
    losses = [train_step(model, [[sampler.sample() for _ in range(2)]], optimizer, scheduler, cfg)["loss"]
              for _ in range(cfg.steps)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert all(torch.equal(frozen[k], v) for k, v in model.backbone.state_dict().items())
    assert model.sidenet.memory_layer.memory_scale.item() != 0.0  # the memory branch learned


def test_optimizer_gives_memory_parameters_their_own_rate():
    model = tiny_longmem("llama")
    optimizer, _ = make_optimizer(model.sidenet, TrainConfig(lr=1e-4, memory_lr=1e-2))
    memory_group = optimizer.param_groups[-1]
    # temperature, two-token bonus, gate, memory scale, and the copy head's four
    layer, copy = model.sidenet.memory_layer, model.sidenet.memory_copy
    expected = {id(p) for p in (layer.memory_temperature, layer.memory_prev_bonus, layer.gate, layer.memory_scale)}
    expected |= {id(p) for p in copy.parameters()}
    assert memory_group["initial_lr"] == 1e-2 and {id(p) for p in memory_group["params"]} == expected
    assert len(expected) == 8


def test_passkey_answer_tokens_can_weigh_more_in_the_loss(tiny_dir):
    """The answer mask covers exactly the key and its full stop; with answer_weight w the loss is
    the mean over tokens with the answer counted w times."""
    import copy

    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from longmem.model import LongMem

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = longmem_on(str(tiny_dir), memory__window=64, memory__dtype="float32", sidenet__init="paper")
    book = torch.tensor(tok(" ".join(["the quiet house by the sea"] * 80), add_special_tokens=False).input_ids)
    sampler = EpisodeSampler([book], window=64, segments=3, curriculum="passkey:1", seed=0, tokenizer=tok)
    ep = sampler.sample()
    answer_text = tok.decode(ep.ids[ep.answer])
    assert answer_text.strip().rstrip(".").isdigit() and len(answer_text.strip()) == 6, answer_text

    with torch.no_grad():  # per-token NLL of the trained segment, as train_step computes it
        bank = model.new_bank(1)
        model.write_memory(ep.ids[None, :128], bank)
        logits = model(ep.ids[None, 128:], bank=bank, previous_ids=ep.ids[None, 127]).logits
        nll = F.cross_entropy(logits[0, :-1].float(), ep.ids[129:], reduction="none")
    in_answer = ep.answer[129:].float()
    for w in (1.0, 8.0):
        cfg = TrainConfig(steps=1, answer_weight=w, curriculum="passkey:1", lr=0.0, memory_lr=0.0, distractor_tokens=0,
                              frozen_dtype="float32",  # as the reference above
                          trained_layers="all")
        m = copy.deepcopy(model)
        optimizer, scheduler = make_optimizer(m.sidenet, cfg)
        loss = train_step(m, [[ep]], optimizer, scheduler, cfg)["loss"]
        weights = 1 + (w - 1) * in_answer
        assert loss == pytest.approx(((nll * weights).sum() / weights.sum()).item(), rel=1e-4)


def test_distractors_start_each_episode_memory_as_write_memory_would_write_them():
    torch.manual_seed(0)
    model = tiny_longmem("llama", memory__chunk_size=1, memory__retrieve_tokens=8)
    cfg = TrainConfig(steps=2, curriculum="plain:1", distractor_tokens=64, distractor_pool=3, warmup_steps=1)
    books = docs(n=2, length=200)
    segments = distractor_segments(books, 32, cfg)
    assert len(segments) == 6 and all(s.shape == (32,) for s in segments)  # 2 segments x pool 3
    assert all(torch.equal(a, b) for a, b in zip(segments, distractor_segments(books, 32, cfg)))  # by seed
    distractors = DistractorMemory(model, segments, cfg.distractor_tokens)
    sampler = EpisodeSampler(books, window=32, segments=3, curriculum="plain:1", seed=0)
    episodes = [sampler.sample() for _ in range(6)]
    choices = [distractors.choose(e.ids) for e in episodes]
    assert choices[0] == distractors.choose(episodes[0].ids.clone())  # the same episode, the same distractors
    assert len({tuple(c) for c in choices}) > 1 and all(len(c) == 2 == len(set(c)) for c in choices)

    ep = torch.stack([episodes[0].ids, episodes[1].ids])  # (2, 96): both rows get the first row's choice
    filled, written = model.new_bank(2), model.new_bank(2)
    distractors.fill(filled, ep)
    for i in choices[0]:  # each drawn segment is a text of its own
        model.write_memory(segments[i][None].expand(2, -1), written)
    query = ep[:, 64:]
    a, b = model(query, bank=filled), model(query, bank=written)
    assert filled.num_tokens(0) == filled.num_tokens(1) == written.num_tokens(0) == 2 * 32
    assert torch.equal(a.readout.retrieval.positions, b.readout.retrieval.positions)
    torch.testing.assert_close(a.logits, b.logits)

    optimizer, scheduler = make_optimizer(model.sidenet, cfg)
    with pytest.raises(InputError, match="pass train_step the DistractorMemory"):
        train_step(model, [[episodes[0]]], optimizer, scheduler, cfg)
    metrics = train_step(model, [[episodes[0]]], optimizer, scheduler, cfg, distractors=distractors)
    # memory ends holding the 2 distractor segments and the episode's 3, every token (the trained one
    # is written after its read)
    assert metrics["memory_fill"] * model.config.memory.capacity_tokens == 5 * 32
    with pytest.raises(InputError, match="distractor_tokens must be >= 0"):
        TrainConfig(distractor_tokens=-1).validate()


def test_train_step_reports_the_copy_gate_where_memory_was_read():
    torch.manual_seed(0)
    model = tiny_longmem("llama", memory__retrieve_tokens=8, read__copy_init=-3.0, read__copy_match_init=None)
    cfg = TrainConfig(steps=1, curriculum="plain:1", warmup_steps=1, lr=0.0, memory_lr=0.0, distractor_tokens=0)
    episode = EpisodeSampler(docs(n=1, length=200), window=32, segments=3, curriculum="plain:1").sample()
    optimizer, scheduler = make_optimizer(model.sidenet, cfg)
    metrics = train_step(model, [[episode]], optimizer, scheduler, cfg)
    assert metrics["copy_gate"] == pytest.approx(torch.sigmoid(torch.tensor(-3.0)).item(), rel=1e-5)  # u starts at 0
    plain = tiny_longmem("llama", read__copy_init=None, read__copy_match_init=None)
    optimizer, scheduler = make_optimizer(plain.sidenet, cfg)
    assert "copy_gate" not in train_step(plain, [[episode]], optimizer, scheduler, cfg)


def test_copy_head_only_trains_the_copy_head_against_the_model_without_its_value_read():
    torch.manual_seed(0)
    model = tiny_longmem("llama", memory__retrieve_tokens=8, read__scale_init=1.0, read__copy_init=-1.0)
    episode = EpisodeSampler(docs(n=1, length=200), window=32, segments=3, curriculum="plain:1").sample()
    bank = model.new_bank(1)
    model.write_memory(episode.ids[None, :64], bank)
    seg = episode.ids[None, 64:96]
    mixed = []
    model.sidenet.memory_copy.register_forward_hook(lambda m, args, out: mixed.append(args[1]))  # the model's logits
    with torch.no_grad():
        model(seg, bank=bank)
        with model.sidenet.value_read_off():
            out = model(seg, bank=bank)
        off = model(seg).logits  # memory off: the copy head returns log_softmax of the model's logits
    assert out.readout is not None and bool(out.readout.retrieval.has_memory.any())  # memory is still read ...
    torch.testing.assert_close(torch.log_softmax(mixed[1].float(), -1), off.float())  # ... its values kept out
    assert not torch.allclose(mixed[0], mixed[1])  # with the value read on they reach the logits
    assert model.sidenet.memory_layer.value_read  # restored on leaving

    cfg = TrainConfig(steps=2, curriculum="plain:1", warmup_steps=1, lr=1e-2, memory_lr=1e-2, copy_head_only=True,
                      distractor_tokens=0)
    before = {n: p.detach().clone() for n, p in model.sidenet.named_parameters()}
    optimizer, scheduler = make_optimizer(model.sidenet, cfg)
    train_step(model, [[episode]], optimizer, scheduler, cfg)
    for name, p in model.sidenet.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == name.startswith("memory_copy."), name
    with pytest.raises(InputError, match="copy head"):
        make_optimizer(tiny_longmem("llama", read__copy_init=None, read__copy_match_init=None).sidenet, cfg)


def test_facts_episodes_plant_distractors_and_ask_one_beyond_the_window(tiny_dir):
    from transformers import AutoTokenizer

    import re

    from longmem.facts import TRAIN_ADJECTIVES, TRAIN_NOUNS

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    book = torch.tensor(tok(" ".join(["the quiet house by the sea"] * 120), add_special_tokens=False).input_ids)
    sampler = EpisodeSampler([book], window=64, segments=3, curriculum="facts:1", seed=3, tokenizer=tok)
    counts = []
    for _ in range(8):
        ep = sampler.sample()
        assert ep.kind == "facts"
        text, answer = tok.decode(ep.ids), tok.decode(ep.ids[ep.answer]).strip()
        asked = answer.rstrip(".")
        assert text.count(asked) == 2  # planted once before the last segment, answered once at its end
        early = tok.decode(ep.ids[:128])
        assert asked in early and asked not in tok.decode(ep.ids[128 : -ep.answer.sum()])
        # one to five keyed facts: the asked one and distractors of its shape
        keys = re.findall(rf"the ({'|'.join(TRAIN_ADJECTIVES)}) ({'|'.join(TRAIN_NOUNS)})", early)
        assert 1 <= len(set(keys)) <= 5, early
        counts.append(len(set(keys)))
    assert max(counts) >= 3  # distractors of the asked fact's shape


def test_from_memory_trains_the_memory_layer_and_above_and_leaves_the_layers_below_the_backbone():
    from conftest import tiny_backbone

    model = longmem_on(tiny_backbone("llama", layers=8), memory__window=32, memory__capacity_tokens=256,
                       memory__dtype="float32")
    before = {n: p.detach().clone() for n, p in model.sidenet.named_parameters()}
    cfg = TrainConfig(steps=3, warmup_steps=1, curriculum="plain:1", distractor_tokens=0, lr=1e-2, memory_lr=1e-2)
    optimizer, scheduler = make_optimizer(model.sidenet, cfg)
    sampler = EpisodeSampler(docs(), window=32, segments=3, curriculum="plain:1")
    for _ in range(3):
        train_step(model, [[sampler.sample()]], optimizer, scheduler, cfg)
    changed = {n for n, p in model.sidenet.named_parameters() if not torch.equal(p, before[n])}
    assert model.sidenet.memory_side_layer == 3
    assert not any(n.startswith(("layers.0.", "layers.1.", "layers.2.")) for n in changed)  # below memory
    assert {"layers.3.alpha", "layers.3.memory_rerank", "final_norm.weight"} <= changed
    with torch.no_grad():
        assert model.sidenet.identity_layers() == {0, 1, 2}  # a trained model skips them
    with pytest.raises(InputError, match="set trained_layers: all"):
        make_optimizer(tiny_longmem("llama", sidenet__init="paper").sidenet, cfg)
    with pytest.raises(InputError, match="trained_layers must be"):
        TrainConfig(trained_layers="some").validate()


def test_bf16_autocast_trains_on_the_recipe_memory_layout():
    """`bf16: true` (autocast) trains with the recipe's float16 memory and token chunks, distractors
    and the next-token read included, and stays close to the float32 step."""
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = tiny_longmem("llama", memory__dtype="float16", memory__chunk_size=1, memory__retrieve_tokens=8)
        cfg = TrainConfig(steps=2, curriculum="plain:1", distractor_tokens=64, distractor_pool=2, warmup_steps=1,
                          bf16=bf16)
        books = docs(n=2, length=200)
        distractors = DistractorMemory(model, distractor_segments(books, 32, cfg), cfg.distractor_tokens)
        sampler = EpisodeSampler(books, window=32, segments=3, curriculum=cfg.curriculum, seed=0)
        optimizer, scheduler = make_optimizer(model.sidenet, cfg)
        losses[bf16] = train_step(model, [[sampler.sample()]], optimizer, scheduler, cfg, distractors=distractors)["loss"]
    assert torch.isfinite(torch.tensor(losses[True])) and abs(losses[True] - losses[False]) < 0.05 * losses[False]


def test_frozen_passes_in_bfloat16_come_back_in_the_weights_dtype_close_to_float32():
    torch.manual_seed(0)
    model = tiny_longmem("llama")
    ids = torch.randint(3, 128, (1, 32))
    ref = model.backbone_states(ids)
    with model.frozen_precision(torch.bfloat16):
        low = model.backbone_states(ids)
    assert model.adapter.autocast is None  # restored on leaving
    for a, b in zip(ref.hidden[1:] + [ref.memory_keys, ref.memory_values],
                    low.hidden[1:] + [low.memory_keys, low.memory_values]):
        assert b.dtype == torch.float32
        assert not torch.equal(a, b)  # it did run in bfloat16
        assert ((a - b).norm() / a.norm()).item() < 0.03
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's own autocast still reaches the backbone
        outer = model.backbone_states(ids)
    assert not torch.equal(outer.memory_keys.float(), ref.memory_keys)


def test_frozen_dtype_choices_and_a_training_step_in_each():
    assert TrainConfig(frozen_dtype="float32").frozen_precision(torch.device("cpu")) is None
    assert TrainConfig(frozen_dtype="bfloat16").frozen_precision(torch.device("cpu")) == torch.bfloat16
    from longmem.loading import inference_dtype
    auto = TrainConfig().frozen_precision(torch.device("cpu"))
    assert (auto or torch.float32) == {"bfloat16": torch.bfloat16, "float32": torch.float32}[inference_dtype("cpu")]
    with pytest.raises(InputError, match="frozen_dtype must be"):
        TrainConfig(frozen_dtype="int8").validate()
    losses = {}
    for frozen in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = tiny_longmem("llama")
        cfg = TrainConfig(steps=2, curriculum="plain:1", distractor_tokens=64, distractor_pool=2, warmup_steps=1,
                          frozen_dtype=frozen)
        books = docs(n=2, length=200)
        distractors = DistractorMemory(model, distractor_segments(books, 32, cfg), cfg.distractor_tokens,
                                       cfg.frozen_precision(model.device))
        sampler = EpisodeSampler(books, window=32, segments=3, curriculum=cfg.curriculum, seed=0)
        optimizer, scheduler = make_optimizer(model.sidenet, cfg)
        losses[frozen] = train_step(model, [[sampler.sample()]], optimizer, scheduler, cfg, distractors=distractors)["loss"]
        assert model.adapter.autocast is None
    assert losses["float32"] != losses["bfloat16"] and abs(losses["float32"] - losses["bfloat16"]) < 0.02 * losses["float32"]
