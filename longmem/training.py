"""Memory-augmented adaptation of the SideNet, without Ray: episodes, a curriculum that makes
memory necessary, and one optimisation step. Ray Train workers call these same functions.

An *episode* is consecutive segments of one document. Its bank stream is reset first; the
earlier segments are written to memory by the frozen backbone alone (memory holds backbone
keys/values, so no SideNet pass or gradient is needed there), and the last `train_segments`
segments are trained on while reading that memory.

Curriculum kinds (mixed by ratio, e.g. "plain:0.5,repeat:0.3,passkey:0.2"):
- plain:   consecutive text of a book.
- repeat:  the last segment carries a span (1/4 to all of a segment) copied from >= 2 segments
           back, beyond the local window: only memory can predict it.
- passkey: a 5-digit key planted in the first segment's prose and asked for at the end of the last.
- facts:   1-5 facts of one form (keys, numbers, words or codes; facts.TRAIN_TEMPLATES) planted in
           the segments before the last, one asked for at the end of the last, half the time in
           the fact's own words and half in other words; the others are distractors of its shape.

Distractors (`distractor_tokens`): an episode's memory holds ~1k tokens, while a passkey 32k tokens
back sits among 32k, where the read is learnt on far fewer competitors than it meets. Each episode's memory can start with this many tokens of other text from the corpus,
encoded once by the backbone (DistractorMemory).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .loading import DTYPES, inference_dtype
from .model import InputError, LongMem, next_token_nll

CURRICULUM_KINDS = ("plain", "repeat", "passkey", "facts")
PASSKEY_FACT = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


@dataclass
class TrainConfig:
    """Defaults are the recipe (docs/results.md): what `jobs/train_sidenet.py` runs."""

    steps: int = 420
    batch_size: int = 2  # episodes a step on each worker (rows of one bank, sharing distractors)
    segments_per_episode: int = 3
    train_segments: int = 1  # trailing segments trained on; earlier ones only fill memory
    lr: float = 3e-4
    memory_lr: float | None = 0.02  # gates, memory scale, temperatures, copy head; None: same as lr
    warmup_steps: int = 20
    schedule: str = "cosine"  # or "linear"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1
    bf16: bool = False  # the trained segment's forward (SideNet included) under bfloat16 autocast
    # The frozen backbone's passes (memory writes, the hidden states the SideNet reads): "auto" is
    # bfloat16 where the device computes it natively (CUDA, CPUs with AMX / AVX512-BF16), where
    # they take about half as long as in float32; else the model's own dtype. The SideNet and its
    # gradients stay in the model's dtype.
    frozen_dtype: str = "auto"
    seed: int = 0
    curriculum: str = "plain:0.25,repeat:0.15,passkey:0.1,facts:0.5"
    answer_weight: float = 20.0  # loss weight of a passkey answer's tokens (1 = like any other token)
    distractor_tokens: int = 16_384  # other text put in each episode's memory first (whole segments)
    distractor_pool: int = 4  # the encoded pool holds this many episodes' worth of distractors
    # Train the copy head alone (everything else frozen), with the memory read's values kept out of
    # the hidden state: the copy then learns to stand in where the value path fails. Trained with
    # the value path on, the gate learns to stay shut at passkey digits, because in training the
    # value path already writes them; at 32k it sometimes does not.
    copy_head_only: bool = False
    # "from_memory": the side layers from the memory layer up (and the final norm); the layers below
    # stay the backbone (alpha 0) and are skipped, in training and after. Reading memory happens at
    # and above the memory layer, and the read itself is scored on frozen backbone keys, so the
    # layers below only adapt the SideNet to the training text. "all": every side layer (the paper).
    trained_layers: str = "from_memory"

    def validate(self) -> "TrainConfig":
        if self.steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise InputError("steps, batch_size and grad_accum must be positive")
        if not 1 <= self.train_segments <= self.segments_per_episode:
            raise InputError("train_segments must lie in [1, segments_per_episode]")
        if self.trained_layers not in ("from_memory", "all"):
            raise InputError(f"trained_layers must be 'from_memory' or 'all', got {self.trained_layers!r}")
        if self.frozen_dtype != "auto" and self.frozen_dtype not in DTYPES:
            raise InputError(f"frozen_dtype must be 'auto' or one of {', '.join(DTYPES)}, got {self.frozen_dtype!r}")
        if self.schedule not in ("cosine", "linear"):
            raise InputError(f"schedule must be 'cosine' or 'linear', got {self.schedule!r}")
        parse_curriculum(self.curriculum)
        if self.answer_weight <= 0:
            raise InputError(f"answer_weight must be positive, got {self.answer_weight}")
        if self.distractor_tokens < 0 or self.distractor_pool < 1:
            raise InputError("distractor_tokens must be >= 0 and distractor_pool >= 1")
        if "repeat" in parse_curriculum(self.curriculum) and self.segments_per_episode < 3:
            raise InputError("repeat episodes need segments_per_episode >= 3 (a span from >= 2 segments back)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def frozen_precision(self, device: torch.device) -> torch.dtype | None:
        """What LongMem.frozen_precision gets for the frozen passes on `device` (None: no autocast)."""
        name = inference_dtype(device) if self.frozen_dtype == "auto" else self.frozen_dtype
        return None if name == "float32" else DTYPES[name]


def parse_curriculum(spec: str) -> dict[str, float]:
    mix = {}
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        if name not in CURRICULUM_KINDS:
            raise InputError(f"unknown curriculum kind {name!r}; use {', '.join(CURRICULUM_KINDS)}")
        try:
            mix[name] = float(weight or 1.0)
        except ValueError:
            raise InputError(f"curriculum weight for {name!r} is not a number: {weight!r}") from None
        if mix[name] < 0:
            raise InputError(f"curriculum weight for {name!r} is negative")
    total = sum(mix.values())
    if total <= 0:
        raise InputError(f"curriculum {spec!r} has no positive weight")
    return {k: v / total for k, v in mix.items()}


@dataclass
class Episode:
    ids: torch.Tensor  # (segments * W,)
    labels: torch.Tensor  # (segments * W,), -100 where not scored
    kind: str
    answer: torch.Tensor | None = None  # (segments * W,) bool: the tokens a passkey question asks for


class EpisodeSampler:
    """Draws episodes from tokenised documents (1-D LongTensors) by curriculum."""

    def __init__(self, documents, window: int, segments: int, curriculum: str, seed: int = 0, tokenizer=None):
        self.window, self.segments = window, segments
        self.length = window * segments
        self.documents = [d for d in documents if d.numel() >= self.length]
        if not self.documents:
            raise InputError(
                f"no training document holds one episode ({segments} segments x {window} tokens = {self.length})"
            )
        self.skipped = len(documents) - len(self.documents)
        self.weights = [d.numel() - self.length + 1 for d in self.documents]
        self.mix = parse_curriculum(curriculum)
        if ("passkey" in self.mix or "facts" in self.mix) and tokenizer is None:
            raise InputError("passkey and facts episodes need a tokenizer")
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)

    def state(self):
        return self.rng.getstate()

    def set_state(self, state):
        self.rng.setstate(state)

    def _text(self, length: int) -> torch.Tensor:
        doc = self.rng.choices(self.documents, weights=self.weights)[0]
        start = self.rng.randrange(doc.numel() - length + 1)
        return doc[start : start + length].clone()

    def sample(self) -> Episode:
        kind = self.rng.choices(list(self.mix), weights=list(self.mix.values()))[0]
        ids = self._text(self.length)
        W = self.window
        if kind == "repeat":
            span = self.rng.randint(W // 4, W)
            source_segment = self.rng.randrange(self.segments - 2)  # >= 2 segments before the last
            src = source_segment * W + self.rng.randrange(W - span + 1)
            dst = (self.segments - 1) * W + self.rng.randrange(W - span + 1)
            ids[dst : dst + span] = ids[src : src + span]
        elif kind in ("passkey", "facts"):
            ids, answer = self._passkey(ids) if kind == "passkey" else self._facts(ids)
            return Episode(ids, ids.clone(), kind, answer)
        return Episode(ids, ids.clone(), kind)

    def _encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    def _ask(self, ids: torch.Tensor, prefix: str, value: str):
        """End the episode with `prefix` and its answer `value`; returns ids and the answer's mask."""
        question = self._encode(prefix + " " + value + ".")
        ids[self.length - question.numel() :] = question
        answer = torch.zeros(self.length, dtype=torch.bool)
        answer[self.length - (question.numel() - self._encode(prefix).numel()) :] = True
        return ids, answer

    def _passkey(self, ids: torch.Tensor):
        key = f"{self.rng.randrange(10_000, 100_000)}"
        fact = self._encode(PASSKEY_FACT.format(key=key))
        at = self.rng.randrange(self.window - fact.numel())
        ids[at : at + fact.numel()] = fact
        return self._ask(ids, PASSKEY_QUESTION, key)

    def _facts(self, ids: torch.Tensor):
        from .facts import TRAIN_ADJECTIVES, TRAIN_NOUNS, TRAIN_TEMPLATES, TRAIN_WORDS, VALUE_KINDS, fact_set

        rng, W = self.rng, self.window
        template, kind = rng.choice(TRAIN_TEMPLATES), rng.choice(VALUE_KINDS)
        facts = fact_set(rng, template, kind, rng.randint(1, 5), TRAIN_ADJECTIVES, TRAIN_NOUNS, TRAIN_WORDS)
        # Each fact in its own stretch of the segments before the last (beyond the local window);
        # as many as fit whole.
        region = (self.segments - 1) * W
        encoded = [self._encode(sentence) for _, _, sentence in facts]
        while len(facts) > 1 and max(t.numel() for t in encoded[: len(facts)]) >= region // len(facts):
            facts = facts[:-1]
        slot = region // len(facts)
        for i, tokens in enumerate(encoded[: len(facts)]):
            tokens = tokens[: slot - 1]
            at = i * slot + rng.randrange(slot - tokens.numel())
            ids[at : at + tokens.numel()] = tokens
        asked_key, asked_value, _ = facts[rng.randrange(len(facts))]
        style = template.restate if rng.random() < 0.5 else template.paraphrase
        return self._ask(ids, style.format(kind=kind, key=asked_key), asked_value)


