"""`ray job submit` against a real `ray start --head` on 127.0.0.1: the build-memory job end to end."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.ray_env import LOCAL_ENV, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def wait_for_job_agent(address: str, seconds: float = 120) -> None:
    """The dashboard answers before the head's job agent does; a busy machine widens the gap."""
    from ray.job_submission import JobSubmissionClient

    client, deadline = JobSubmissionClient(address), time.time() + seconds
    while True:
        try:
            client.submit_job(entrypoint="true")
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


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
         # Every port of our own: another Ray on this machine (the tests' embedded one) holds the defaults.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
         f"--object-manager-port={free_port()}",
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
    wait_for_job_agent(address)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


MODEL = json.dumps({"memory.window": 64, "memory.chunk_size": 4, "memory.sink_tokens": 4})  # a small memory layout, quick to build


def write_corpus(tmp_path, text: str, parts: int, chars: int) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(parts):
        (corpus / f"part{i}.txt").write_text(text[i * chars : (i + 1) * chars])
    return corpus


def test_submitted_build_memory_job_succeeds_and_writes_memory(head, tiny_dir, austen_text, tmp_path):
    from longmem.memory.store import MemoryStore

    address, env = head
    corpus = write_corpus(tmp_path, austen_text, parts=2, chars=3000)
    out = tmp_path / "memory"
    result = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         sys.executable, "jobs/build_memory.py", "--set", f"job.corpus=[{corpus}]", "--set", f"job.out={out}",
         "--set", f"job.model.backbone={tiny_dir}", "--set", "job.shards=2", "--set", f"job.model.overrides={MODEL}",
         "--set", "job.batch_size=4"],
        env=env, capture_output=True, text=True, timeout=600)
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
    corpus = write_corpus(tmp_path, austen_text, parts=12, chars=8000)
    client = JobSubmissionClient(address)
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/build_memory.py --set 'job.corpus=[{corpus}]' --set job.out={tmp_path / 'm'} "
                   f"--set job.model.backbone={tiny_dir} --set 'job.model.overrides={MODEL}' --set job.batch_size=1 "
                   "--set job.min_actors=1 --set job.max_actors=2 --set job.num_cpus_per_actor=0.5",
        runtime_env={"working_dir": str(ROOT)})
    def encoders():
        return {a.actor_id: a.state for a in list_actors(address=address, raise_on_missing_output=False, limit=1000)
                if "EncodeWindows" in (a.class_name or "")}

    before = set(encoders())
    grown, deadline = set(), time.time() + 600
    while time.time() < deadline:
        status = client.get_job_status(job)
        # An actor the pool asked for counts once it exists (pending creation or alive): on a
        # cluster a pending actor is what makes the autoscaler add a node.
        grown |= {i for i, state in encoders().items() if i not in before and state != "DEAD"}
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.5)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    assert len(grown) == 2, f"the encoder pool had {len(grown)} actor(s); it should grow from 1 to 2"
