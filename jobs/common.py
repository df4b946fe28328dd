"""Shared by the job entrypoints: a YAML config from jobs/configs/, overridden by --set flags.

    python jobs/build_memory.py [--config FILE] [--set job.shards=4 --set job.corpus='[a, b]'] [--address ADDR]

Values after `=` are parsed as YAML (numbers, lists, booleans). Errors a user can cause end in one
`error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `ray job submit --working-dir .` runs from the repo root, but be sure
    sys.path.insert(0, str(ROOT))

from pipelines.ray_env import prepare_torch_env  # noqa: E402

prepare_torch_env()  # before anything imports torch

CONFIGS = ROOT / "jobs" / "configs"


def load_config(stage: str, argv: list[str] | None = None) -> dict:
    import yaml

    ap = argparse.ArgumentParser(prog=f"jobs/{stage}.py", description=f"LongMem {stage} job")
    ap.add_argument("--config", default=str(CONFIGS / f"{stage}.yaml"), help="YAML config (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, dotted keys into nested maps (repeatable)")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    args = ap.parse_args(argv)
    path = Path(args.config)
    if not path.is_file():
        raise SystemExit(f"error: no config file {path}")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"error: {path} is not valid YAML: {e}") from None
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set needs KEY=VALUE, got {item!r}")
        node = config
        *parents, leaf = key.split(".")
        top = (parents or [leaf])[0]
        if top not in config:  # a misspelt path would otherwise be ignored without a word
            raise SystemExit(f"error: --set {key}: the config has no {top!r}; its top-level keys are "
                             f"{', '.join(sorted(config)) or 'none'} (e.g. --set job.train.steps=40)")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SystemExit(f"error: --set {key}: {p} is not a map in the config")
        node[leaf] = yaml.safe_load(raw)
    if args.address:
        config["address"] = args.address
    return config


def run(main) -> None:
    """Run a job's main(); user errors become one line and exit status 2."""
    from pipelines.cli import user_errors

    try:
        sys.exit(main())
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TypeError as e:  # unknown keys in a config section
        print(f"error: bad config: {e}", file=sys.stderr)
        sys.exit(2)
