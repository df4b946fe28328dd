import os
from pathlib import Path

from pipelines.ray_env import LOCAL_ENV

# Keep any Ray started by tests on loopback and lean on 2 CPUs (set before ray is imported).
for key, value in LOCAL_ENV.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUSTEN = ROOT.parent / "shared" / "data" / "austen"


def tiny_backbone(family: str = "llama", seed: int = 0, layers: int = 4, dtype=torch.float32):
    """A random-initialised causal LM of the given family, small enough for CPU tests."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    llama_style = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
    if family in llama_style:
        name = llama_style[family]
        config = getattr(transformers, f"{name}Config")(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        model = getattr(transformers, f"{name}ForCausalLM")(config)
    elif family == "gemma3":
        # Gemma 3's shape in small: one KV head, q/k norms, sliding-window layers between global
        # ones (here layer 1 and 4 are global: the default memory layer must move to 1)
        config = transformers.Gemma3TextConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=max(layers, 6),
            num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
            max_position_embeddings=512, sliding_window=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            layer_types=["full_attention" if i in (1, 4) else "sliding_attention" for i in range(max(layers, 6))],
        )
        model = transformers.Gemma3ForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=512,
            bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def longmem_on(backbone=None, preset="default", dtype=torch.float32, **overrides):
    """load_model with settings written `section__field=value` (e.g. memory__chunk_size=4)."""
    from longmem.loading import load_model

    settings = {k.replace("__", "."): v for k, v in overrides.items()}
    return load_model(backbone=backbone, overrides=settings, preset=preset, dtype=dtype)


def tiny_longmem(family="llama", seed=0, dtype=torch.float32, preset="default", **overrides):
    """A LongMem on a tiny random backbone: the defaults (the recipe) unless a test names the paper
    preset or overrides settings."""
    settings = {"memory__window": 32, "memory__capacity_tokens": 256, "memory__dtype": "float32", **overrides}
    return longmem_on(tiny_backbone(family, seed, dtype=dtype), preset=preset, dtype=dtype, **settings)


@pytest.fixture(scope="session")
def real_backbone():
    """The default SmolLM2-135M backbone (converted once into the cache)."""
    from longmem.backbone import load_backbone

    return load_backbone()


def page_ids(tokenizer, text: str) -> torch.Tensor:
    """A page of real prose (1, 1024): two 512-token windows from the middle of the book."""
    return tokenizer(text[20_000:40_000], add_special_tokens=False, return_tensors="pt").input_ids[:, :1024]


@pytest.fixture(scope="session")
def austen_text():
    path = AUSTEN / "persuasion.txt"
    if not path.exists():
        pytest.fail(f"test text missing: {path} (shared data folder not laid out beside the project)")
    return path.read_text()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray (127.0.0.1, 2 CPUs) shared by the pipeline tests."""
    from pipelines.ray_env import init_ray

    ray = init_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer (vocab 49,152), saved as a local folder."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from longmem.backbone import resolve_backbone

    folder = tmp_path_factory.mktemp("tiny-backbone")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model.save_pretrained(folder)
    real = resolve_backbone("smollm2-135m-instruct")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        try:
            shutil.copy(f"{real}/{name}", folder / name)
        except FileNotFoundError:
            pass
    return folder
