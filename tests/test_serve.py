"""Ray Serve endpoint on a real local Ray, over real HTTP on 127.0.0.1."""

import json
import time

import httpx
import numpy as np
import pytest
import torch

from conftest import longmem_on
from pipelines.ray_env import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The defaults in chunks of 4 (a small index), with plain layer copies so that memory acts at step 0.
SETTINGS = dict(memory__window=64, memory__chunk_size=4, memory__capacity_tokens=2048, sidenet__init="paper")
SERVED = {}  # what the served fixture built: the model and its memory folders
KEY1, KEY2 = "key-one", "key-two"


@pytest.fixture(scope="module")
def served(ray_local, tiny_dir, tmp_path_factory, austen_text):
    from ray import serve

    from longmem.memory.encoder import MemoryEncoder, write_memory_dir
    from pipelines.serve import app_builder

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = longmem_on(str(tiny_dir), **SETTINGS)
    model.save_pretrained(root / "ckpt")
    docs = []
    for i in range(3):
        text = austen_text[i * 3000 : (i + 1) * 3000]
        docs.append((f"doc{i}", model.encode(text)[0].numpy()))
    for shards in (1, 3):
        write_memory_dir(root / f"mem{shards}", MemoryEncoder(model), docs, shards=shards)
    SERVED.update(model=model, root=root, docs=docs)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": {"checkpoint": str(root / "ckpt")}, "memories": {"one": str(root / "mem1"), "three": str(root / "mem3")},
            "api_keys": [KEY1, KEY2], "model_cpus": 0.5, "shard_cpus": 0.1, "ingress_cpus": 0.1,
            "max_prompt_tokens": 300, "max_new_tokens": 64, "max_document_bytes": 20_000,
            "sessions_path": str(root / "sessions"),
            # every memory through shard replicas here, however small (the two-replica app below
            # searches its memory inside the model replica, the default for small memories)
            "replica_search_tokens": 0,
            # float32, not the CPU's auto bfloat16: batched and one-at-a-time decoding are equal only
            # up to rounding, and bfloat16's flips this random model's near-tied greedy choices
            "dtype": "float32"}
    serve.run(app_builder(args), name="longmem-test", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY1}"}, timeout=120)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield client, base, austen_text
    client.close()
    serve.delete("longmem-test")


def complete(client, **body):
    body = {"prompt": "It is a truth universally", "max_tokens": 12, "temperature": 0, **body}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_with_and_without_memory_and_sharding_changes_nothing(served):
    client, _, _ = served
    plain = complete(client)
    assert plain["object"] == "text_completion" and plain["choices"][0]["finish_reason"] in ("length", "stop")
    assert plain["usage"]["completion_tokens"] > 0
    one = complete(client, memory="one")
    three = complete(client, memory=["three"])
    assert one["choices"][0]["text"] == three["choices"][0]["text"]
    models = client.get("/v1/models").json()
    memories = {m["name"]: m for m in models["data"][0]["memories"]}
    assert memories["one"]["shards"] == 1 and memories["three"]["shards"] == 3
    assert memories["one"]["chunks"] == memories["three"]["chunks"] > 0


