"""Ray Serve: memory-augmented completions over HTTP.

    Ingress (FastAPI: auth, validation, OpenAI-style JSON and SSE)
      -> LongMemServer (backbone + SideNet, KV-cached decoding, session banks with LRU eviction)
           -> MemoryShardServer x shards of each built memory (faiss search, batched queries)

A completion reads a CombinedMemory: the session's bank (or a fresh one for a one-off request) and
any built memories named in the request. The model replica fans a search out to every shard of a
memory at once and merges the top-k by score, so 1 shard and N shards give the same completion.

    serve run pipelines.serve:app_builder checkpoint=... memories='{"austen": "/data/mem"}'
    longmem serve --checkpoint DIR --memory austen=/data/mem
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from longmem.config import DEFAULT_BACKBONE

logger = logging.getLogger("ray.serve")


class ServeArgs(BaseModel):
    """Typed arguments of the serve application (`app_builder`)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = None  # a LongMem checkpoint; None: a zero-init SideNet (== the backbone)
    backbone: str = DEFAULT_BACKBONE
    model_name: str = "longmem"
    memories: dict[str, str] = Field(default_factory=dict)  # name -> built memory folder
    api_keys: list[str] = Field(default_factory=list)  # bearer tokens; empty: no auth
    max_sessions: int = 64  # session memories kept; the least recently used is evicted
    session_tokens: int = 65_536  # memory capacity of one session
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 512
    max_document_bytes: int = 2_000_000
    model_replicas: int = 1
    autoscaling: dict | None = None  # Serve autoscaling_config for the model deployment
    model_cpus: float = 1.0
    shard_cpus: float = 0.25
    ingress_cpus: float = 0.25
    device: str = "cpu"
    nprobe: int = 32


# ------------------------------------------------------------------------------ memory shards
def split_retrieval(r, sizes: list[int]):
    """A MemoryRetrieval of concatenated queries (along T) -> one per request.

    Every per-query field, whatever it holds, has T as dim 2 (B, Hq, T, ...); `streams` has no T,
    and `query_prev_ids` is set later by the model."""
    import dataclasses

    out, start = [], 0
    for n in sizes:
        cuts = {f.name: getattr(r, f.name).narrow(2, start, n) for f in dataclasses.fields(r)
                if f.name not in ("streams", "query_prev_ids") and getattr(r, f.name) is not None}
        out.append(dataclasses.replace(r, **cuts))
        start += n
    return out


@serve.deployment(max_ongoing_requests=64)
class MemoryShardServer:
    """One shard of a built memory; concurrent searches are batched into one faiss call."""

    def __init__(self, memory_dir: str, shard: int, nprobe: int = 32):
        from longmem.memory.store import MemoryStore, read_manifest

        self.store = MemoryStore.open(memory_dir, shards=[shard], nprobe=nprobe)
        self.shard = self.store.shards[0]
        self.offset = sum(s["chunks"] for s in read_manifest(memory_dir)["shards"][:shard])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def search(self, requests: list[tuple]):
        """requests: (queries (1, T, Hq, D) float32, k, with_next) -> MemoryRetrieval each."""
        import torch

        from longmem.memory.store import shard_retrieval

        results = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (_, k, with_next) in enumerate(requests):
            groups.setdefault((k, with_next), []).append(i)
        for (k, with_next), members in groups.items():
            queries = torch.cat([requests[i][0] for i in members], dim=1)  # (1, sum T, Hq, D)
            merged = shard_retrieval(self.shard, queries, k, with_next, self.offset)
            for i, part in zip(members, split_retrieval(merged, [requests[i][0].shape[1] for i in members])):
                results[i] = part
        return results

    def info(self) -> dict:
        return {"chunks": self.shard.num_chunks, "offset": self.offset}


class RemoteMemory:
    """A built memory whose shards live in MemoryShardServer replicas; read like a MemoryStore."""

    read_only = True

    def __init__(self, name: str, directory: str, handles: list):
        import torch

        from longmem.memory.store import MemorySpec, read_manifest

        self.name, self.directory, self.handles = name, directory, handles
        self.manifest = read_manifest(directory)
        self.spec = MemorySpec.from_dict(self.manifest["spec"])
        self.num_kv_heads, self.head_dim, self.chunk_size = self.spec.num_kv_heads, self.spec.head_dim, self.spec.chunk_size
        self.device = torch.device("cpu")

    def check_model(self, config, num_kv_heads: int, head_dim: int) -> None:
        from longmem.memory.store import MemorySpec

        self.spec.require_compatible(MemorySpec.from_config(config, num_kv_heads, head_dim), f"memory {self.name!r}")

    def search(self, queries, k: int, streams=None, with_next: bool = False):
        """Called from the generation thread: every shard is asked at once, then merged by score."""
        from longmem.memory import merge_retrievals

        q = queries.detach().float().cpu()
        pending = [h.search.remote((q, k, with_next)) for h in self.handles]
        parts = [p.result(timeout_s=60) for p in pending]
        merged = merge_retrievals(parts, k)
        if queries.device.type != "cpu":
            merged = _to_device(merged, queries.device)
        return merged

    def info(self) -> dict:
        return {"name": self.name, "shards": len(self.handles), **self.manifest["totals"]}


def _to_device(r, device):
    from dataclasses import fields

    return type(r)(**{f.name: (v.to(device) if hasattr(v, "to") else v)
                      for f in fields(r) for v in [getattr(r, f.name)]})


# ------------------------------------------------------------------------------ the model
class ServeError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def to_dict(self) -> dict:
        return {"error": {"status": self.status, "message": self.message, "type": self.kind}}


@dataclass
class Session:
    owner: str
    bank: object
    created: float = field(default_factory=time.time)
    documents: int = 0
    tokens: int = 0


@serve.deployment(max_ongoing_requests=32)
class LongMemServer:
    def __init__(self, args: dict, shard_handles: dict):
        import torch

        from longmem.model import LongMem

        self.args = ServeArgs(**args)
        torch.set_num_threads(max(1, int(self.args.model_cpus)))
        if self.args.checkpoint:
            self.model = LongMem.from_pretrained(self.args.checkpoint, device=self.args.device)
        else:
            self.model = LongMem.from_backbone(self.args.backbone, device=self.args.device, side_init="zero")
        self.model.eval()
        self.memories = {name: RemoteMemory(name, self.args.memories[name], handles)
                         for name, handles in shard_handles.items()}
        for memory in self.memories.values():
            memory.check_model(self.model.config, self.model.adapter.num_kv_heads, self.model.adapter.head_dim)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.lock = threading.Lock()  # one forward at a time per replica; requests queue here

    # --- sessions
    def _session(self, owner: str, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None or s.owner != owner:  # another key's session is reported as missing, not as forbidden
            raise ServeError(404, f"no memory session {session_id!r}", "not_found")
        self.sessions.move_to_end(session_id)
        return s

    def _info(self, session_id: str, s: Session) -> dict:
        return {"id": session_id, "object": "memory", "created": int(s.created), "documents": s.documents,
                "tokens_added": s.tokens, "tokens_in_memory": s.bank.num_tokens(0),
                "capacity_tokens": s.bank.capacity_tokens}

    async def create_session(self, owner: str) -> dict:
        session_id = "mem-" + uuid.uuid4().hex[:24]
        bank = self.model.new_bank(1, capacity_tokens=self.args.session_tokens)
        self.sessions[session_id] = Session(owner, bank)
        while len(self.sessions) > self.args.max_sessions:
            self.sessions.popitem(last=False)
        return self._info(session_id, self.sessions[session_id])

    async def session_info(self, owner: str, session_id: str) -> dict:
        return await self._call(lambda: self._info(session_id, self._session(owner, session_id)))

    async def delete_session(self, owner: str, session_id: str) -> dict:
        def run():
            self._session(owner, session_id)
            del self.sessions[session_id]
            return {"id": session_id, "object": "memory", "deleted": True}

        return await self._call(run)

    async def append_document(self, owner: str, session_id: str, text: str) -> dict:
        def run():
            s = self._session(owner, session_id)
            if not text.strip():
                raise ServeError(400, "the document is empty")
            with self.lock:
                added = self.model.remember_text(text, s.bank)
            s.documents += 1
            s.tokens += added
            return self._info(session_id, s)

        return await self._call(run, thread=True)

    # --- completions
    def _prepare(self, req: dict):
        from longmem.memory.store import CombinedMemory

        ids = self.model.encode(req["prompt"])
        if ids.shape[1] == 0:
            raise ServeError(400, "the prompt is empty")
        if ids.shape[1] > self.args.max_prompt_tokens:
            raise ServeError(400, f"the prompt has {ids.shape[1]} tokens; the limit is {self.args.max_prompt_tokens}")
        if req["max_tokens"] > self.args.max_new_tokens:
            raise ServeError(400, f"max_tokens {req['max_tokens']} exceeds the limit of {self.args.max_new_tokens}")
        names = req.get("memory") or []
        unknown = [n for n in names if n not in self.memories]
        if unknown:
            raise ServeError(404, f"unknown memory {unknown[0]!r}; available: {sorted(self.memories) or 'none'}",
                             "not_found")
        session = self._session(req["owner"], req["session"]) if req.get("session") else None
        bank = session.bank if session else self.model.new_bank(1, capacity_tokens=self.args.session_tokens)
        memory = CombinedMemory(bank, [self.memories[n] for n in names])
        return ids, memory

    def _generate(self, req: dict, on_token=None) -> dict:
        ids, memory = self._prepare(req)
        with self.lock:
            out = self.model.generate(ids, bank=memory, max_new_tokens=req["max_tokens"],
                                      temperature=req["temperature"], top_p=req["top_p"], stop=req.get("stop") or None,
                                      seed=req.get("seed"), on_token=on_token)
        return {"text": out.texts[0], "finish_reason": "length" if out.finish_reasons[0] == "length" else "stop",
                "prompt_tokens": int(ids.shape[1]), "completion_tokens": len(out.token_ids[0])}

    async def complete(self, req: dict) -> dict:
        return await self._call(lambda: self._generate(req), thread=True)

    async def complete_stream(self, req: dict):
        """Yields {"text": delta} events, then {"finish_reason", usage}; or one {"error"} event."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        tokens: list[int] = []
        stops = req.get("stop") or []
        sent = 0
        tok = self.model.tokenizer

        def on_token(_row, token_id):
            tokens.append(token_id)
            loop.call_soon_threadsafe(queue.put_nowait, ("token", None))

        def run():
            try:
                result = self._generate(req, on_token)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", result))
            except ServeError as e:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e.to_dict()))
            except Exception as e:  # noqa: BLE001 - reported to the client, the replica keeps serving
                loop.call_soon_threadsafe(queue.put_nowait, ("error", ServeError(500, str(e), "server_error").to_dict()))

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while True:
            kind, payload = await queue.get()
            if kind == "token":
                text = tok.decode(tokens, skip_special_tokens=True)
                safe = _safe_prefix(text, stops)  # never emit what may turn out to start a stop string
                if safe > sent:
                    yield {"text": text[sent:safe]}
                    sent = safe
            elif kind == "done":
                final = payload["text"]
                if len(final) > sent:
                    yield {"text": final[sent:]}
                yield {"finish_reason": payload["finish_reason"], "prompt_tokens": payload["prompt_tokens"],
                       "completion_tokens": payload["completion_tokens"]}
                return
            else:
                yield payload
                return

    async def _call(self, fn, thread: bool = False):
        from longmem.model import InputError

        try:
            return await asyncio.to_thread(fn) if thread else fn()
        except ServeError as e:
            return e.to_dict()
        except InputError as e:
            return ServeError(400, str(e)).to_dict()
        except Exception as e:  # noqa: BLE001 - one failed request must not take the replica down
            logger.exception("request failed")
            return ServeError(500, f"internal error: {type(e).__name__}: {e}", "server_error").to_dict()

    async def describe(self) -> dict:
        return {"model": self.args.model_name, "memories": [m.info() for m in self.memories.values()],
                "sessions": len(self.sessions), "config": self.model.config.to_dict()}


def _safe_prefix(text: str, stops: list[str]) -> int:
    """Length of text that can be sent: up to a stop string, and short of any tail that starts one."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                cut = min(cut, len(text) - n)
                break
    return cut


# ------------------------------------------------------------------------------ HTTP
class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    user: str | None = None
    n: int = 1
    # extensions: which memories to read
    memory: str | list[str] | None = None  # built memory name(s)
    session: str | None = None  # a session memory id from POST /v1/memories

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _numbers(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("must be a number")
        return float(v)


class DocumentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str


def _normalise(req: CompletionRequest) -> dict:
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise ServeError(400, "send one prompt per request (a list of exactly one string)")
        prompt = req.prompt[0]
    else:
        prompt = req.prompt
    if not prompt:
        raise ServeError(400, "the prompt is empty")
    if req.n != 1:
        raise ServeError(400, "n must be 1")
    if req.max_tokens <= 0:
        raise ServeError(400, f"max_tokens must be positive, got {req.max_tokens}")
    if req.temperature < 0 or not 0 < req.top_p <= 1:
        raise ServeError(400, "need temperature >= 0 and 0 < top_p <= 1")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop) or len(stop) > 4:
        raise ServeError(400, "stop must be up to 4 non-empty strings")
    memory = [req.memory] if isinstance(req.memory, str) else list(req.memory or [])
    return {"prompt": prompt, "max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "stop": stop, "seed": req.seed, "memory": memory, "session": req.session}


def build_api(model_handle, args: ServeArgs) -> FastAPI:
    # FastAPI resolves these annotations by name in this module's globals (postponed annotations).
    app = FastAPI(title="LongMem", version="0.1.0")
    keys = {hashlib.sha256(k.encode()).hexdigest()[:16] for k in args.api_keys}

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
        return error(exc.status, exc.message, exc.kind)

    async def owner_of(request: Request) -> str:
        if not keys:
            return "anonymous"
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        owner = hashlib.sha256(token.encode()).hexdigest()[:16]
        if owner not in keys:
            raise ServeError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error")
        return owner

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        await owner_of(request)
        info = await model_handle.describe.remote()
        return {"object": "list", "data": [{"id": args.model_name, "object": "model", "owned_by": "longmem",
                                            "memories": info["memories"]}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        owner = await owner_of(request)
        req = {**_normalise(body), "owner": owner}
        if body.model not in (None, args.model_name):
            raise ServeError(404, f"unknown model {body.model!r}; this endpoint serves {args.model_name!r}", "not_found")
        cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())

        def chunk(text: str, finish=None, usage=None) -> dict:
            out = {"id": cid, "object": "text_completion", "created": created, "model": args.model_name,
                   "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            if usage:
                out["usage"] = usage
            return out

        if not body.stream:
            result = await model_handle.complete.remote(req)
            if "error" in result:
                return reply(result)
            usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                     "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
            return chunk(result["text"], result["finish_reason"], usage)

        events = model_handle.options(stream=True).complete_stream.remote(req)
        first = await events.__anext__()
        if "error" in first:  # fail before the stream starts: a proper status code
            return reply(first)

        async def sse():
            event = first
            while True:
                if "error" in event:
                    yield f"data: {json.dumps(event)}\n\n"
                    break
                if "finish_reason" in event:
                    usage = {"prompt_tokens": event["prompt_tokens"], "completion_tokens": event["completion_tokens"],
                             "total_tokens": event["prompt_tokens"] + event["completion_tokens"]}
                    yield f"data: {json.dumps(chunk('', event['finish_reason'], usage))}\n\n"
                    break
                yield f"data: {json.dumps(chunk(event['text']))}\n\n"
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/memories")
    async def create_memory(request: Request):
        owner = await owner_of(request)
        return reply(await model_handle.create_session.remote(owner))

    @app.post("/v1/memories/{session_id}/documents")
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
        return reply(await model_handle.append_document.remote(owner, session_id, body.text))

    @app.get("/v1/memories/{session_id}")
    async def memory_info(session_id: str, request: Request):
        owner = await owner_of(request)
        return reply(await model_handle.session_info.remote(owner, session_id))

    @app.delete("/v1/memories/{session_id}")
    async def delete_memory(session_id: str, request: Request):
        owner = await owner_of(request)
        return reply(await model_handle.delete_session.remote(owner, session_id))

    return app


@serve.deployment(max_ongoing_requests=256)
@serve.ingress()
class LongMemIngress:
    """The HTTP front: a FastAPI app built on each replica around the model's handle."""

    def __init__(self, model_handle, args: dict):
        self.model_handle, self.args = model_handle, ServeArgs(**args)

    def __serve_build_asgi_app__(self):
        return build_api(self.model_handle, self.args)


def app_builder(args: dict):
    """Serve application: ingress -> model -> one shard deployment per shard of each memory."""
    from longmem.memory.store import read_manifest

    a = ServeArgs(**(args or {}))
    shards = {}
    for name, directory in a.memories.items():
        n = len(read_manifest(directory)["shards"])
        shards[name] = [
            MemoryShardServer.options(name=f"MemoryShard-{name}-{i}", ray_actor_options={"num_cpus": a.shard_cpus})
            .bind(directory, i, a.nprobe)
            for i in range(n)
        ]
    options = {"ray_actor_options": {"num_cpus": a.model_cpus}}
    if a.autoscaling:
        options["autoscaling_config"] = a.autoscaling
    else:
        options["num_replicas"] = a.model_replicas
    model = LongMemServer.options(**options).bind(a.model_dump(), shards)
    return LongMemIngress.options(ray_actor_options={"num_cpus": a.ingress_cpus}).bind(model, a.model_dump())


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
