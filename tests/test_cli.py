"""The `longmem` command as a user runs it: a real process, real files, the real backbone."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def longmem(*args, timeout=300):
    result = subprocess.run([sys.executable, "-m", "longmem.cli", *args], capture_output=True, text=True, timeout=timeout)
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
        (("generate", "--prompt", "hi", "--window", "30"), "must divide the local window"),
    ]
    for args, message in cases:
        code, stdout, stderr = longmem(*args)
        assert code == 2, (args, stderr)
        assert message in stderr, (args, stderr)
        assert "Traceback" not in stderr, (args, stderr)


def test_trace_command_shows_reads_what_followed_them_and_the_copy_gate(tiny_dir, excerpt, tmp_path):
    from longmem.model import LongMem

    checkpoint = tmp_path / "ckpt"
    LongMem.from_backbone(str(tiny_dir), window=64, chunk_size=1, retrieve_tokens=8, side_init="paper",
                          memory_read="next", retrieval_query="backbone_key", retrieval_metric="cosine",
                          memory_scale_init=0.0, memory_copy_init=-2.0, memory_copy_match_init=4.0,
                          memory_dtype="float32").save_pretrained(checkpoint)
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