def test_streaming_equals_plain(served):
    client, _, _ = served
    plain = complete(client, memory="one", max_tokens=20)["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={"prompt": "It is a truth universally", "max_tokens": 20,
                                                        "temperature": 0, "memory": "one", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_session_memory_lifecycle_and_isolation(served):
    client, base, text = served
    session = client.post("/v1/memories").json()
    sid = session["id"]
    assert session["tokens_in_memory"] == 0
    info = client.post(f"/v1/memories/{sid}/documents", json={"text": text[5000:7000]}).json()
    assert info["documents"] == 1 and info["tokens_in_memory"] > 0
    assert client.get(f"/v1/memories/{sid}").json()["tokens_added"] == info["tokens_added"]
    complete(client, session=sid)
    other = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY2}"}, timeout=60)
    assert other.get(f"/v1/memories/{sid}").status_code == 404
    assert other.post(f"/v1/memories/{sid}/documents", json={"text": "mine now"}).status_code == 404
    assert other.delete(f"/v1/memories/{sid}").status_code == 404
    assert other.post("/v1/completions", json={"prompt": "Hi", "session": sid}).status_code == 404
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.post(f"{base}/v1/memories", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.delete(f"/v1/memories/{sid}").json()["deleted"] is True
    assert client.get(f"/v1/memories/{sid}").status_code == 404
    short = client.post("/v1/memories").json()["id"]  # every token of a short document reaches memory
    info = client.post(f"/v1/memories/{short}/documents", json={"text": "The vault code is 5521, said Anne."}).json()
    assert info["tokens_in_memory"] == info["tokens_added"] // 4 * 4  # whole chunks of 4


@pytest.mark.parametrize("send, status", [
    (dict(content=b"{not json"), 400),
    (dict(content=b'{"prompt": "caf\xe9"}'), 400),  # invalid UTF-8
    (dict(json={"prompt": 5}), 400),
    (dict(json={"prompt": ""}), 400),
    (dict(json={"prompt": "Hi", "max_tokens": 0}), 400),
    (dict(json={"prompt": "Hi", "max_tokens": 10_000}), 400),
    (dict(json={"prompt": "Hi", "max_tokens": "3"}), 400),
    (dict(json={"prompt": "Hi", "temperature": -1}), 400),
    (dict(json={"prompt": "word " * 400}), 400),  # longer than max_prompt_tokens
    (dict(json={"prompt": "Hi", "memory": "nope"}), 404),
    (dict(json={"prompt": "Hi", "session": "mem-nope"}), 404),
    (dict(json={"prompt": "Hi", "model": "gpt-4"}), 404),
    (dict(json={"prompt": "Hi", "surprise": 1}), 400),
    (dict(json={"prompt": "Hi", "frequency_penalty": 1.0}), 400),  # a known field at an unsupported value
    (dict(json={"prompt": "Hi", "echo": True}), 400),
])
def test_bad_completion_requests_answer_4xx_and_service_keeps_serving(served, send, status):
    client, _, _ = served
    r = client.post("/v1/completions", headers={"content-type": "application/json"}, **send)
    assert r.status_code == status, r.text
    assert "error" in r.json() and r.json()["error"]["message"]
    complete(client, max_tokens=2)


def test_bad_documents_answer_4xx(served):
    client, _, _ = served
    sid = client.post("/v1/memories").json()["id"]
    assert client.post(f"/v1/memories/{sid}/documents", json={"text": "x" * 30_000}).status_code == 413
    assert client.post(f"/v1/memories/{sid}/documents", content=b'{"text": "\xff\xfe"}').status_code == 400
    assert client.post(f"/v1/memories/{sid}/documents", json={"text": "   "}).status_code == 400
    assert client.post(f"/v1/memories/{sid}/documents", json={"words": "hi"}).status_code == 400
    assert client.post("/v1/memories/mem-missing/documents", json={"text": "hi"}).status_code == 404
    assert client.post(f"/v1/memories/{sid}/documents", json={"text": "Fine text."}).status_code == 200


def test_openai_client_plain_and_streaming(served):
    from openai import OpenAI

    _, base, _ = served
    client = OpenAI(base_url=f"{base}/v1", api_key=KEY1)
    plain = client.completions.create(model="longmem", prompt="It is a truth", max_tokens=8, temperature=0,
                                      extra_body={"memory": "one"})
    text = plain.choices[0].text
    assert plain.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="longmem", prompt="It is a truth", max_tokens=8, temperature=0, stream=True,
        extra_body={"memory": "one"}))
    assert streamed == text


