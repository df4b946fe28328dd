"""The serve app's HTTP layer without a cluster: keys, closed schema pages, request normalisation."""

import pytest
from fastapi.testclient import TestClient

from pipelines.serve.app import build_api, with_env_keys
from pipelines.serve.schemas import ChatRequest, ServeArgs, _normalise_chat


def test_keys_come_from_the_args_and_the_environment(monkeypatch):
    monkeypatch.delenv("LONGMEM_API_KEYS", raising=False)
    assert with_env_keys(ServeArgs(api_keys=["a"])).api_keys == ["a"]
    monkeypatch.setenv("LONGMEM_API_KEYS", "b, a,,c")
    assert with_env_keys(ServeArgs(api_keys=["a"])).api_keys == ["a", "b", "c"]
    assert with_env_keys(ServeArgs()).api_keys == ["b", "a", "c"]


def test_a_built_application_carries_key_hashes_never_keys(monkeypatch, tmp_path):
    """What a deployed config shows (its deployments' arguments) holds no key, wherever the keys
    came from: the arguments, LONGMEM_API_KEYS or a key file; and the hashes open the routes."""
    import json

    from pipelines.serve.app import app_builder, key_hash

    secret = tmp_path / "keys"
    secret.write_text("# one per line\nfrom-file\n")
    monkeypatch.setenv("LONGMEM_API_KEYS", "from-env")
    app = app_builder({"api_keys": ["from-args"], "api_keys_file": str(secret)})
    shown = json.dumps(app._bound_deployment.init_args[1])
    assert not any(k in shown for k in ("from-args", "from-env", "from-file"))
    bound = ServeArgs(**app._bound_deployment.init_args[1])
    assert set(bound.api_key_hashes) == {key_hash(k) for k in ("from-args", "from-env", "from-file")}
    monkeypatch.delenv("LONGMEM_API_KEYS")
    client = TestClient(build_api(None, bound), raise_server_exceptions=False)  # no model behind it: past auth, 500
    assert client.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 500
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_a_missing_or_empty_key_file_is_a_clear_error(tmp_path):
    import pytest

    from pipelines.serve.schemas import ServeError

    (tmp_path / "empty").write_text("\n")
    for path in (tmp_path / "absent", tmp_path / "empty"):
        with pytest.raises(ServeError, match="API key file"):
            with_env_keys(ServeArgs(api_keys_file=str(path)))


def test_schema_pages_can_be_turned_off_and_devices_resolve_on_a_cpu_machine(monkeypatch):
    import pytest
    import torch
    from pydantic import ValidationError

    from longmem.model import InputError

    assert TestClient(build_api(None, ServeArgs(docs=False))).get("/openapi.json").status_code == 404
    args = ServeArgs()
    assert args.resolved_device() == "cpu"
    # dtype auto: bfloat16 where the CPU multiplies bfloat16 natively, else the model's float32
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert args.resolved_dtype("cpu") == ("bfloat16" if native else "float32")
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    assert args.resolved_dtype("cpu") == "float32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert args.resolved_dtype("cpu") == "bfloat16"
    assert ServeArgs(dtype="float32").resolved_dtype("cpu") == "float32"
    assert ServeArgs(dtype="bfloat16").resolved_dtype("cpu") == "bfloat16"
    with pytest.raises(InputError, match="sees no GPU"):
        ServeArgs(device="cuda").resolved_device()
    with pytest.raises(ValidationError):
        ServeArgs(device="tpu")


def test_with_keys_every_route_but_health_is_closed_including_the_schema_pages():
    closed = TestClient(build_api(None, ServeArgs(api_keys=["k"])))
    assert closed.get("/healthz").status_code == 200
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert closed.get(path).status_code == 404, path
    assert closed.get("/v1/models").status_code == 401
    assert closed.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
    open_ = TestClient(build_api(None, ServeArgs()))
    assert open_.get("/openapi.json").status_code == 200
    assert "/v1/chat/completions" in open_.get("/openapi.json").json()["paths"]


