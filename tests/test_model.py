import pytest
import torch

from conftest import longmem_on, tiny_backbone, tiny_longmem
from longmem.backbone import BackboneError
from longmem.config import ConfigError, LongMemConfig
from longmem.model import InputError, LongMem

FAMILIES = ["llama", "gemma3", "gpt2"]
ALL_FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "gpt2"]


def plain_logits(model, x):
    """The HF backbone's own logits for the context x (after its start token, where it has one)."""
    return model.backbone(model.adapter.with_start(x)).logits[:, model.adapter.cache_lead :]


def ids(B=2, T=32, seed=0, vocab=128):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(family, dtype):
    model = tiny_longmem(family, dtype=dtype, sidenet__init="paper")
    bank = model.new_bank(2)
    x = ids()
    out = model(x, bank=bank, labels=x, update_memory=True)
    assert out.logits.shape == (2, 32, 128) and out.logits.dtype == dtype
    assert out.memory_keys.shape == (2, 32, model.adapter.num_kv_heads, model.adapter.head_dim)
    assert torch.isfinite(out.loss)
    out = model(ids(seed=1), bank=bank)
    assert out.readout.weights.shape == (2, 4, 32, model.config.memory.retrieve_tokens)
    assert out.readout.gate.shape == (2, 4, 32)
    assert torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_zero_init_reproduces_backbone_logits(family):
    """The defaults start equal to the backbone (the copy head's output is log-probabilities)."""
    model = tiny_longmem(family)
    x = ids()
    reference = plain_logits(model, x).log_softmax(-1)
    assert (model(x).logits - reference).abs().max() <= 1e-5
    # The value read starts on a zero scale: memory full of other text changes nothing at step 0
    # but through the copy head, which mixes in what memory says comes next.
    plain = tiny_longmem(family, read__copy_init=None, read__copy_match_init=None)
    bank = plain.new_bank(2)
    list(plain.stream(ids(T=96, seed=3), bank))
    assert (plain(x, bank=bank).logits - plain_logits(plain, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_paper_init_side_layer_equals_backbone_layer(family):
    """The SideNet's own layer code, fed the same input, must compute what the HF decoder layer computes."""
    model = tiny_longmem(family, sidenet__init="paper")
    model.adapter.config.bos_token_id = None  # Gemma: the layers' math alone, without the start token in front
    x = ids()
    states = model.adapter.run(x, list(range(model.adapter.num_layers + 1)), model.memory_layer)
    for side in model.sidenet.layers:  # Gemma 3: global and sliding-window layers, each with its rotary
        j = side.backbone_layer
        h_in, h_out = states.hidden[j], states.hidden[j + 1]
        update, _, _ = side(model.adapter, h_in, torch.arange(32)[None])
        torch.testing.assert_close(h_in + update, h_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_memory_equals_memory_off(family):
    model = tiny_longmem(family, sidenet__init="paper")
    x = ids()
    assert torch.equal(model(x).logits, model(x, bank=model.new_bank(2)).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_changes_output_and_streams_are_isolated(family):
    model = tiny_longmem(family, sidenet__init="paper")
    bank = model.new_bank(2)
    model(ids(B=1, seed=5), bank=bank, streams=[1], update_memory=True)  # only stream 1 remembers
    x = ids(B=1, seed=6)
    no_mem = model(x).logits
    assert torch.equal(model(x, bank=bank, streams=[0]).logits, no_mem)
    assert not torch.allclose(model(x, bank=bank, streams=[1]).logits, no_mem)


def test_segment_reads_memory_before_writing_itself():
    model = tiny_longmem("llama", sidenet__init="paper", memory__sink_tokens=0)
    bank = model.new_bank(1)
    x = ids(B=1)
    out = model(x, bank=bank, update_memory=True)
    assert out.readout.retrieval.token_mask.sum() == 0  # nothing to read yet, not even itself
    assert bank.num_tokens(0) == 32
    out = model(ids(B=1, seed=9), bank=bank, update_memory=True)
    assert out.readout.retrieval.positions.max() < 32  # reads only the first segment
    assert bank.num_tokens(0) == 64


def test_local_attention_is_causal_with_memory():
    model = tiny_longmem("llama", sidenet__init="paper")
    bank = model.new_bank(1)
    model(ids(B=1, seed=2), bank=bank, update_memory=True)
    a, b = ids(B=1, seed=3), ids(B=1, seed=3)
    b[0, 20:] = (b[0, 20:] + 1) % 128
    la, lb = model(a, bank=bank).logits, model(b, bank=bank).logits
    assert torch.equal(la[:, :20], lb[:, :20]) and not torch.equal(la[:, 20:], lb[:, 20:])


def written_and_captured(model, key_module: str):
    """Write a batch (2, 32) to a fresh bank while capturing the memory layer's `key_module` and
    v_proj outputs: the bank's keys and values as (B, T, Hkv, D), what the modules gave, the ids."""
    layer = model.adapter.layers[model.memory_layer].self_attn
    seen = {}
    hooks = [getattr(layer, key_module).register_forward_hook(lambda m, i, o: seen.__setitem__("k", o)),
             layer.v_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o))]
    bank, x = model.new_bank(2), ids()
    model(x, bank=bank, update_memory=True)
    for h in hooks:
        h.remove()
    kv, hd = model.adapter.num_kv_heads, model.adapter.head_dim
    # bank layout: (streams, Hkv, chunks, csz, D) -> back to (B, T, Hkv, D)
    n = 32 // model.config.memory.chunk_size
    stored_k, stored_v = (t[:, :, :n].permute(0, 2, 3, 1, 4).reshape(2, 32, kv, hd) for t in (bank.keys, bank.values))
    assert torch.equal(bank.token_ids[:2, :n].reshape(2, 32), x)
    return stored_k, stored_v, seen


def test_memory_keys_are_pre_rotary_k_proj_outputs():
    model = tiny_longmem("llama", sidenet__init="paper", memory__sink_tokens=0)
    stored_k, stored_v, seen = written_and_captured(model, "k_proj")
    torch.testing.assert_close(stored_k, seen["k"].reshape(stored_k.shape))
    torch.testing.assert_close(stored_v, seen["v"].reshape(stored_v.shape))


def test_gemma3_memory_is_read_in_a_global_layer_with_keys_after_the_k_norm():
    """On Gemma 3 the memory layer is a global-attention one (the default moves to the nearest),
    and memory keys are the k norm's outputs before rotary: what the paper's pre-rotary keys are
    where a norm sits between the projection and the rotary."""
    model = tiny_longmem("gemma3", sidenet__init="paper", memory__sink_tokens=0)
    assert model.config.backbone.global_layers == [1, 4] and model.memory_layer == 1
    assert (model.adapter.num_kv_heads, model.adapter.head_dim) == (1, 32)
    stored_k, stored_v, seen = written_and_captured(model, "k_norm")
    # HF norms k head-major (B, H, 1 + T, D); the backbone read the start token (<bos>) first
    assert model.adapter.start_token == 1 and seen["k"].shape[2] == 33
    torch.testing.assert_close(stored_k, seen["k"].transpose(1, 2)[:, 1:])
    torch.testing.assert_close(stored_v, seen["v"][:, 1:].reshape(stored_v.shape))
    with pytest.raises(ConfigError, match="sliding window"):
        tiny_longmem("gemma3", sidenet__memory_layer=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cached_generation_equals_uncached(family):
    model = tiny_longmem(family, sidenet__init="paper")
    prompt = ids(B=2, T=50, seed=4)  # longer than the 32-token window: the prefix goes through memory
    outputs = []
    for use_cache in (True, False):
        bank = model.new_bank(2)
        outputs.append(model.generate(prompt, bank=bank, max_new_tokens=40, use_cache=use_cache, return_logits=True))
    (cached, cached_logits), (plain, plain_logits) = outputs
    assert cached.token_ids == plain.token_ids  # 50 + 40 tokens: the window shifts into memory twice
    torch.testing.assert_close(cached_logits, plain_logits, rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_top_p_restricts():
    model = tiny_longmem("llama", sidenet__init="paper")
    prompt = ids(B=1, T=8)
    a = model.generate(prompt, max_new_tokens=10, temperature=1.0, seed=3).token_ids
    b = model.generate(prompt, max_new_tokens=10, temperature=1.0, seed=3).token_ids
    greedy = model.generate(prompt, max_new_tokens=10).token_ids
    tiny_p = model.generate(prompt, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=4).token_ids
    assert a == b and tiny_p == greedy


def test_optimizer_step_changes_sidenet_not_backbone():
    model = tiny_longmem("llama", sidenet__init="zero")
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    side_before = {k: v.clone() for k, v in model.sidenet.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    bank = model.new_bank(2)
    model.train()
    for seed in range(3):
        x = ids(seed=seed)
        loss = model(x, bank=bank, labels=x, update_memory=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(frozen[k], v) for k, v in model.backbone.state_dict().items())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training
    changed = [k for k, v in model.sidenet.state_dict().items() if not torch.equal(side_before[k], v)]
    assert any("alpha" in k for k in changed) and any("block" in k for k in changed)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(tmp_path, family):
    model = tiny_longmem(family, sidenet__init="paper", read__gate_init=0.3)
    with torch.no_grad():
        for p in model.sidenet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "sidenet.safetensors"]
    backbone_bytes = sum(p.numel() * 4 for p in model.backbone.parameters())
    assert (tmp_path / "sidenet.safetensors").stat().st_size < backbone_bytes  # backbone not saved
    loaded = LongMem.from_pretrained(tmp_path, backbone=tiny_backbone(family, seed=0))
    x = ids()
    bank_a, bank_b = model.new_bank(2), loaded.new_bank(2)
    for seg in (ids(seed=1), x):
        a = model(seg, bank=bank_a, update_memory=True).logits
        b = loaded(seg, bank=bank_b, update_memory=True).logits
        assert torch.equal(a, b)


def test_loading_on_a_different_backbone_is_refused(tmp_path):
    tiny_longmem("llama").save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="fingerprint"):
        LongMem.from_pretrained(tmp_path, backbone=tiny_backbone("llama", seed=1))
    with pytest.raises(ConfigError, match="not a LongMem checkpoint"):
        LongMem.from_pretrained(tmp_path / "nowhere", backbone=tiny_backbone("llama"))


def test_backbone_loads_from_a_local_folder(tmp_path):
    from longmem.backbone import load_backbone

    tiny_backbone("gpt2", seed=2).save_pretrained(tmp_path)
    model = longmem_on(str(tmp_path), memory__window=32, memory__capacity_tokens=256)
    assert model.config.backbone.model_type == "gpt2" and model.tokenizer is None
    assert not any(p.requires_grad for p in model.backbone.parameters())
    with pytest.raises(BackboneError, match="cannot load backbone"):
        load_backbone(str(tmp_path / "missing"))


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ConfigError, match="memory_layer 9 is out of range"):
        tiny_longmem(sidenet__memory_layer=9)
    with pytest.raises(ConfigError, match="not copied into the SideNet"):
        tiny_longmem(sidenet__memory_layer=2)
    with pytest.raises(ConfigError, match="memory.window 30 must be a multiple of memory.chunk_size 4"):
        tiny_longmem(memory__window=30, memory__chunk_size=4)
    with pytest.raises(ConfigError, match="sidenet.init"):
        tiny_longmem(sidenet__init="random")
    with pytest.raises(ConfigError, match="reduction_factor 3 must divide"):
        tiny_longmem(sidenet__reduction_factor=3)
    with pytest.raises(ConfigError, match="unknown LongMemConfig fields"):
        LongMemConfig.from_dict({"window": 8, "colour": "red"})


def test_unsupported_model_type_is_refused():
    from transformers import BertConfig, BertLMHeadModel

    bert = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, is_decoder=True))
    with pytest.raises(BackboneError, match="unsupported backbone model_type 'bert'.*llama.*gpt2"):
        LongMem(bert, LongMemConfig())


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda: torch.zeros(1, 0, dtype=torch.long), "empty"),
        (lambda: torch.zeros(1, 8), "integer tensor"),
        (lambda: torch.zeros(8, dtype=torch.long), r"shape \(B, T\)"),
        (lambda: torch.full((1, 8), 500), "token ids must lie"),
        (lambda: torch.zeros(1, 33, dtype=torch.long), "exceeds the local window"),
        (lambda: torch.zeros(1, 8, dtype=torch.long, device="meta"), "model is on cpu"),
    ],
)
def test_bad_input_is_a_clear_error(make_input, message):
    model = tiny_longmem()
    with pytest.raises(InputError, match=message):
        model(make_input())


def test_bank_mismatches_are_clear_errors():
    from longmem.memory import MemoryBank

    model = tiny_longmem()
    with pytest.raises(InputError, match="num_kv_heads: 3 vs 2"):
        model(ids(), bank=MemoryBank(2, 3, 16, capacity_tokens=64))
    with pytest.raises(InputError, match="memory bank is on meta"):
        model(ids(), bank=MemoryBank(2, 2, 16, capacity_tokens=64, chunk_size=1, metric="cosine", device="meta"))
    with pytest.raises(InputError, match="needs a writable memory bank"):
        model(ids(), update_memory=True)
    with pytest.raises(InputError, match="max_new_tokens"):
        model.generate(ids(), max_new_tokens=0)
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        model.generate(ids(), stop=["\n"])


def test_separate_memory_scale_gets_gradient_under_zero_init():
    """sidenet.init='zero' alone starves memory (its read sits inside a block scaled by alpha=0);
    a memory scale outside alpha starts the model equal to the backbone yet learns from step 0."""
    x, past = ids(B=1), ids(B=1, seed=11)
    for scale_init, expect_grad in ((None, False), (0.0, True)):
        model = tiny_longmem("llama", read__scale_init=scale_init, read__copy_init=None, read__copy_match_init=None)
        bank = model.new_bank(1)
        model(past, bank=bank, update_memory=True)
        out = model(x, bank=bank, labels=x)
        assert (out.logits - plain_logits(model, x)).abs().max() <= 1e-5  # still the backbone at step 0
        out.loss.backward()
        layer = model.sidenet.memory_layer
        gate_grad = layer.gate.grad
        assert gate_grad is None or not gate_grad.any()  # gates get nothing while every scale is 0
        if expect_grad:
            assert layer.memory_scale.grad.abs() > 0
        else:
            assert layer.memory_scale is None


