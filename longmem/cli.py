"""`longmem` command line: generate, perplexity, demo.

Every error a user can cause ends in one line on stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .backbone import BackboneError
from .config import DEFAULT_BACKBONE, ConfigError
from .memory import MemoryBankError
from .model import InputError

USER_ERRORS = (ConfigError, BackboneError, InputError, MemoryBankError, OSError, UnicodeDecodeError)


def log(message: str) -> None:
    print(f"[longmem] {message}", file=sys.stderr, flush=True)


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    data = p.read_bytes()
    if b"\x00" in data[:4096]:
        raise InputError(f"{path}: looks like a binary file, expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise InputError(f"{path}: the file is empty")
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="LongMem checkpoint folder (config.json + sidenet.safetensors)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help="backbone alias, hub id or local folder when no checkpoint is given (default: %(default)s)")
    p.add_argument("--side-init", default="zero", choices=["zero", "paper"],
                   help="SideNet init when no checkpoint is given; 'zero' starts equal to the backbone")
    p.add_argument("--window", type=int, help="local window (segment length) in tokens")
    p.add_argument("--memory-tokens", type=int, help="memory capacity in tokens")
    p.add_argument("--device", default="cpu")


def load_model(args):
    import torch

    from .model import LongMem

    overrides = {k: v for k, v in {"window": args.window, "memory_tokens": args.memory_tokens}.items() if v}
    t0 = time.time()
    if args.checkpoint:
        model = LongMem.from_pretrained(args.checkpoint, device=args.device)
        for key, value in overrides.items():
            setattr(model.config, key, value)
        model.config.validate()
    else:
        model = LongMem.from_backbone(args.backbone, side_init=args.side_init, device=args.device,
                                      dtype=torch.float32, **overrides)
    log(f"model ready in {time.time() - t0:.1f}s: backbone {model.config.backbone} "
        f"({model.config.model_type}, {model.adapter.num_layers} layers), SideNet {len(model.sidenet.layers)} layers, "
        f"memory layer {model.memory_layer}, window {model.config.window}")
    if model.tokenizer is None:
        raise InputError("the backbone has no tokenizer; the CLI works on text")
    return model


def cmd_generate(args) -> int:
    prompt = read_text(args.prompt_file) if args.prompt_file else args.prompt
    if not prompt:
        raise InputError("give a prompt with --prompt TEXT or --prompt-file FILE")
    if args.max_tokens <= 0:
        raise InputError(f"--max-tokens must be positive, got {args.max_tokens}")
    model = load_model(args)
    bank = model.new_bank(1)
    for path in args.memory_file or []:
        n = model.remember_text(read_text(path), bank)
        log(f"remembered {n} tokens from {path} ({bank.num_tokens(0)} in memory)")
    out = model.generate(model.encode(prompt), bank=bank, max_new_tokens=args.max_tokens,
                         temperature=args.temperature, top_p=args.top_p, stop=args.stop, seed=args.seed)
    if args.json:
        print(json.dumps({"text": out.texts[0], "finish_reason": out.finish_reasons[0],
                          "completion_tokens": len(out.token_ids[0]), "memory_tokens": bank.num_tokens(0)}))
    else:
        print(out.texts[0])
    return 0


def cmd_perplexity(args) -> int:
    from .model import perplexity_report

    text = read_text(args.file)
    model = load_model(args)
    ids = model.encode(text)
    if args.max_tokens:
        ids = ids[:, : args.max_tokens]
    log(f"scoring {ids.shape[1]} tokens in windows of {model.config.window}")
    t0 = time.time()

    def progress(done, total):
        if done == total or done % 10 == 0:
            log(f"segment {done}/{total} ({time.time() - t0:.0f}s)")

    report = perplexity_report(model, ids, progress=progress)
    report.update(file=str(args.file), checkpoint=args.checkpoint, backbone_id=model.config.backbone,
                  seconds=round(time.time() - t0, 1))
    text_out = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text_out + "\n")
        log(f"wrote {args.output}")
    print(text_out)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longmem", description="Language models with long-term memory (LongMem)")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt, optionally reading text files from memory")
    add_model_args(g)
    g.add_argument("--prompt")
    g.add_argument("--prompt-file")
    g.add_argument("--memory-file", action="append", help="text file encoded into memory first (repeatable)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int)
    g.add_argument("--json", action="store_true", help="print a JSON object instead of plain text")
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("perplexity", help="perplexity of a text file: backbone vs LongMem without/with memory")
    add_model_args(p)
    p.add_argument("file")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    p.add_argument("--output", help="also write the JSON report here")
    p.set_defaults(func=cmd_perplexity)

    d = sub.add_parser("demo", help="the main job end to end on the default backbone")
    add_model_args(d)
    d.add_argument("--corpus", help="text file for the demo (default: a bundled public-domain novel)")
    d.add_argument("--max-tokens", type=int, default=4096, help="tokens of the demo text to score")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