def test_chat_requests_normalise_to_the_template_messages():
    req = ChatRequest(messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}],
                      max_completion_tokens=7, stream=True, stream_options={"include_usage": True}, temperature=0)
    out = _normalise_chat(req)
    assert out["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert (out["max_tokens"], out["include_usage"], out["temperature"]) == (7, True, 0.0)
    assert _normalise_chat(ChatRequest(messages=[{"role": "user", "content": "x"}]))["max_tokens"] is None  # the server's


def _request(**kw):
    return {"prompt": "It is a truth universally acknowledged", "max_tokens": 2, "temperature": 0.0, "top_p": 1.0,
            "stop": [], "seed": None, "memory": [], "session": None, "owner": "anonymous", **kw}


def test_a_stream_closed_early_stops_its_generation_and_frees_the_replica(tiny_dir):
    """The model deployment's class itself (no cluster): a client that drops a long stream after its
    first piece frees the replica at the next decode step; the next request does not wait for the
    abandoned generation to run to its end."""
    import asyncio

    from pipelines.serve.model_server import LongMemServer

    args = ServeArgs(model={"backbone": str(tiny_dir), "overrides": {"memory.window": 64, "memory.capacity_tokens": 256}},
                     max_new_tokens=400)
    server = LongMemServer.func_or_class(args.model_dump(), {})
    server.model.tokenizer.eos_token_id = None  # a random model may end early: here it must run long
    server.engine.decoder.eos = None

    async def drop_then_ask():
        stream = server.complete_stream(_request(max_tokens=400))
        assert "text" in await stream.__anext__()
        await stream.aclose()
        return await server.complete(_request())

    second = asyncio.run(drop_then_ask())
    assert second["completion_tokens"] == 2
    stats = server.engine.stats()
    assert stats["finished"]["cancelled"] == 1 and stats["finished"]["length"] == 1
    assert stats["tokens"] < 400  # the abandoned row stopped where the client left


def test_a_full_model_queue_is_a_503_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    class Busy:  # a model handle whose queue is full, as Serve reports it
        class complete:
            @staticmethod
            def remote(_req):
                raise BackPressureError(num_queued_requests=64, max_queued_requests=64)

    client = TestClient(build_api(Busy, ServeArgs()))
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert "retry" in r.json()["error"]["message"]


def test_a_token_quota_admits_under_its_limit_and_says_when_to_retry():
    from pipelines.serve.quota import TokenQuota
    from pipelines.serve.schemas import ServeError

    now = [1000.0]
    quota = TokenQuota(per_minute=100, clock=lambda: now[0])
    first = quota.admit("a", reserve=64)  # a reservation counts until it settles
    assert quota.used("a") == 64
    first.settle(30)
    assert quota.used("a") == 30 and quota.used("b") == 0
    now[0] += 20
    quota.admit("a", reserve=80).settle(75)  # admitted at 30 < 100; the count may pass the limit
    with pytest.raises(ServeError) as refused:
        quota.admit("a", reserve=1)
    assert refused.value.status == 429 and "105 tokens" in refused.value.message
    assert refused.value.retry_after == 40  # when the first 30 leave the window, 75 < 100 is left
    quota.admit("b", reserve=1)  # another key is not touched
    now[0] += 40
    quota.admit("a", reserve=1)
    assert quota.used("a") == 76
    with pytest.raises(ValueError):
        TokenQuota(per_minute=0)


def test_each_shard_deployment_scales_on_its_own_and_spreads_over_nodes(tmp_path):
    """Shard deployments take a replica count or their own autoscaling config, and a cap of
    replicas per node; the model deployment's settings stay its own."""
    import torch

    from conftest import tiny_longmem
    from longmem.memory.encoder import MemoryEncoder, write_memory_dir
    from pipelines.serve.app import app_builder

    model = tiny_longmem("llama")
    write_memory_dir(tmp_path / "m", MemoryEncoder(model), [("d", torch.arange(200) % 100)], shards=2)

    def shard_deployments(**args):
        app = app_builder({"memories": {"m": str(tmp_path / "m")}, "replica_search_tokens": 0, **args})
        return [s._bound_deployment for s in app._bound_deployment.init_args[0]._bound_deployment.init_args[1]["m"]]

    fixed = shard_deployments(shard_replicas=3)
    assert len(fixed) == 2 and all(d._deployment_config.num_replicas == 3 for d in fixed)
    scaled = shard_deployments(shard_autoscaling={"min_replicas": 1, "max_replicas": 4}, shard_max_replicas_per_node=1)
    assert all(d._deployment_config.autoscaling_config.max_replicas == 4 for d in scaled)
    assert all(d._replica_config.max_replicas_per_node == 1 for d in scaled)
    # a memory at or below replica_search_tokens gets no shard deployment: the model replica searches it
    assert shard_deployments(replica_search_tokens=200) == [] and len(shard_deployments(replica_search_tokens=199)) == 2