SHUFFLE_EPISODES = 256  # episodes held back to shuffle a stream, so consecutive ones come from other documents


def episode_stream(passes: Callable[[], Iterable[tuple[str, object]]], window: int, cfg: TrainConfig, tokenizer=None,
                   shuffle: int = SHUFFLE_EPISODES) -> Iterator[Episode]:
    """Every episode of a run, in order, from a corpus read as a stream (never the whole corpus at once).

    `passes()` gives one pass over the corpus as (digest, tokens) pairs. Pass e (an epoch) draws
    len(tokens) // episode_length episodes from each document that holds one, with a seed of the
    run's seed, e and the document's digest: an episode depends on its document, not on what was
    read before it. A seeded buffer of `shuffle` episodes mixes documents. The stream never ends
    (a run takes the steps it needs) and holds one document and the buffer at a time.
    """
    segments = cfg.segments_per_episode
    length = window * segments
    order = random.Random(f"shuffle:{cfg.seed}")
    buffer: list[Episode] = []
    for epoch in itertools.count():
        drawn = 0
        for digest, tokens in passes():
            tokens = torch.tensor(np.asarray(tokens), dtype=torch.long)  # a copy: stream rows are read-only
            if tokens.numel() < length:
                continue
            sampler = EpisodeSampler([tokens], window, segments, cfg.curriculum, f"{cfg.seed}/{epoch}/{digest}", tokenizer)
            for _ in range(tokens.numel() // length):
                buffer.append(sampler.sample())
                drawn += 1
                if len(buffer) > shuffle:
                    i = order.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
        if not drawn:
            raise InputError(f"no training document holds one episode ({segments} segments x {window} tokens = {length})")


def distractor_segments(documents, window: int, cfg: TrainConfig) -> list[torch.Tensor]:
    """The token segments (window each) of the distractor pool, drawn from the corpus by cfg.seed."""
    if cfg.distractor_tokens <= 0:
        return []
    usable = [d for d in documents if len(d) >= window]
    if not usable:
        raise InputError(f"no document holds one {window}-token segment for distractors")
    rng = random.Random(f"distractors:{cfg.seed}")
    weights = [len(d) - window + 1 for d in usable]
    count = math.ceil(cfg.distractor_tokens / window) * cfg.distractor_pool
    segments = []
    for _ in range(count):
        doc = rng.choices(usable, weights=weights)[0]
        start = rng.randrange(len(doc) - window + 1)
        segments.append(torch.as_tensor(doc[start : start + window], dtype=torch.long))
    return segments


class DistractorMemory:
    """Backbone keys/values of a pool of corpus segments, encoded once. `fill` writes
    ceil(distractor_tokens / window) of them into a freshly reset bank, exactly as write_memory
    would write that text; which ones follows from the episode's own tokens, so a resumed run
    draws the same."""

    def __init__(self, model: LongMem, segments: list[torch.Tensor], tokens: int, precision: torch.dtype | None = None):
        """`precision`: the frozen passes' autocast dtype (TrainConfig.frozen_precision), as in training."""
        W = model.config.memory.window
        self.per_episode = math.ceil(tokens / W)
        if len(segments) < self.per_episode:
            raise InputError(f"the distractor pool has {len(segments)} segments, an episode needs {self.per_episode}")
        self.ids, self.keys, self.values = [], [], []
        with torch.no_grad(), model.frozen_precision(precision):
            for seg in segments:
                if seg.numel() != W:
                    raise InputError(f"distractor segments must be {W} tokens, got {seg.numel()}")
                seg = seg.to(model.device)[None]
                keys, values = model.memory_entries(seg)  # a text of its own
                self.ids.append(seg[0])
                self.keys.append(keys[0])  # (W, Hkv, D)
                self.values.append(values[0])

    def choose(self, episode_ids: torch.Tensor) -> list[int]:
        seed = zlib.crc32(episode_ids.to(torch.int64).cpu().numpy().tobytes())
        return random.Random(seed).sample(range(len(self.ids)), self.per_episode)

    def fill(self, bank, episode_ids: torch.Tensor) -> None:
        """episode_ids (B, N): every row's stream gets the distractors its first row chooses."""
        B = episode_ids.shape[0]
        for i in self.choose(episode_ids[0]):
            bank.add(self.keys[i][None].expand(B, -1, -1, -1), self.values[i][None].expand(B, -1, -1, -1),
                     token_ids=self.ids[i][None].expand(B, -1))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def require_copy_head(sidenet: torch.nn.Module) -> None:
    """copy_head_only trains the copy head: refuse a SideNet without one."""
    if sidenet.memory_copy is None:
        raise InputError("copy_head_only trains the copy head, and this model has none (read.copy_init is null): "
                         "continue a checkpoint that has one")


def make_optimizer(sidenet: torch.nn.Module, cfg: TrainConfig):
    """AdamW over the SideNet; gates, memory scale and temperature get their own learning rate, no decay.
    Parameters outside what cfg trains (copy_head_only, trained_layers) are frozen here, before any
    DDP wrap."""
    if cfg.copy_head_only:
        require_copy_head(sidenet)
    below = []
    if cfg.trained_layers == "from_memory" and not cfg.copy_head_only:
        if sidenet.memory_layer.alpha is None:
            raise InputError("trained_layers 'from_memory' keeps the layers below the memory layer as the backbone, "
                             "which needs sidenet.init 'zero'; the paper's initialisation trains every layer: "
                             "set trained_layers: all")
        below = [f"layers.{i}." for i in range(sidenet.memory_side_layer)]
    for name, p in sidenet.named_parameters():
        if cfg.copy_head_only:
            p.requires_grad_(name.startswith("memory_copy."))
        else:
            p.requires_grad_(not name.startswith(tuple(below)))
    memory, decay, no_decay = [], [], []
    for name, p in sidenet.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith((".gate", ".memory_scale", ".memory_temperature", ".memory_prev_bonus")) \
                or name.startswith("memory_copy."):
            memory.append(p)
        elif p.dim() < 2 or name.endswith(".memory_rerank"):  # decay would pull the map off identity
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
        {"params": memory, "weight_decay": 0.0, "lr": cfg.memory_lr or cfg.lr},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return optimizer, scheduler


def train_step(model: LongMem, episodes: list[list[Episode]], optimizer, scheduler, cfg: TrainConfig,
               sidenet: torch.nn.Module | None = None, distractors: DistractorMemory | None = None) -> dict:
    """One optimiser step over `grad_accum` micro-batches of episodes. `sidenet` may be a DDP wrapper;
    `distractors` (cfg.distractor_tokens > 0) start every episode's memory."""
    if cfg.distractor_tokens > 0 and distractors is None:
        raise InputError("distractor_tokens is set: pass train_step the DistractorMemory built from the corpus")
    t0 = time.perf_counter()
    W, n, k = model.config.memory.window, cfg.segments_per_episode, cfg.train_segments
    model.train()
    total, tokens, gates, shares, copy_gates = 0.0, 0, [], [], []
    bank = None
    with model.frozen_precision(cfg.frozen_precision(model.device)):  # the SideNet keeps its dtype
        for micro in episodes:
            ids = torch.stack([e.ids for e in micro]).to(model.device)  # (B, n*W)
            labels = torch.stack([e.labels for e in micro]).to(model.device)
            if bank is None or bank.num_streams != ids.shape[0]:
                bank = model.new_bank(ids.shape[0])
            bank.reset()
            if distractors is not None:
                distractors.fill(bank, ids)
            if n > k:
                model.write_memory(ids[:, : (n - k) * W], bank)
            for j in range(n - k, n):
                seg, lab = ids[:, j * W : (j + 1) * W], labels[:, j * W : (j + 1) * W]
                weights = None
                if cfg.answer_weight != 1.0 and any(e.answer is not None for e in micro):
                    answer = torch.stack([e.answer if e.answer is not None else torch.zeros_like(e.labels, dtype=torch.bool)
                                          for e in micro]).to(model.device)[:, j * W : (j + 1) * W]
                    weights = 1.0 + (cfg.answer_weight - 1.0) * answer[:, 1:].float()  # (B, W-1), per target
                value_read = model.sidenet.value_read_off() if cfg.copy_head_only else contextlib.nullcontext()
                with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.bf16), value_read:
                    out = model(seg, bank=bank, labels=lab if weights is None else None, update_memory=True,
                                previous_ids=ids[:, j * W - 1] if j else None, context_ids=model.memory_context(ids, j * W))
                if weights is not None:
                    # Mean over scored tokens, the answer's tokens counted answer_weight times.
                    nll = next_token_nll(out.logits, lab, model.returns_log_probs)
                    scored = (lab[:, 1:] != -100).float() * weights
                    out.loss = (nll * scored).sum() / scored.sum()
                (out.loss / (k * len(episodes))).backward()
                total += out.loss.item()
                tokens += seg.numel()
                if out.readout is not None:
                    has = out.readout.has_memory
                    if has.any():
                        shares.append(out.readout.gate[has].float().mean().item())
                    if out.readout.copy_gate is not None and has.any(1).any():
                        copy_gates.append(out.readout.copy_gate[has.any(1)].float().mean().item())
    params = [p for p in (sidenet or model.sidenet).parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    layer = model.sidenet.memory_layer
    gates = torch.sigmoid(layer.gate.detach()).tolist()
    metrics = {
        "loss": total / (k * len(episodes)),
        "tokens": tokens,
        "tokens_per_s": tokens / (time.perf_counter() - t0),
        "grad_norm": grad_norm,
        "lr": scheduler.get_last_lr()[0],
        "memory_fill": bank.num_tokens(0) / bank.capacity_tokens,
        "gate_mean": sum(gates) / len(gates),
        "memory_share": sum(shares) / len(shares) if shares else 0.0,
        "memory_scale": None if layer.memory_scale is None else layer.memory_scale.item(),
    }
    if copy_gates:  # the copy head's mean g where memory was read
        metrics["copy_gate"] = sum(copy_gates) / len(copy_gates)
    return metrics
