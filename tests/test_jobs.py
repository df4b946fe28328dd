"""`ray job submit` against a real `ray start --head` on 127.0.0.1: the build-memory job end to end."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.ray_env import LOCAL_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A head node we start and stop ourselves (its own process group; never `ray stop`)."""
    temp = tempfile.mkdtemp(prefix="lm-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **LOCAL_ENV}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    # 4 logical CPUs on a 2-core machine: room for the encoder pool to grow (Ray schedules by logical CPUs).
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
         f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, (Path(temp) / "head.log").read_text()
            time.sleep(1)
    else:
        pytest.fail("the Ray head did not come up: " + (Path(temp) / "head.log").read_text()[-2000:])
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


def test_submitted_build_memory_job_succeeds_and_writes_memory(head, tiny_dir, austen_text, tmp_path):
    from longmem.memory.store import MemoryStore

    address, env = head
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"part{i}.txt").write_text(austen_text[i * 3000 : (i + 1) * 3000])
    out = tmp_path / "memory"
    model = json.dumps({"window": 64, "chunk_size": 4, "sink_tokens": 4})
    for _ in range(60):  # the head's job agent can take a while to come up on a busy machine
        result = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
             sys.executable, "jobs/build_memory.py", "--set", f"job.corpus=[{corpus}]", "--set", f"job.out={out}",
             "--set", f"job.backbone={tiny_dir}", "--set", "job.shards=2", "--set", f"job.model={model}",
             "--set", "job.batch_size=4"],
            env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stderr + result.stdout:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    store = MemoryStore.open(out, verify=True)
    assert len(store.shards) == 2 and store.num_chunks > 0
    assert store.spec.window == 64


def test_encoder_pool_scales_up_under_load(head, tiny_dir, austen_text, tmp_path):
    """min_actors=1, max_actors=2: with windows queued, Ray Data adds the second encoder actor."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    address, env = head
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"part{i}.txt").write_text(austen_text[i * 8000 : (i + 1) * 8000])
    client = JobSubmissionClient(address)
    model = json.dumps({"window": 64, "chunk_size": 4, "sink_tokens": 4})
    submit = client.submit_job
    for _ in range(60):  # the head's job agent can take a while to come up on a busy machine
        try:
            submit(entrypoint="true")
            break
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            time.sleep(2)
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/build_memory.py --set 'job.corpus=[{corpus}]' --set job.out={tmp_path / 'm'} "
                   f"--set job.backbone={tiny_dir} --set 'job.model={model}' --set job.batch_size=1 "
                   "--set job.min_actors=1 --set job.max_actors=2 --set job.num_cpus_per_actor=0.5",
        runtime_env={"working_dir": str(ROOT)})
    most, deadline = 0, time.time() + 600
    while time.time() < deadline:
        status = client.get_job_status(job)
        actors = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
                  if "EncodeWindows" in (a.class_name or "")]
        most = max(most, len(actors))
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.5)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    assert most == 2, f"the encoder pool never grew past {most} actor(s)"