def test_chat_completions_use_the_chat_template_stream_and_read_memory(served):
    """/v1/chat/completions: the reply is the completion of the tokenizer's chat template (what
    /v1/completions answers for that prompt), streamed as chat.completion.chunk deltas."""
    from openai import OpenAI

    client, base, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Anne?"}]
    prompt = SERVED["model"].tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0,
                                                  "memory": "three", "presence_penalty": 0, "frequency_penalty": 0,
                                                  "logprobs": False, "user": "u1", "seed": 3, "n": 1})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    text = reply["choices"][0]["message"]["content"]
    assert text == complete(client, prompt=prompt, max_tokens=8, memory="three")["choices"][0]["text"]
    assert reply["usage"]["prompt_tokens"] == len(SERVED["model"].tokenizer(prompt, add_special_tokens=False).input_ids)

    openai = OpenAI(base_url=f"{base}/v1", api_key=KEY1)
    chunks = list(openai.chat.completions.create(model="longmem", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"memory": "three"}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply["usage"]["completion_tokens"]
    assert all(c.object == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "messages is empty"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role must be one of"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "the last message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "only text parts"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs are not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n must be 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "max_completion_tokens": 5}, "disagree"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10_000}, "exceeds the limit"),
])
def test_bad_chat_requests_are_clear_400s(served, body, message):
    client, _, _ = served
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def shard_replicas(name: str) -> list[dict]:
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if name in a["name"]]


def test_killed_shard_replica_is_replaced_and_requests_resume(served):
    import ray

    client, _, _ = served
    before = complete(client, memory="three")["choices"][0]["text"]
    victims = shard_replicas("MemoryShard-three-1")
    assert len(victims) == 1, victims
    ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
    deadline, after, replaced = time.time() + 180, None, False
    while time.time() < deadline and not (after and replaced):
        r = client.post("/v1/completions", json={"prompt": "It is a truth universally", "max_tokens": 12,
                                                 "temperature": 0, "memory": "three"})
        if r.status_code == 200:
            after = r.json()["choices"][0]["text"]
        now = shard_replicas("MemoryShard-three-1")
        replaced = len(now) == 1 and now[0]["name"] != victims[0]["name"]
        time.sleep(1)
    assert replaced, "the killed shard replica was not replaced"
    assert after == before


