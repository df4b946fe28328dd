"""Cluster manifests and job configs: valid against KubeRay's CRD schemas, and everything they name exists."""

import importlib
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = {
    "raycluster.yaml": "ray.io_rayclusters.yaml",
    "rayjob-build-memory.yaml": "ray.io_rayjobs.yaml",
    "rayjob-train.yaml": "ray.io_rayjobs.yaml",
    "rayservice.yaml": "ray.io_rayservices.yaml",
}


def kubernetes_schema(node):
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema: int-or-string, and unknown fields rejected
    wherever Kubernetes would prune them (so a misspelt field fails here)."""
    if isinstance(node, list):
        return [kubernetes_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: kubernetes_schema(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.get("type") == "object" and "properties" in out and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return {k: v for k, v in out.items() if not k.startswith("x-kubernetes")}


def crd_schema(name: str) -> dict:
    crd = yaml.safe_load((CRDS / name).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = kubernetes_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def entry_files(entrypoint: str) -> list[Path]:
    return [ROOT / a for a in shlex.split(entrypoint) if a.endswith(".py")]


def check_import_path(path: str) -> None:
    module, _, attr = path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), path


@pytest.mark.parametrize("manifest, crd", MANIFESTS.items())
def test_manifest_is_valid_against_kuberay_crd(manifest, crd):
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / manifest).read_text())
    jsonschema.validate(doc, crd_schema(crd))


def test_a_misspelt_field_is_caught():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    doc["spec"]["enableInTreeAutoscalling"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, crd_schema("ray.io_rayclusters.yaml"))


def test_autoscaling_gpu_group_scales_from_zero():
    spec = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] > 0
    assert "nvidia.com/gpu" in gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    ray_up = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    assert ray_up["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert ray_up["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1


def test_entrypoints_and_import_paths_exist():
    for name in ("rayjob-build-memory.yaml", "rayjob-train.yaml"):
        job = yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())
        files = entry_files(job["spec"]["entrypoint"])
        assert files and all(f.is_file() for f in files), files
    service = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    from pipelines.serve import ServeArgs

    for app in serve_config["applications"] + local["applications"]:
        check_import_path(app["import_path"])
        ServeArgs(**app["args"])  # the args the app builder will be given are valid


def test_job_configs_build_valid_jobs():
    from longmem.config import LongMemConfig
    from pipelines.build_memory import BuildJob
    from pipelines.evaluate import EvalJob
    from pipelines.serve import ServeArgs
    from pipelines.train_sidenet import TrainJob

    from longmem.training import TrainConfig

    load = lambda name: yaml.safe_load((ROOT / "jobs" / "configs" / name).read_text())  # noqa: E731
    BuildJob(**load("build_memory.yaml")["job"]).validate()
    train = TrainJob(**load("train_sidenet.yaml")["job"])
    # The recipe is the defaults: the training job sets no model setting and no training setting
    # that differs from them.
    assert train.model.preset == "default" and train.model.overrides == {} and train.model.checkpoint is None
    assert train.model.config() == LongMemConfig()
    assert train.train_config() == TrainConfig()
    first, copy_stage = train.stages()  # one job: the second stage continues the first
    assert not first.train_config().copy_head_only and first.train_config() == TrainConfig()
    assert copy_stage.train_config().copy_head_only and copy_stage.model.checkpoint == first.out
    assert copy_stage.out == train.out and copy_stage.name == "longmem-sidenet-stage2"
    ServeArgs(**load("serve.yaml")["args"])
    job = load("evaluate.yaml")["job"]
    for task in ("perplexity", "suffix", "icl"):
        EvalJob(**{**job, "task": task}).validate()


def test_set_overrides_reach_the_config_and_a_misspelt_path_is_an_error():
    import sys

    sys.path.insert(0, str(ROOT))
    from jobs.common import load_config

    config = load_config("train_sidenet", ["--set", "job.train.steps=40", "--set", "job.model.overrides.memory.chunk_size=4"])
    assert config["job"]["train"]["steps"] == 40 and config["job"]["model"]["overrides"] == {"memory": {"chunk_size": 4}}
    from pipelines.train_sidenet import TrainJob

    assert TrainJob(**config["job"]).model.config().memory.chunk_size == 4
    with pytest.raises(SystemExit, match="the config has no 'train'; its top-level keys are job"):
        load_config("train_sidenet", ["--set", "train.steps=40"])


def test_the_service_runs_models_on_gpus_and_shares_the_data_volume_and_key_secret():
    """The RayService's app asks a GPU per model replica and keeps its CPU pieces on a CPU group;
    every pod mounts the claim pvc.yaml defines and the key secret the ingress reads, and the
    image recipe installs the package with one faiss extra."""
    from pipelines.serve import ServeArgs

    kuberay = ROOT / "cluster" / "kuberay"
    service = yaml.safe_load((kuberay / "rayservice.yaml").read_text())
    args = ServeArgs(**yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert args.model_gpus >= 1 and args.device == "auto" and args.dtype == "auto"
    assert args.sessions_path.startswith("/data/") and not args.api_keys and not args.docs
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"} and groups["cpu"]["minReplicas"] >= 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]

    claim = yaml.safe_load((kuberay / "pvc.yaml").read_text())
    secret = yaml.safe_load((kuberay / "secret-api-keys.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    assert secret["kind"] == "Secret" and "api-keys" in secret["stringData"]
    pods = [service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in groups.values()]
    for name in ("raycluster.yaml", "rayjob-build-memory.yaml", "rayjob-train.yaml"):
        spec = yaml.safe_load((kuberay / name).read_text())["spec"]
        cluster = spec.get("rayClusterSpec") or spec
        pods += [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [claim["metadata"]["name"]]
    for pod in pods[:3]:  # the service's pods read the keys from the mounted secret
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert env["LONGMEM_API_KEYS_FILE"].rsplit("/", 1)[0] in mounts
        assert any(v.get("secret", {}).get("secretName") == secret["metadata"]["name"] for v in pod["volumes"])

    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "FROM ${BASE}" in dockerfile and "rayproject/ray:2.60.0" in dockerfile
    assert 'pip install --no-cache-dir -e ".[${FAISS}]"' in dockerfile and "resolve_backbone" in dockerfile
