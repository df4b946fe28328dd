"""One configuration: the defaults are the recipe, the paper is a preset, checkpoints old and new load."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_backbone, tiny_longmem
from longmem.config import ConfigError, LongMemConfig
from longmem.loading import ModelSource, load_model
from longmem.model import InputError, LongMem
from longmem.training import EpisodeSampler, TrainConfig, make_optimizer, train_step

LEGACY = ROOT / "tests" / "data" / "legacy_config.json"  # written by the flat-config version (29 fields)


def test_defaults_are_the_measured_recipe():
    c = LongMemConfig()
    assert (c.memory.chunk_size, c.memory.query, c.memory.metric, c.memory.center_keys) == (1, "backbone_key", "cosine", True)
    assert (c.read.mode, c.read.prev_bonus_init, c.read.copy_init, c.read.copy_match_init) == ("next", 5.0, -6.0, 4.0)
    assert (c.sidenet.init, c.read.scale_init) == ("zero", 0.0)
    p = LongMemConfig.paper()
    assert (p.memory.chunk_size, p.memory.query, p.memory.metric, p.memory.center_keys) == (4, "side", "ip", False)
    assert (p.read.mode, p.read.copy_init, p.sidenet.init, p.read.scale_init) == ("attend", None, "paper", None)
    assert LongMemConfig.preset("default") == c and LongMemConfig.preset("paper") == p
    with pytest.raises(ConfigError, match="unknown preset"):
        LongMemConfig.preset("best")


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_each_preset_builds_and_trains_a_step(preset):
    torch.manual_seed(0)
    model = tiny_longmem("llama", preset=preset)
    if preset == "paper":
        assert model.sidenet.memory_copy is None and model.adapter.key_center is None
    else:
        assert model.sidenet.memory_copy is not None and model.adapter.key_center is not None
    cfg = TrainConfig(steps=1, warmup_steps=1, curriculum="plain:1", distractor_tokens=0, lr=1e-2, memory_lr=1e-2,
                      trained_layers="all" if preset == "paper" else "from_memory")
    docs = [torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    episode = EpisodeSampler(docs, window=32, segments=3, curriculum="plain:1").sample()
    before = {n: p.detach().clone() for n, p in model.sidenet.named_parameters()}
    optimizer, scheduler = make_optimizer(model.sidenet, cfg)
    metrics = train_step(model, [[episode]], optimizer, scheduler, cfg)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in model.sidenet.named_parameters())


def test_config_json_round_trip_in_sections():
    config = LongMemConfig.paper().with_overrides({"memory": {"window": 256, "capacity_tokens": 4096}})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["format"] == 2 and set(data) == {"format", "backbone", "sidenet", "memory", "read", "passages"}
    assert LongMemConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="unknown settings in memory"):
        LongMemConfig.from_dict({**data, "memory": {**data["memory"], "colour": "red"}})


def test_overrides_are_typed_and_named_by_section():
    c = LongMemConfig()
    assert c.with_overrides({"memory.window": 256}).memory.window == 256
    assert c.with_overrides({"read": {"copy_init": -3}}).read.copy_init == -3.0
    for overrides, message in (({"window": 256}, "did you mean 'memory.window'"),
                               ({"memory.window": "wide"}, "memory.window must be an int"),
                               ({"memory.chunk_size": None}, "cannot be null"),
                               ({"backbone.fingerprint": "x"}, "read off the backbone"),
                               ({"memory.window": 30, "memory.chunk_size": 4}, "must be a multiple of memory.chunk_size")):
        with pytest.raises(ConfigError, match=message):
            c.with_overrides(overrides)


def test_a_checkpoint_written_before_sections_still_loads(tmp_path):
    """A config.json of the flat format (key centre as a JSON list, weights without it) loads with
    its settings and centre, and is saved again in today's format."""
    legacy = json.loads(LEGACY.read_text())
    model = tiny_longmem("llama")  # the same tiny backbone (seed 0) and the same SideNet weights
    model.save_pretrained(tmp_path / "old")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "old" / "sidenet.safetensors"))
    del weights["key_center"]  # the flat format kept the centre in config.json
    save_file(weights, str(tmp_path / "old" / "sidenet.safetensors"))
    (tmp_path / "old" / "config.json").write_text(json.dumps(legacy))

    loaded = LongMem.from_pretrained(tmp_path / "old", backbone=tiny_backbone("llama", seed=0))
    m = loaded.config.memory
    assert (m.window, m.chunk_size, m.capacity_tokens, m.query, m.center_keys) == (32, 1, 256, "backbone_key", True)
    assert loaded.config.read.copy_match_init == 4.0 and loaded.config.backbone.fingerprint.startswith("v2-")
    torch.testing.assert_close(loaded.sidenet.key_center, torch.tensor(legacy["key_center"]))
    loaded.save_pretrained(tmp_path / "new")
    again = LongMem.from_pretrained(tmp_path / "new", backbone=tiny_backbone("llama", seed=0))
    assert again.config == loaded.config and torch.equal(again.sidenet.key_center, loaded.sidenet.key_center)
    # a legacy checkpoint on another backbone is still refused by its legacy fingerprint
    with pytest.raises(Exception, match="fingerprint"):
        LongMem.from_pretrained(tmp_path / "old", backbone=tiny_backbone("llama", seed=1))


