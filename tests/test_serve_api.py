"""The serve app's HTTP layer without a cluster: keys, closed schema pages, request normalisation."""

from fastapi.testclient import TestClient

from pipelines.serve.app import build_api, with_env_keys
from pipelines.serve.schemas import ChatRequest, ServeArgs, _normalise_chat


def test_keys_come_from_the_args_and_the_environment(monkeypatch):
    monkeypatch.delenv("LONGMEM_API_KEYS", raising=False)
    assert with_env_keys(ServeArgs(api_keys=["a"])).api_keys == ["a"]
    monkeypatch.setenv("LONGMEM_API_KEYS", "b, a,,c")
    assert with_env_keys(ServeArgs(api_keys=["a"])).api_keys == ["a", "b", "c"]
    assert with_env_keys(ServeArgs()).api_keys == ["b", "a", "c"]


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
