"""The memory probes measure what they claim: with oracle readers at the generation interface, a
reader that sees the whole prompt (memory) finds every key, readers that see only the local window
(memory off, backbone) find none, and all three see the same local tokens."""

import re
import types

import pytest
import torch

from conftest import longmem_on
from longmem.evaluation.probes import passkey_probe
from longmem.generation import GenerationOutput
from longmem.model import LongMem


def test_passkey_probe_plants_the_key_beyond_the_local_window_and_scores_exactly(tiny_dir):
    model = longmem_on(str(tiny_dir), memory__window=64, memory__dtype="float32")
    tok, W = model.tokenizer, model.config.memory.window
    filler = model.encode(" ".join(f"the quiet house number {w} by the sea" for w in range(400)))
    filler = torch.tensor([[t for t in filler[0].tolist() if not tok.decode([t]).strip().isdigit()]])  # no digits
    seen = {"memory": [], "no_memory": [], "backbone": []}

    def key_in(ids):
        found = re.findall(r"pass key is (\d{5})", tok.decode(ids[0]))
        return found[0] if found else "00000"

    def generate(self, prompt, bank=None, max_new_tokens=8, **kw):
        reader = "memory" if bank is not None else "no_memory"
        visible = prompt if bank is not None else prompt[:, model.local_start(prompt.shape[1]):]
        seen[reader].append((prompt.shape[1], visible.shape[1]))
        return GenerationOutput([[0]], [f" {key_in(visible)}. "], ["length"])

    def backbone_generate(local, max_new_tokens=8, **kw):
        seen["backbone"].append((None, local.shape[1]))
        return torch.cat([local, model.encode(f" {key_in(local)}.")], 1)

    model.generate = types.MethodType(generate, model)
    model.backbone.generate = backbone_generate
    report = passkey_probe(model, filler, distance=4 * W, trials=5, seed=3)
    assert (report["accuracy_memory"], report["accuracy_no_memory"], report["accuracy_backbone"]) == (1.0, 0.0, 0.0)
    assert report["seed"] == 3 and len(report["answers"]) == 5
    assert all(a["memory"].strip(" .") == a["key"] for a in report["answers"])
    # every reader's local window holds the same W/2 tokens: the question ends half-way into it
    assert {v for _, v in seen["no_memory"]} == {v for _, v in seen["backbone"]} == {W // 2}
    assert all(p % W == W // 2 for p, _ in seen["memory"])
    # the fact follows 64 tokens of prose; the question ends `distance` tokens (within a window) later
    assert all(4 * W - W <= p - 64 <= 4 * W + W for p, _ in seen["memory"])
    with pytest.raises(ValueError, match="must be at least the window"):
        passkey_probe(model, filler, distance=W // 2)