def test_remote_shards_are_a_memory_that_searches_like_the_store(served):
    """The serving layer's remote shards keep the one memory contract, and return exactly what the
    on-disk store (and a store read through CombinedMemory) returns for the same queries."""
    from ray import serve

    from longmem.memory import CombinedMemory, Memory
    from longmem.memory.store import MemoryStore
    from pipelines.serve.shard_server import LocalMemory, RemoteMemory

    root = SERVED["root"]
    handles = [serve.get_deployment_handle(f"MemoryShard-three-{i}", app_name="longmem-test") for i in range(3)]
    remote = RemoteMemory("three", str(root / "mem3"), handles)
    local = LocalMemory("three", str(root / "mem3"))  # what a model replica searches itself
    store = MemoryStore.open(root / "mem3")
    assert isinstance(remote, Memory) and isinstance(local, Memory) and isinstance(store, Memory)
    adapter = SERVED["model"].adapter
    queries = torch.randn(1, 6, adapter.num_kv_heads, adapter.head_dim, generator=torch.Generator().manual_seed(3))
    a, b = remote.search(queries, 8, with_next=True), store.search(queries, 8, with_next=True)
    c = CombinedMemory(None, [store]).search(queries, 8, with_next=True)
    d = CombinedMemory(None, [local]).submit(queries, 8, with_next=True)()  # searched on its helper thread
    for name in ("keys", "values", "scores", "slots", "positions", "token_ids", "next_values", "next_mask",
                 "prev_token_ids", "next_token_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(getattr(c, name), getattr(b, name)), name
        assert torch.equal(getattr(d, name), getattr(b, name)), name
    assert local.info()["bytes_received_per_query_token"] == 0
    # Each replica that searches a built memory reads its files into the page cache as it starts.
    local.prewarm.thread.join(timeout=60)
    files = [p for shard in store.shards for tier in shard.search_files() for p in tier]
    assert local.info()["prewarm"] == "done"
    assert local.info()["prewarmed_bytes"] == sum(p.stat().st_size for p in files)
    shard_info = handles[0].info.remote().result()
    assert shard_info["prewarm"] == "done" and shard_info["prewarmed_bytes"] > 0
    remote.check_model(SERVED["model"].memory_spec)
    # Lean replies: each shard sends its scores and rows, and only the winners' keys, values and
    # neighbours come back, in the memory's dtype (not a full top-k of every shard).
    Hq, k, D, c = queries.shape[2], 8, adapter.head_dim, store.spec.chunk_size
    size = np.dtype(store.shards[0].keys.dtype).itemsize
    winners = Hq * k * ((2 * c + 1) * D * size + 8 + 4 * c + 4 + 4 + 2)  # keys, values, next value; position, ids, flags
    per_token = remote.info()["bytes_received_per_query_token"]
    assert per_token == 3 * Hq * k * (4 + 4) + winners, per_token


def test_a_deployment_that_overrides_a_trained_setting_is_refused(served):
    from longmem.config import ConfigError
    from pipelines.serve import app_builder

    with pytest.raises(ConfigError, match="read.mode comes from the checkpoint's weights"):
        app_builder({"model": {"checkpoint": str(SERVED["root"] / "ckpt"), "overrides": {"read.mode": "attend"}}})


def test_concurrent_requests_decode_in_one_batch_and_equal_one_at_a_time(served):
    """Eight clients at once, over HTTP, with different prompts, lengths and memories: the replica
    decodes them together (its observed batch size reaches 8) and each gets the greedy text it
    gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    client, base, text = served
    bodies = [{"prompt": text[4000 + 300 * i : 4000 + 300 * i + 40 + 60 * i], "max_tokens": 40 + 3 * i,
               "temperature": 0, **({"memory": "three"} if i % 2 else {})} for i in range(8)]
    alone = [complete(client, **b)["choices"][0]["text"] for b in bodies]
    handle = serve.get_deployment_handle("LongMemServer", "longmem-test")
    before = handle.describe.remote().result()["batching"]

    def ask(body):
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY2}"}, timeout=120) as c:
            return complete(c, **body)["choices"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, bodies))
    after = handle.describe.remote().result()["batching"]
    assert together == alone
    assert after["max_batch"] == 8 and before["max_batch"] < 8
    assert after["finished"]["error"] == 0


def test_two_replicas_serve_a_session_and_killed_replicas_lose_none_of_it(served):
    """Two model replicas share the sessions path: 50 requests on one session all find it, and
    after both replicas are killed and replaced the session and its document are still there.
    Their built memory is small, so each replica searches it itself (no shard deployments), and
    answers as the shard replicas do."""
    import ray
    from ray import serve

    from pipelines.serve import app_builder

    first, base, text = served
    root = SERVED["root"]
    args = {"model": {"checkpoint": str(root / "ckpt")}, "api_keys": [KEY1], "model_replicas": 2,
            "model_cpus": 0.4, "ingress_cpus": 0.1, "max_new_tokens": 16, "sessions_path": str(root / "sessions"),
            "memories": {"three": str(root / "mem3")}, "dtype": "float32"}
    serve.run(app_builder(args), name="longmem-two", route_prefix="/two", blocking=False)
    client = httpx.Client(base_url=f"{base}/two", headers={"Authorization": f"Bearer {KEY1}"}, timeout=120)
    try:
        assert not [a for a in shard_replicas("MemoryShard") if "longmem-two" in a["name"]]
        text_of = lambda c: complete(c, memory="three")["choices"][0]["text"]  # noqa: E731
        assert text_of(client) == text_of(first)
        described = serve.get_deployment_handle("LongMemServer", "longmem-two").describe.remote().result()
        assert described["memories"][0]["searched_in"] == "model replica"
        sid = client.post("/v1/memories").json()["id"]
        info = client.post(f"/v1/memories/{sid}/documents", json={"text": text[9000:10500]}).json()
        body = {"prompt": text[10500:10600], "max_tokens": 6, "temperature": 0, "session": sid}
        statuses = [client.post("/v1/completions", json=body).status_code for _ in range(50)]
        assert statuses == [200] * 50
        before = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        victims = [a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "longmem-two" in a["name"] and "LongMemServer" in a["name"]]
        assert len(victims) == 2, victims
        for v in victims:
            ray.kill(ray.get_actor(v["name"], namespace=v["namespace"]), no_restart=True)
        deadline, after = time.time() + 240, None
        while time.time() < deadline and after is None:
            try:
                r = client.get(f"/v1/memories/{sid}")
                if r.status_code == 200:
                    after = r.json()
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert after is not None, "the replaced replicas did not serve the session"
        assert after["documents"] == 1 and after["tokens_added"] == info["tokens_added"]
        assert after["tokens_in_memory"] == info["tokens_in_memory"]
        again = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert again == before
    finally:
        client.close()
        serve.delete("longmem-two")


def test_session_quotas_are_per_key_and_never_evict_another_keys_memory(served):
    """A key at its quota is refused a new session (429); the other key's sessions stay, however
    many sessions exist."""
    client, base, _ = served
    other = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY2}"}, timeout=60)
    mine = client.post("/v1/memories").json()["id"]
    client.post(f"/v1/memories/{mine}/documents", json={"text": "The lighthouse keeper's code is 4471."})
    made = []
    while True:
        r = other.post("/v1/memories")
        if r.status_code != 200:
            break
        made.append(r.json()["id"])
    assert r.status_code == 429 and "delete one" in r.json()["error"]["message"]
    assert 0 < len(made) <= 16
    assert client.get(f"/v1/memories/{mine}").json()["documents"] == 1  # nobody's session was dropped
    for sid in made:
        assert other.delete(f"/v1/memories/{sid}").status_code == 200
    assert other.post("/v1/memories").status_code == 200


def test_a_keys_token_quota_refuses_with_retry_after_and_leaves_other_keys_alone(served):
    """tokens_per_minute_per_key: a key's completions and documents count against its minute;
    past the limit, 429 with Retry-After; the other key is still served."""
    from ray import serve

    from pipelines.serve import app_builder

    _, base, text = served
    root = SERVED["root"]
    limit = 60
    args = {"model": {"checkpoint": str(root / "ckpt")}, "api_keys": [KEY1, KEY2], "model_cpus": 0.3,
            "ingress_cpus": 0.1, "max_new_tokens": 16, "sessions_path": str(root / "sessions"), "dtype": "float32",
            "tokens_per_minute_per_key": limit}
    serve.run(app_builder(args), name="longmem-quota", route_prefix="/quota", blocking=False)
    one = httpx.Client(base_url=f"{base}/quota", headers={"Authorization": f"Bearer {KEY1}"}, timeout=120)
    two = httpx.Client(base_url=f"{base}/quota", headers={"Authorization": f"Bearer {KEY2}"}, timeout=120)
    try:
        body = {"prompt": text[:40], "max_tokens": 8, "temperature": 0}
        spent = []
        while True:
            r = one.post("/v1/completions", json=body)
            if r.status_code != 200:
                break
            spent.append(r.json()["usage"]["total_tokens"])
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert sum(spent[:-1]) < limit <= sum(spent)  # admitted while under the limit, refused once over it
        assert two.post("/v1/completions", json=body).status_code == 200  # the other key's minute is its own

        sid = two.post("/v1/memories").json()["id"]
        doc = two.post(f"/v1/memories/{sid}/documents", json={"text": text[2000:2600]}).json()
        assert doc["document_tokens"] >= limit
        refused = two.post(f"/v1/memories/{sid}/documents", json={"text": "One more line."})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert two.post("/v1/completions", json=body).status_code == 429
        assert two.delete(f"/v1/memories/{sid}").status_code == 200  # deleting is never refused
    finally:
        one.close()
        two.close()
        serve.delete("longmem-quota")


def test_schemathesis_finds_no_server_error_and_no_undeclared_response(served):
    """A bounded property-based run over the OpenAPI schema, against the live endpoint: no 5xx,
    every status code, content type and body the routes give is one the schema declares."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    from pipelines.serve.app import build_api
    from pipelines.serve.schemas import ServeArgs
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

    _, base, _ = served
    # The live endpoint has keys, so its schema page is closed: the same routes' schema, built here.
    spec = build_api(None, ServeArgs()).openapi()
    schema = schemathesis.openapi.from_dict(spec)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures, calls = [], [0]
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case):
            calls[0] += 1
            response = case.call(base_url=base, headers={"Authorization": f"Bearer {KEY1}"}, timeout=120)
            try:
                case.validate_response(response, checks=checks)
            except Exception as e:  # noqa: BLE001 - every finding is collected, then reported together
                failures.append(f"{op.method.upper()} {op.path} -> {response.status_code}: {str(e)[:300]}")

        run()
    assert calls[0] > 50
    assert not failures, "\n".join(dict.fromkeys(failures))