def test_a_checkpoint_that_used_a_removed_experiment_is_refused_by_name(tmp_path):
    for field, value in (("memory_copy_gate_hidden", False), ("memory_confidence", True),
                         ("memory_copy_confidence_init", -3.0)):
        shutil.rmtree(tmp_path / "old", ignore_errors=True)
        tiny_longmem("llama").save_pretrained(tmp_path / "old")
        (tmp_path / "old" / "config.json").write_text(json.dumps({**json.loads(LEGACY.read_text()), field: value}))
        with pytest.raises(ConfigError, match=f"trained with {field}=.*an experiment that has been removed"):
            LongMem.from_pretrained(tmp_path / "old", backbone=tiny_backbone("llama", seed=0))


def test_model_source_is_the_typed_model_section(tmp_path):
    source = ModelSource.from_dict({"backbone": "tiny", "preset": "paper", "overrides": {"memory": {"window": 64}}})
    assert source.config().memory.window == 64 and source.config().read.mode == "attend"
    with pytest.raises(ConfigError, match="unknown model settings \\['window'\\]"):
        ModelSource.from_dict({"window": 64})
    tiny_longmem("llama").save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="a checkpoint has its own"):
        ModelSource(checkpoint=str(tmp_path / "ckpt"), preset="paper").validate()
    with pytest.raises(ConfigError, match="sidenet.init comes from the checkpoint's weights"):
        ModelSource(checkpoint=str(tmp_path / "ckpt"), overrides={"sidenet.init": "paper"}).validate()
    with pytest.raises(ConfigError, match="not a LongMem checkpoint"):
        ModelSource(checkpoint=str(tmp_path / "nowhere")).validate()


def test_save_pretrained_is_atomic_and_never_replaces_other_files(tmp_path):
    model = tiny_longmem("llama")
    model.save_pretrained(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "ckpt")  # a checkpoint may be replaced by another
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a LongMem checkpoint"):
        model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


def test_the_library_imports_no_ray():
    code = "import sys, longmem, longmem.evaluation, longmem.loading; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_a_bf16_load_of_the_default_backbone_is_the_same_backbone(real_backbone, tmp_path):
    """GPU users load the backbone in bfloat16 (or float16): a checkpoint trained on the float32
    load must accept it, and memory built by one is readable by the other."""
    backbone, tokenizer = real_backbone
    model = load_model(backbone=backbone, tokenizer=tokenizer)
    model.calibrate_key_center(tokenizer("It is a truth universally acknowledged, that a single man in possession "
                                         "of a good fortune, must be in want of a wife.", return_tensors="pt").input_ids)
    assert model.sidenet.key_center.abs().sum() > 0  # a centre that half precision would round
    model.save_pretrained(tmp_path / "ckpt")
    for dtype in (torch.bfloat16, torch.float16):
        half = load_model(checkpoint=tmp_path / "ckpt", dtype=dtype)
        assert half.dtype == dtype and half.config.backbone.fingerprint == model.config.backbone.fingerprint
        assert half.memory_spec == model.memory_spec  # the key centre stays float32: the same digest
        assert half.sidenet.key_center.dtype == torch.float32


def test_every_job_refuses_an_override_the_checkpoint_fixes(tmp_path):
    """Training, building memory and evaluation check their model section by the loader's rule
    before any Ray work (serving: tests/test_serve.py; the command line: tests/test_cli.py)."""
    from pipelines.build_memory import BuildJob
    from pipelines.evaluate import EvalJob
    from pipelines.train_sidenet import TrainJob

    tiny_longmem("llama").save_pretrained(tmp_path / "ckpt")
    bad = {"checkpoint": str(tmp_path / "ckpt"), "overrides": {"read.mode": "attend"}}
    good = {"checkpoint": str(tmp_path / "ckpt"), "overrides": {"memory.capacity_tokens": 512}}
    jobs = (lambda m: TrainJob(corpus=["x"], out=str(tmp_path / "out"), model=m),
            lambda m: BuildJob(corpus=["x"], out=str(tmp_path / "mem"), model=m),
            lambda m: EvalJob(task="perplexity", data=["x"], out=str(tmp_path / "report"), model=m))
    for make in jobs:
        with pytest.raises(ConfigError, match="read.mode comes from the checkpoint's weights"):
            make(bad).validate()
        assert make(good).validate().model.config().memory.capacity_tokens == 512
