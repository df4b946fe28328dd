"""The serve app and its routes: the FastAPI ingress, `app_builder` and `run_local`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

# build_api's routes name these in their annotations: they must be globals of this module.
from pipelines.serve.model_server import LongMemServer
from pipelines.serve.schemas import (ERROR_MEANINGS, ChatRequest, CompletionRequest, DocumentRequest, ErrorResponse,
                                     ServeArgs, ServeError, _normalise, _normalise_chat)
from pipelines.serve.quota import Charge, TokenQuota
from pipelines.serve.shard_server import MemoryShardServer

logger = logging.getLogger("ray.serve")


# ------------------------------------------------------------------------------ HTTP
def build_api(model_handle, args: ServeArgs) -> FastAPI:
    # The routes are closures over the model handle and the key set; kept in one function they
    # read as the API's table of contents.
    # FastAPI resolves these annotations by name in this module's globals (postponed annotations).
    keys = set(args.api_key_hashes) | {key_hash(k) for k in args.api_keys}
    # With keys, the schema pages are closed too: they are routes like any other.
    hidden = {"docs_url": None, "redoc_url": None, "openapi_url": None} if keys or not args.docs else {}
    app = FastAPI(title="LongMem", version="0.1.0", **hidden)
    quota = TokenQuota(args.tokens_per_minute_per_key) if args.tokens_per_minute_per_key else None

    def admit(owner: str, reserve: int) -> Charge | None:
        return None if quota is None else quota.admit(owner, reserve)

    def settle(charge: Charge | None, tokens: int) -> None:
        if charge is not None:
            charge.settle(tokens)

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})

    def reply(result: dict) -> JSONResponse | dict:
        if "error" in result:
            e = result["error"]
            return error(e["status"], e["message"], e["type"])
        return result

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        return error(400, f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'malformed body')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request, exc: Exception):
        logger.exception("request failed")
        return error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.exception_handler(ServeError)
    async def _serve_error(_request, exc: ServeError):
        response = error(exc.status, exc.message, exc.kind)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(BackPressureError)
    async def _busy(_request, exc: BackPressureError):
        response = error(503, "the model replicas are busy (their queue is full); retry shortly", "server_error")
        response.headers["Retry-After"] = str(max(1, round(getattr(exc, "retry_after_s", None) or 1)))
        return response

    async def owner_of(request: Request) -> str:
        if not keys:
            return "anonymous"
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        digest = key_hash(token)
        if digest not in keys:
            raise ServeError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error")
        return digest[:16]  # who owns a session: the key's hash, never the key

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    def errors(*codes: int) -> dict:
        """The error replies a route can give (OpenAPI), beside 401 (with keys) and 503 (busy)."""
        return {code: {"model": ErrorResponse, "description": ERROR_MEANINGS[code]} for code in (*codes, 401, 503)}

    generation = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                        "description": "the completion; with stream: true, server-sent events ending in [DONE]"},
                  **errors(400, 404, 413, 429)}

    @app.get("/v1/models", responses=errors())
    async def models(request: Request):
        await owner_of(request)
        info = await model_handle.describe.remote()
        return {"object": "list", "data": [{"id": args.model_name, "object": "model", "owned_by": "longmem",
                                            "memories": info["memories"]}]}

    def for_session(owner: str, session_id: str | None):
        """The model handle for a request on a session: Serve's model multiplexing routes it to a
        replica that has the session loaded (any replica can load it from storage)."""
        if not session_id:
            return model_handle
        return model_handle.options(multiplexed_model_id=f"{owner}/{session_id}")

    def usage_of(event: dict) -> dict:
        return {"prompt_tokens": event["prompt_tokens"], "completion_tokens": event["completion_tokens"],
                "total_tokens": event["prompt_tokens"] + event["completion_tokens"]}

    async def generate(req: dict, body, plain, delta, final, start=None):
        """One generation for either route: `plain(result)` the whole reply; streamed, SSE events of
        `start()` (if any), `delta(text)` per piece, `final(reason, usage)`, a usage-only chunk when
        asked (stream_options.include_usage), then [DONE]."""
        if body.model not in (None, args.model_name):
            raise ServeError(404, f"unknown model {body.model!r}; this endpoint serves {args.model_name!r}", "not_found")
        handle = for_session(req["owner"], req.get("session"))
        # Until it settles, a request holds the most it can cost (its prompt is counted after).
        charge = admit(req["owner"], req["max_tokens"] or args.max_new_tokens)
        if not body.stream:
            try:
                result = await handle.complete.remote(req)
            except BaseException:
                settle(charge, 0)
                raise
            settle(charge, 0 if "error" in result else usage_of(result)["total_tokens"])
            return reply(result) if "error" in result else plain(result, usage_of(result))
        try:
            events = handle.options(stream=True).complete_stream.remote(req)
            first = await events.__anext__()
        except BaseException:
            settle(charge, 0)
            raise
        if "error" in first:  # fail before the stream starts: a proper status code
            settle(charge, 0)
            return reply(first)

        async def sse():
            # A stream cut short keeps its reservation: what it generated is not known here.
            if start is not None:
                yield f"data: {json.dumps(start())}\n\n"
            event = first
            while True:
                if "error" in event:
                    yield f"data: {json.dumps(event)}\n\n"
                    break
                if "finish_reason" in event:
                    settle(charge, usage_of(event)["total_tokens"])
                    yield f"data: {json.dumps(final(event['finish_reason'], usage_of(event)))}\n\n"
                    if req.get("include_usage"):
                        yield f"data: {json.dumps({**final(None, None), 'choices': [], 'usage': usage_of(event)})}\n\n"
                    break
                yield f"data: {json.dumps(delta(event['text']))}\n\n"
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions", responses=generation)
    async def completions(body: CompletionRequest, request: Request):
        owner = await owner_of(request)
        req = {**_normalise(body), "owner": owner}
        cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())

        def chunk(text: str, finish=None, usage=None) -> dict:
            out = {"id": cid, "object": "text_completion", "created": created, "model": args.model_name,
                   "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            if usage:
                out["usage"] = usage
            return out

        return await generate(req, body, plain=lambda r, usage: chunk(r["text"], r["finish_reason"], usage),
                              delta=chunk, final=lambda reason, usage: chunk("", reason, usage))

    @app.post("/v1/chat/completions", responses=generation)
    async def chat_completions(body: ChatRequest, request: Request):
        owner = await owner_of(request)
        req = {**_normalise_chat(body), "owner": owner}
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())

        def head(kind: str) -> dict:
            return {"id": cid, "object": kind, "created": created, "model": args.model_name}

        def plain(result, usage):
            message = {"role": "assistant", "content": result["text"]}
            return {**head("chat.completion"), "usage": usage,
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": result["finish_reason"]}]}

        def chunk(delta: dict, finish=None, usage=None) -> dict:
            out = {**head("chat.completion.chunk"),
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if usage and not req.get("include_usage"):  # asked for: it comes in its own last chunk instead
                out["usage"] = usage
            return out

        return await generate(req, body, plain=plain, delta=lambda text: chunk({"content": text}),
                              final=lambda reason, usage: chunk({}, reason, usage),
                              start=lambda: chunk({"role": "assistant", "content": ""}))

    @app.post("/v1/memories", responses=errors(429))
    async def create_memory(request: Request):
        owner = await owner_of(request)
        return reply(await model_handle.create_session.remote(owner))

    @app.post("/v1/memories/{session_id}/documents", responses=errors(400, 404, 413, 429),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": DocumentRequest.model_json_schema()}}}})
    async def add_document(session_id: str, request: Request):
        owner = await owner_of(request)
        raw = await request.body()
        if len(raw) > args.max_document_bytes:
            raise ServeError(413, f"the document is {len(raw)} bytes; the limit is {args.max_document_bytes}")
        try:
            body = DocumentRequest(**json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError:
            raise ServeError(400, "the request body is not valid UTF-8") from None
        except (json.JSONDecodeError, TypeError):
            raise ServeError(400, 'the body must be a JSON object {"text": "..."}') from None
        except ValidationError as e:
            raise ServeError(400, f"invalid document: {e.errors()[0]['msg']}") from None
        charge = admit(owner, 0)
        result = await for_session(owner, session_id).append_document.remote(owner, session_id, body.text)
        settle(charge, result.get("document_tokens", 0))
        return reply(result)

    @app.get("/v1/memories/{session_id}", responses=errors(404))
    async def memory_info(session_id: str, request: Request):
        owner = await owner_of(request)
        return reply(await for_session(owner, session_id).session_info.remote(owner, session_id))

    @app.delete("/v1/memories/{session_id}", responses=errors(404))
    async def delete_memory(session_id: str, request: Request):
        owner = await owner_of(request)
        return reply(await model_handle.delete_session.remote(owner, session_id))

    return app


@serve.deployment(max_ongoing_requests=256)
@serve.ingress()
class LongMemIngress:
    """The HTTP front: a FastAPI app built on each replica around the model's handle."""

    def __init__(self, model_handle, args: dict):
        self.model_handle, self.args = model_handle, with_env_keys(ServeArgs(**args))

    def __serve_build_asgi_app__(self):
        return build_api(self.model_handle, self.args)


