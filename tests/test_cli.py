"""The `longmem` command as a user runs it: a real process, real files, the real backbone."""

import json
import subprocess
import sys

import pytest

from conftest import longmem_on

pytestmark = pytest.mark.slow


def longmem(*args, timeout=300):
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory, austen_text):
    path = tmp_path_factory.mktemp("text") / "excerpt.txt"
    path.write_text(austen_text[50_000:56_000])
    return path


def test_perplexity_command(excerpt, tmp_path):
    out_file = tmp_path / "ppl.json"
    code, stdout, stderr = longmem("perplexity", str(excerpt), "--window", "256", "--output", str(out_file))
    assert code == 0, stderr
    report = json.loads(out_file.read_text())
    assert json.loads(stdout) == report
    assert report["window"] == 256 and report["scored_tokens"] > 1000
    ppl = report["perplexity"]
    assert ppl["backbone"] == pytest.approx(ppl["longmem_no_memory"], rel=1e-6)  # fresh zero-init SideNet
    assert "segment" in stderr  # progress is shown


def test_generate_command_with_memory(excerpt):
    code, stdout, stderr = longmem("generate", "--prompt", "Captain Wentworth", "--memory-file", str(excerpt),
                                   "--max-tokens", "8", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["memory_tokens"] > 1000 and 0 < result["completion_tokens"] <= 8
    assert result["finish_reason"] in ("length", "stop", "eos") and result["text"]


def test_bad_input_gets_one_clear_line(tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        (("perplexity", str(tmp_path / "missing.txt")), "no such file"),
        (("perplexity", str(binary)), "binary"),
        (("perplexity", str(latin)), "not valid UTF-8"),
        (("perplexity", str(empty)), "empty"),
        (("generate", "--prompt", "hi", "--max-tokens", "0"), "--max-tokens must be positive"),
        (("generate",), "give a prompt"),
        (("generate", "--prompt", "hi", "--checkpoint", str(tmp_path)), "not a LongMem checkpoint"),
        (("perplexity", str(latin), "--backbone", str(tmp_path / "nope")), "not valid UTF-8"),
        (("generate", "--prompt", "hi", "--backbone", str(tmp_path / "nope")), "cannot load backbone"),
        (("generate", "--prompt", "hi", "--window", "30", "--set", "memory.chunk_size=4"),
         "memory.window 30 must be a multiple of memory.chunk_size 4"),
        (("generate", "--prompt", "hi", "--set", "window=64"), "did you mean 'memory.window'"),
        (("generate", "--prompt", "hi", "--preset", "paper", "--set", "read.copy_init=-6"), "needs read.mode='next'"),
    ]
    for args, message in cases:
        code, stdout, stderr = longmem(*args)
        assert code == 2, (args, stderr)
        assert message in stderr, (args, stderr)
        assert "Traceback" not in stderr, (args, stderr)


def test_trace_command_shows_reads_what_followed_them_and_the_copy_gate(tiny_dir, excerpt, tmp_path):
    checkpoint = tmp_path / "ckpt"
    longmem_on(str(tiny_dir), memory__window=64, memory__retrieve_tokens=8, sidenet__init="paper", read__copy_init=-2.0,
               memory__dtype="float32").save_pretrained(checkpoint)
    text = excerpt.read_text()
    code, stdout, stderr = longmem("trace", "--checkpoint", str(checkpoint), "--memory-file", str(excerpt),
                                   "--text", text[1000:1300], "--top", "2")
    assert code == 0, stderr
    assert "head 0: gate" in stdout and " -> " in stdout  # what followed each retrieved token
    assert "copy gate" in stdout and "model alone:" in stdout and "copy:" in stdout
    code, stdout, _ = longmem("trace", "--checkpoint", str(checkpoint), "--memory-file", str(excerpt),
                              "--text", text[1000:1300], "--json")
    trace = json.loads(stdout)
    assert 0 < trace["copy"]["gate"] < 1 and trace["memory_tokens"] > 1000


def test_settings_a_checkpoint_fixes_are_refused_and_train_never_overwrites_other_files(tiny_dir, excerpt, tmp_path):
    """The one loader's rule from the command line: on a checkpoint only memory settings no weight
    depends on may change. And `train --out` refuses a folder that holds anything but a checkpoint,
    before any work starts, leaving it as it was."""
    checkpoint = tmp_path / "ckpt"
    longmem_on(str(tiny_dir), memory__window=64, memory__dtype="float32").save_pretrained(checkpoint)
    code, _, stderr = longmem("generate", "--prompt", "hi", "--checkpoint", str(checkpoint), "--set", "read.mode=attend")
    assert code == 2 and "read.mode comes from the checkpoint's weights" in stderr and "Traceback" not in stderr
    code, stdout, stderr = longmem("generate", "--prompt", "Anne", "--checkpoint", str(checkpoint), "--max-tokens", "2",
                                   "--set", "memory.capacity_tokens=512", "--json")
    assert code == 0, stderr

    precious = tmp_path / "mine"
    (precious / "sub").mkdir(parents=True)
    (precious / "precious.txt").write_text("keep me")
    (precious / "sub" / "notes.txt").write_text("and me")
    code, _, stderr = longmem("train", "--corpus", str(excerpt), "--out", str(precious), "--backbone", str(tiny_dir),
                              "--steps", "1")
    assert code == 2 and "not a LongMem checkpoint" in stderr and "Traceback" not in stderr
    assert (precious / "precious.txt").read_text() == "keep me" and (precious / "sub" / "notes.txt").read_text() == "and me"