def test_write_memory_equals_streaming_through_the_model():
    model = tiny_longmem("gpt2", sidenet__init="paper")
    doc = ids(B=2, T=80, seed=12)
    a, b = model.new_bank(2), model.new_bank(2)
    list(model.stream(doc, a))
    model.write_memory(doc, b)
    for name in ("keys", "values", "chunk_keys", "token_ids", "chunk_positions"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_memory_keeps_every_token_with_its_windows_first_tokens_encoded_after_their_context():
    """A document's memory holds all its tokens at consecutive positions (the next-token read
    follows across windows). A window's first sink tokens, attention sinks in its own pass, are
    stored with their keys read after the tokens before them (the prefix token at the start);
    the other tokens with their keys from the window's own pass."""
    model = tiny_longmem("llama", sidenet__init="paper", memory__sink_tokens=4, memory__chunk_size=4)
    doc = ids(B=1, T=64, seed=13)
    bank = model.new_bank(1)
    model.write_memory(doc, bank)
    assert bank.num_tokens(0) == 64 and sorted(bank.chunk_positions[0, :16].tolist()) == list(range(0, 64, 4))
    keys = bank.keys[0, :, :16].permute(1, 2, 0, 3).reshape(64, 2, 16)  # (T, Hkv, D) in stream order
    own = torch.cat([model.backbone_states(doc[:, s : s + 32]).memory_keys[0] for s in (0, 32)])
    prefix = torch.full((1, 4), model.sink_prefix_id)
    torch.testing.assert_close(keys[4:32], own[4:32])
    torch.testing.assert_close(keys[36:], own[36:])
    torch.testing.assert_close(keys[:4], model.backbone_states(torch.cat([prefix, doc[:, :4]], 1)).memory_keys[0, 4:])
    torch.testing.assert_close(keys[32:36], model.backbone_states(doc[:, 28:36]).memory_keys[0, 4:])
    short = model.new_bank(1)
    model.write_memory(ids(B=1, T=3, seed=1), short)  # shorter than a chunk: counted, waiting for its chunk
    model.write_memory(ids(B=1, T=5, seed=2), short)
    assert short.num_tokens(0) == 8
    runs = [model.generate(ids(B=1, T=50, seed=4), bank=model.new_bank(1), max_new_tokens=30, use_cache=c).token_ids
            for c in (True, False)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_next_token_read_keeps_equivalences_and_reads_the_following_value(family):
    """The value read alone (no copy head): exactly the backbone at step 0, with or without memory."""
    model = tiny_longmem(family, read__copy_init=None, read__copy_match_init=None)
    ids = torch.randint(0, 100, (1, 16))
    backbone = model.backbone_logits(ids)
    bank = model.new_bank(1)
    assert torch.equal(model(ids, bank=model.new_bank(1)).logits, model(ids).logits)  # empty memory == off
    model.write_memory(torch.randint(0, 100, (1, 64)), bank)
    out = model(ids, bank=bank)
    assert torch.equal(out.logits, backbone)  # zero init: exactly the backbone even with memory
    w = out.readout.weights
    assert torch.allclose(w.sum(-1)[out.readout.gate > 0], torch.ones(()))
    # with a live memory branch the read reaches the logits, and its temperature gets gradient
    with torch.no_grad():
        model.sidenet.memory_layer.memory_scale.fill_(1.0)
    out = model(ids, bank=bank, labels=ids)
    assert not torch.equal(out.logits, backbone)
    out.loss.backward()
    assert model.sidenet.memory_layer.memory_temperature.grad.abs().sum() > 0


NEXT_READ = dict(sidenet__init="paper")  # the defaults, with plain layer copies so that every layer acts at step 0


def test_previous_token_bonus_picks_the_occurrence_whose_predecessor_matches():
    """Two stored occurrences of token x; the query's x follows c, as the second stored x does:
    with the bonus the read goes to the successor of that x, without it to both."""
    model = tiny_longmem("llama", memory__chunk_size=1, memory__retrieve_tokens=64, read__prev_bonus_init=30.0, **NEXT_READ)
    a, b, c, d, x = 101, 102, 103, 104, 105
    memory = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(5))
    memory[0, 10:13] = torch.tensor([a, x, b])
    memory[0, 40:43] = torch.tensor([c, x, d])
    query = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(6))
    query[0, -2:] = torch.tensor([c, x])
    bank = model.new_bank(1)
    model.write_memory(memory, bank)

    def successor_mass(out):
        r, w = out.readout.retrieval, out.readout.weights[0, :, -1]  # (Hq, K) at the final x
        positions = r.positions[0, :, -1].repeat_interleave(w.shape[0] // r.num_heads, 0)  # each KV head's search, per query head
        succ = memory[0, (positions + 1).clamp(max=63)]  # chunk_size 1: one token per chunk
        return float((w * (succ == d)).sum(-1).min()), float((w * (succ == b)).sum(-1).max())

    on_d, on_b = successor_mass(model(query, bank=bank))
    assert on_d > 0.99 and on_b < 0.01
    with torch.no_grad():
        model.sidenet.memory_layer.memory_prev_bonus.zero_()
    on_d, on_b = successor_mass(model(query, bank=bank))
    assert on_b > 0.01  # one token's key alone does not tell the two apart so sharply


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cached_generation_equals_uncached_with_the_previous_token_bonus_and_copy(family):
    """The token before each query reaches the read the same way through the KV cache, the
    prefill and the window shifts; so does the copy distribution."""
    model = tiny_longmem(family, memory__chunk_size=1, memory__retrieve_tokens=16, read__prev_bonus_init=3.0, read__copy_init=0.0,
                         **NEXT_READ)
    with torch.no_grad():
        model.sidenet.memory_layer.memory_scale.fill_(1.0)
    prompt = ids(B=2, T=50, seed=4)
    outputs = [model.generate(prompt, bank=model.new_bank(2), max_new_tokens=40, use_cache=use_cache,
                              return_logits=True) for use_cache in (True, False)]
    (cached, cached_logits), (plain, plain_logits) = outputs
    assert cached.token_ids == plain.token_ids
    torch.testing.assert_close(cached_logits, plain_logits, rtol=1e-4, atol=1e-4)


def test_a_checkpoint_takes_runtime_settings_and_refuses_weight_settings(tmp_path):
    """One rule for every caller: settings no weight depends on may change on a checkpoint."""
    model = tiny_longmem("llama", **NEXT_READ)
    model.save_pretrained(tmp_path)
    loaded = LongMem.from_pretrained(tmp_path, backbone=tiny_backbone("llama", seed=0),
                                     overrides={"memory.chunk_size": 4, "memory": {"window": 64}})
    assert loaded.config.memory.chunk_size == 4 and loaded.config.memory.window == 64
    assert torch.equal(loaded.sidenet.memory_layer.memory_temperature, model.sidenet.memory_layer.memory_temperature)
    for setting in ({"read.prev_bonus_init": 2.0}, {"read.mode": "attend"}, {"sidenet.init": "zero"}):
        with pytest.raises(ConfigError, match=f"{next(iter(setting))} comes from the checkpoint's weights"):
            LongMem.from_pretrained(tmp_path, backbone=tiny_backbone("llama", seed=0), overrides=setting)
    with pytest.raises(ConfigError, match="unknown setting 'window'; did you mean 'memory.window'"):
        LongMem.from_pretrained(tmp_path, backbone=tiny_backbone("llama", seed=0), overrides={"window": 64})


def test_key_center_is_the_mean_key_and_leaves_the_attend_read_unchanged(tmp_path):
    """Centring shifts every memory key by one vector per KV head: ip search ranks and the paper's
    softmax over memory do not change; the keys stored become zero-mean on the calibration text.
    The centre is a weight: saved with the SideNet, and a memory's spec names it."""
    model = tiny_longmem("llama", preset="paper", memory__center_keys=True)  # side query, ip, attend read
    memory, query = ids(B=1, T=96, seed=7), ids(B=1, T=20, seed=8)
    raw_bank = model.new_bank(1)
    model.write_memory(memory, raw_bank)
    before = model(query, bank=raw_bank)
    raw_keys = model.backbone_states(memory[:, 32:64]).memory_keys
    digest = model.key_center_digest()
    center = model.calibrate_key_center(memory)
    assert center.shape == (2, 16) and model.key_center_digest() != digest
    assert torch.allclose(model.backbone_states(memory[:, 32:64]).memory_keys, raw_keys - center, atol=1e-6)
    bank = model.new_bank(1)
    model.write_memory(memory, bank)
    c = model.config.memory.chunk_size
    stored = bank.keys[0, :, : 96 // c].permute(1, 2, 0, 3).reshape(96, 2, 16)  # (T, Hkv, D)
    assert stored.mean(dim=0).abs().max() < 1e-5
    bank = model.new_bank(1)
    model.write_memory(memory, bank)
    after = model(query, bank=bank)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(after.readout.retrieval.positions, before.readout.retrieval.positions)
    model.save_pretrained(tmp_path)
    assert "key_center" not in (tmp_path / "config.json").read_text()
    loaded = LongMem.from_pretrained(tmp_path, backbone=tiny_backbone("llama", seed=0))
    assert torch.equal(loaded.backbone_states(query).memory_keys, model.backbone_states(query).memory_keys)
    assert loaded.memory_spec == model.memory_spec
    with pytest.raises(InputError, match="raw keys"):
        tiny_longmem("llama", preset="paper").calibrate_key_center(memory)


def test_memory_copy_mixes_a_normalised_copy_of_the_next_tokens_and_learns():
    model = tiny_longmem("llama", memory__chunk_size=1, memory__retrieve_tokens=16, read__copy_init=0.0, **NEXT_READ)
    query = ids(B=1, T=12, seed=3)
    off = model(query).logits
    torch.testing.assert_close(off.exp().sum(-1), torch.ones(1, 12))  # log-probabilities
    assert torch.equal(model(query, bank=model.new_bank(1)).logits, off)  # empty memory == memory off
    memory = ids(B=1, T=64, seed=9)
    bank = model.new_bank(1)
    model.write_memory(memory, bank)
    repeat = memory[:, 20:40]
    with torch.no_grad():
        model.sidenet.memory_copy.gate.bias.fill_(30.0)  # g = 1: the output is the copy distribution
    out = model(repeat, bank=bank, labels=repeat)
    probs = out.logits.exp()[0]  # (T, V)
    torch.testing.assert_close(probs.sum(-1), torch.ones(20))
    # reference: per position, each head that read something spreads its read weights over the
    # ids that followed what it retrieved; heads count equally (head_logits start at 0)
    w, nxt = out.readout.weights[0], out.readout.retrieval.next_token_ids[0]  # (Hq, T, K), (Hkv, T, K)
    nxt = nxt.repeat_interleave(w.shape[0] // nxt.shape[0], 0)  # each KV head's search serves its query heads
    for t in range(20):
        expected = torch.zeros(probs.shape[-1])
        heads = [h for h in range(w.shape[0]) if float(w[h, t][nxt[h, t] >= 0].sum()) > 0]
        for h in heads:
            for k in range(w.shape[-1]):
                if nxt[h, t, k] >= 0:
                    expected[nxt[h, t, k]] += float(w[h, t, k]) / len(heads)
        torch.testing.assert_close(probs[t], expected, atol=1e-5, rtol=1e-4)
    assert (probs.max(-1).values > 0.3).any()
    out.loss.backward()
    copy = model.sidenet.memory_copy
    assert copy.gate.weight.grad.abs().sum() > 0 and copy.head_logits.grad.abs().sum() > 0


def copy_head_over_memory():
    """A tiny model with a copy head (gate bias -4) whose bank holds 64 random tokens; checks first
    that an empty memory gives exactly the output of memory off."""
    model = tiny_longmem("llama", memory__retrieve_tokens=16, read__copy_init=-4.0, **NEXT_READ)
    query = ids(B=1, T=12, seed=3)
    assert torch.equal(model(query, bank=model.new_bank(1)).logits, model(query).logits)  # empty == off
    memory = ids(B=1, T=64, seed=9)
    bank = model.new_bank(1)
    model.write_memory(memory, bank)
    return model, model.sidenet.memory_copy, memory, bank


def test_copy_gate_opens_on_an_exact_read_through_the_match_gate():
    model, copy, memory, bank = copy_head_over_memory()
    gates = {}
    for name, x in (("repeat", memory[:, 20:40]), ("fresh", ids(B=1, T=20, seed=5))):
        out = model(x, bank=bank, labels=x)
        read = out.readout
        # reference: the read-weighted cosine per head ...
        q = torch.nn.functional.normalize(read.retrieval.queries.float(), dim=-1)
        k = torch.nn.functional.normalize(read.retrieval.keys.float(), dim=-1)
        Hq = read.weights.shape[1]
        group = Hq // read.retrieval.num_heads  # query heads that share one KV head's search
        cos = torch.einsum("bhtd,bhtkd->bhtk", q, k).repeat_interleave(group, 1)
        torch.testing.assert_close(read.match, (read.weights * cos).sum(-1), atol=1e-5, rtol=1e-5)
        # ... and the copy distribution's peak (heads count equally at init)
        nxt = read.retrieval.next_token_ids[0].repeat_interleave(group, 0)
        p_copy = torch.zeros(x.shape[1], out.logits.shape[-1])
        for h in range(Hq):
            p_copy.scatter_add_(-1, nxt[h].clamp_min(0), (read.weights[0, h] * (nxt[h] >= 0)).detach() / Hq)
        peak = p_copy.max(-1).values
        hidden = torch.zeros(1, x.shape[1], model.adapter.hidden_size)  # u starts at 0: b and the evidence count
        z = copy.gate_logit(hidden, read, peak[None])[0, :, 0]
        torch.testing.assert_close(z, -4.0 + 4.0 * read.match[0].mean(0) + 4.0 * peak, atol=1e-5, rtol=1e-5)
        gates[name] = torch.sigmoid(z)
        if name == "repeat":
            out.loss.backward()
    # the repeat's first token has no earlier occurrence in its context; from the second on it has
    assert gates["repeat"][1:].mean() > gates["fresh"][1:].mean() + 0.1
    assert copy.match_gate.grad is not None and copy.match_gate.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="needs read.copy_init"):
        tiny_longmem("llama", read__copy_init=None, read__copy_match_init=8.0, **NEXT_READ)


def test_retrieval_trace_shows_the_original_occurrence_and_what_followed_it():
    from longmem.trace import retrieval_trace

    model = tiny_longmem("llama", memory__retrieve_tokens=8, read__copy_init=None, read__copy_match_init=None,
                         **NEXT_READ)
    memory = ids(B=1, T=64, seed=11)
    bank = model.new_bank(1)
    model.write_memory(memory, bank)
    trace = retrieval_trace(model, bank, memory[:, 10:20], position=-1, top=2)  # a verbatim repeat
    assert trace["memory_tokens"] == 64 and 0 < trace["predicted_probability"] <= 1  # every token kept
    assert len(trace["heads"]) == 4 and all(0 <= h["gate"] <= 1 for h in trace["heads"])
    found = [c for h in trace["heads"] for c in h["chunks"] if c["stream_position"] == 19]
    assert found, "no head retrieved the token's own earlier occurrence"
    assert found[0]["text"] == str([int(memory[0, 19])]) and found[0]["followed_by"] == str([int(memory[0, 20])])
    for h in trace["heads"]:
        weights = [c["weight"] for c in h["chunks"]]
        assert weights == sorted(weights, reverse=True)
    assert trace["copy"] is None  # no copy head
    with pytest.raises(InputError, match="outside the 10 local tokens"):
        retrieval_trace(model, bank, memory[:, 10:20], position=10)
    # with a copy head the trace shows its gate and both distributions; the copy names what followed
    model = tiny_longmem("llama", memory__chunk_size=1, memory__retrieve_tokens=8, read__copy_init=-2.0, read__copy_match_init=4.0,
                         **NEXT_READ)
    bank = model.new_bank(1)
    model.write_memory(memory, bank)
    copy = retrieval_trace(model, bank, memory[:, 10:20], position=-1)["copy"]
    assert 0 < copy["gate"] < 1 and len(copy["model_top"]) == len(copy["copy_top"]) == 3
    assert copy["copy_top"][0]["token"] == str([int(memory[0, 20])])


def test_copy_mix_at_the_read_ids_equals_the_full_vocabulary_mix():
    """The copy head mixes only at the ids memory read; the result is the two-distribution mix
    log((1 - g) p_model + g p_copy) over the whole vocabulary, with its gradient."""
    model, copy, memory, bank = copy_head_over_memory()
    captured = {}
    copy.register_forward_hook(lambda mod, inputs, output: captured.update(inputs=inputs))
    x = torch.cat([memory[:, 20:30], ids(B=1, T=10, seed=5)], 1)  # a repeat, then fresh text
    out = model(x, bank=bank, labels=x)
    log_model, p_copy, z, read = copy.parts(*captured["inputs"])
    dense = torch.logaddexp(torch.nn.functional.logsigmoid(-z) + log_model,
                            torch.nn.functional.logsigmoid(z) + p_copy.clamp_min(1e-30).log())
    dense = torch.where(read[..., None], dense, log_model)
    torch.testing.assert_close(out.logits, dense, atol=1e-5, rtol=1e-5)
    assert bool((torch.sigmoid(z[0, 1:10, 0]) > 0.5).any())  # the gate opens somewhere on the repeat
    # The same gradients as a cross-entropy over the dense mix: to the copy head, the hidden state
    # and the LM's logits (the loss reads the log-probabilities without a second log-softmax).
    hidden, logits = captured["inputs"][:2]
    wrt = [hidden, logits, *copy.parameters()]
    dense_loss = torch.nn.functional.cross_entropy(dense[0, :-1], x[0, 1:])
    torch.testing.assert_close(out.loss, dense_loss, atol=1e-5, rtol=1e-5)
    for fast, reference in zip(torch.autograd.grad(out.loss, wrt, retain_graph=True),
                               torch.autograd.grad(dense_loss, wrt, retain_graph=True)):
        torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-4)
    out.loss.backward()
    assert copy.gate.bias.grad is not None and copy.head_logits.grad.abs().sum() > 0


def _deep_longmem(**overrides):
    """Eight backbone layers: four side layers, three of them below the memory layer."""
    settings = {"memory__window": 32, "memory__capacity_tokens": 256, "memory__dtype": "float32", **overrides}
    return longmem_on(tiny_backbone("llama", layers=8), **settings)


def test_layers_that_add_nothing_are_skipped_and_the_output_is_unchanged():
    model = _deep_longmem()
    side = model.sidenet
    assert side.memory_side_layer == 3
    with torch.no_grad():
        side.layers[0].alpha.fill_(0.5)  # a trained layer below memory; layers 1 and 2 stay at alpha 0
        side.memory_layer.memory_scale.fill_(1.0)
    bank = model.new_bank(2)
    model.write_memory(ids(T=64, seed=3), bank)
    with torch.no_grad():
        assert side.identity_layers() == {1, 2}  # never the memory layer, never a layer that acts
        skipped = model(ids(), bank=bank).logits
        side._identity_key, side._identity = "forced", set()
        side.identity_layers = lambda: set()
        full = model(ids(), bank=bank).logits
    torch.testing.assert_close(skipped, full, rtol=0, atol=1e-6)
    del side.identity_layers
    assert side.identity_layers() == set()  # with gradients on, a trainable alpha is never skipped
    with torch.no_grad():
        side.layers[1].alpha.fill_(0.25)  # changed weights are seen at the next forward
        assert side.identity_layers() == {2}


def test_rerank_map_starts_as_the_plain_cosine_and_learns_to_tell_retrieved_tokens_apart():
    from longmem.sidenet import next_token_read

    model = tiny_longmem("llama", **NEXT_READ)
    layer = model.sidenet.memory_layer
    assert torch.equal(layer.memory_rerank, torch.eye(16).repeat(2, 1, 1))  # (Hkv, D, D)
    bank = model.new_bank(1)
    model.write_memory(ids(B=1, T=96, seed=5), bank)
    out = model(ids(B=1), bank=bank, labels=ids(B=1))
    retrieval = out.readout.retrieval
    temperature = layer.memory_temperature.exp().detach()
    plain = next_token_read(retrieval, temperature)
    mapped = next_token_read(retrieval, temperature, rerank=torch.eye(16).repeat(2, 1, 1))
    for a, b in zip(plain, mapped):
        torch.testing.assert_close(a, b)
    other = next_token_read(retrieval, temperature, rerank=torch.randn(2, 16, 16))
    assert not torch.allclose(other[1], plain[1])  # another map weighs the retrieved tokens otherwise
    out.loss.backward()
    assert layer.memory_rerank.grad.abs().sum() > 0


def test_a_checkpoint_saved_before_the_rerank_map_loads_with_the_identity(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_longmem("llama", **NEXT_READ)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "sidenet.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.endswith("memory_rerank")}
    save_file(state, str(weights))
    loaded = LongMem.from_pretrained(tmp_path, backbone=tiny_backbone("llama", seed=0))
    assert torch.equal(loaded.sidenet.memory_layer.memory_rerank, model.sidenet.memory_layer.memory_rerank)
    bank_a, bank_b = model.new_bank(2), loaded.new_bank(2)
    for seg in (ids(seed=1), ids()):
        assert torch.equal(model(seg, bank=bank_a, update_memory=True).logits,
                           loaded(seg, bank=bank_b, update_memory=True).logits)


def test_should_stop_ends_decoding_at_the_next_step_as_cancelled():
    model = tiny_longmem("llama")
    kept = []
    out = model.generate(ids(B=1, T=8), max_new_tokens=20, on_token=lambda row, t: kept.append(t),
                         should_stop=lambda: len(kept) >= 3)
    assert out.finish_reasons == ["cancelled"] and out.token_ids[0] == kept and len(kept) == 3
    assert model.generate(ids(B=1, T=8), max_new_tokens=5, should_stop=lambda: False).finish_reasons == ["length"]