def with_env_keys(args: ServeArgs) -> ServeArgs:
    """args with the keys of LONGMEM_API_KEYS (comma-separated) and of the key file (api_keys_file
    or LONGMEM_API_KEYS_FILE, one per line: a mounted secret) added: read where the app is built
    (`serve run` / `serve deploy` of a config) and again in each ingress replica (a runtime_env's
    env_vars), so a deployed config is as closed as `longmem serve --api-key`. The keys never go
    into the deployments' arguments: the ingress reads them itself."""
    extra = [k.strip() for k in os.environ.get("LONGMEM_API_KEYS", "").split(",") if k.strip()]
    key_file = args.api_keys_file or os.environ.get("LONGMEM_API_KEYS_FILE")
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as f:
                extra += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise ServeError(500, f"cannot read the API key file {key_file}: {e.strerror}", "server_error") from None
        if not extra:
            raise ServeError(500, f"the API key file {key_file} holds no key", "server_error")
    keys = list(dict.fromkeys([*args.api_keys, *extra]))
    return args if keys == args.api_keys else args.model_copy(update={"api_keys": keys})


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def resources(cpus: float, gpus: float) -> dict:
    return {"num_cpus": cpus, **({"num_gpus": gpus} if gpus else {})}


def app_builder(args: dict):
    """Serve application: ingress -> model -> one shard deployment per shard of each memory larger
    than `replica_search_tokens` (smaller ones are searched inside the model replica)."""
    from longmem.memory.store import read_manifest

    a = with_env_keys(ServeArgs(**(args or {})))
    a.model.validate()  # a setting the checkpoint fixes is refused here, not in a failed replica
    logs = {"encoding": a.log_encoding}
    shard_options = {"ray_actor_options": resources(a.shard_cpus, a.shard_gpus), "logging_config": logs}
    if a.shard_autoscaling:
        shard_options["autoscaling_config"] = a.shard_autoscaling
    else:
        shard_options["num_replicas"] = a.shard_replicas
    if a.shard_max_replicas_per_node:
        shard_options["max_replicas_per_node"] = a.shard_max_replicas_per_node
    shards = {}  # name -> its shard deployments; [] for a memory searched inside the model replica
    for name, directory in a.memories.items():
        manifest = read_manifest(directory)
        if manifest["totals"]["tokens"] <= a.replica_search_tokens:
            shards[name] = []
            continue
        n = len(manifest["shards"])
        shards[name] = [
            MemoryShardServer.options(name=f"MemoryShard-{name}-{i}", **shard_options)
            .bind(directory, i, a.nprobe, "cpu" if a.device == "cpu" else "auto", a.prewarm_memory)
            for i in range(n)
        ]
    options = {"ray_actor_options": resources(a.model_cpus, a.model_gpus), "max_ongoing_requests": a.max_ongoing_requests,
               "max_queued_requests": a.max_queued_requests, "logging_config": logs}
    if a.autoscaling:
        options["autoscaling_config"] = a.autoscaling
    else:
        options["num_replicas"] = a.model_replicas
    # Keys (given, from LONGMEM_API_KEYS or from the key file) reach the deployments as hashes only.
    hashes = sorted(set(a.api_key_hashes) | {key_hash(k) for k in a.api_keys})
    bound = a.model_copy(update={"api_keys": [], "api_keys_file": None, "api_key_hashes": hashes}).model_dump()
    model = LongMemServer.options(**options).bind(bound, shards)
    return LongMemIngress.options(ray_actor_options={"num_cpus": a.ingress_cpus}, logging_config=logs).bind(model, bound)


def run_local(args: dict, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
              blocking: bool = True, name: str = "longmem"):
    """Start the app on an embedded local Ray (or `address`), bound to host:port."""
    from pipelines.ray_env import init_ray

    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(app_builder(args), name=name, route_prefix="/", blocking=False)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle
