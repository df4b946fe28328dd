"""The model server: backbone + SideNet, continuous batching, session banks under per-key quotas."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time

from ray import serve

from pipelines.serve.engine import Engine
from pipelines.serve.schemas import ServeArgs, ServeError
from pipelines.serve.shard_server import LocalMemory, RemoteMemory

logger = logging.getLogger("ray.serve")


# ------------------------------------------------------------------------------ the model
LOADED_SESSIONS = 64  # session memories a replica keeps in RAM; the least recent is unloaded (never deleted)


@serve.deployment(max_ongoing_requests=32)
class LongMemServer:
    def __init__(self, args: dict, shard_handles: dict):
        import torch

        from longmem.loading import load_source
        from longmem.memory.sessions import SessionStore

        self.args = ServeArgs(**args)
        torch.set_num_threads(self.args.torch_threads or max(1, int(self.args.model_cpus)))
        device = self.args.resolved_device()
        source = dataclasses.replace(self.args.model, dtype=self.args.resolved_dtype(device))
        self.model = load_source(source, device=device).eval()
        # A memory without shard deployments is small enough to search here (replica_search_tokens).
        self.memories = {name: RemoteMemory(name, self.args.memories[name], handles) if handles else
                         LocalMemory(name, self.args.memories[name], self.args.nprobe,
                                     "cpu" if device == "cpu" else "auto", self.args.prewarm_memory)
                         for name, handles in shard_handles.items()}
        for memory in self.memories.values():
            memory.check_model(self.model.memory_spec)
        # Session memories are written through to storage: any replica can load one, a restart
        # loses none, and the router sends a session's requests to a replica that has it loaded.
        self.sessions = SessionStore(self.args.resolved_sessions_path(),
                                     new_bank=lambda: self.model.new_bank(1, capacity_tokens=self.args.session_tokens))
        # Every use of the model runs in the engine's thread: generations decode there together,
        # a document is written to its session's bank between two steps.
        self.engine = Engine(self.model, max_rows=self.args.max_batch_size)

    # --- sessions
    @serve.multiplexed(max_num_models_per_replica=LOADED_SESSIONS)
    async def _loaded_session(self, key: str):
        """The session `owner/id` from storage (Serve's multiplexing keeps the most recent loaded)."""
        owner, session_id = key.split("/", 1)
        return await asyncio.wrap_future(self.engine.call(lambda: self.sessions.open(owner, session_id)))

    async def _session(self, owner: str, session_id: str):
        """The session's bank, up to date with what other replicas wrote; 404 if there is none
        (another key's session is reported as missing, not as forbidden)."""
        missing = ServeError(404, f"no memory session {session_id!r}", "not_found")
        if not self.sessions.exists(owner, session_id):
            raise missing
        try:
            bank = await self._loaded_session(f"{owner}/{session_id}")
            await asyncio.wrap_future(self.engine.call(bank.sync))
        except KeyError:
            raise missing from None
        return bank

    async def create_session(self, owner: str) -> dict:
        mine = len(self.sessions.sessions_of(owner))
        if mine >= self.args.max_sessions_per_key:
            return ServeError(429, f"this key holds {mine} session memories, its limit: delete one "
                                   "(DELETE /v1/memories/ID) before creating another", "rate_limit_error").to_dict()
        meta = self.sessions.create(owner)
        return {"id": meta["id"], "object": "memory", "created": meta["created"], "documents": 0, "tokens_added": 0,
                "tokens_in_memory": 0, "capacity_tokens": self.args.session_tokens}

    async def session_info(self, owner: str, session_id: str) -> dict:
        async def run():
            return (await self._session(owner, session_id)).info()

        return await self._call(run)

    async def delete_session(self, owner: str, session_id: str) -> dict:
        def run():
            try:
                self.sessions.delete(owner, session_id)
            except KeyError:
                raise ServeError(404, f"no memory session {session_id!r}", "not_found") from None
            return {"id": session_id, "object": "memory", "deleted": True}

        return await self._call(run, thread=True)

    async def append_document(self, owner: str, session_id: str, text: str) -> dict:
        async def run():
            if not text.strip():
                raise ServeError(400, "the document is empty")
            bank = await self._session(owner, session_id)

            def write():
                added = self.model.remember_text(text, bank)
                bank.flush(documents=1, tokens=added)  # stored before the reply says it is
                return {**bank.info(), "document_tokens": added}

            return await asyncio.wrap_future(self.engine.call(write))

        return await self._call(run)

    # --- completions
    def _prompt(self, req: dict) -> str:
        """The completion's prompt, or the chat's messages through the tokenizer's chat template."""
        if "messages" not in req:
            return req["prompt"]
        tok = self.model.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ServeError(400, "this model's tokenizer has no chat template: use /v1/completions")
        return tok.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True)

    async def _prepare(self, req: dict):
        from longmem.memory import CombinedMemory

        ids = self.model.encode(self._prompt(req))
        if ids.shape[1] == 0:
            raise ServeError(400, "the prompt is empty")
        if ids.shape[1] > self.args.max_prompt_tokens:
            raise ServeError(400, f"the prompt has {ids.shape[1]} tokens; the limit is {self.args.max_prompt_tokens}")
        if req["max_tokens"] is None:
            req["max_tokens"] = self.args.max_new_tokens
        if req["max_tokens"] > self.args.max_new_tokens:
            raise ServeError(400, f"max_tokens {req['max_tokens']} exceeds the limit of {self.args.max_new_tokens}")
        names = req.get("memory") or []
        unknown = [n for n in names if n not in self.memories]
        if unknown:
            raise ServeError(404, f"unknown memory {unknown[0]!r}; available: {sorted(self.memories) or 'none'}",
                             "not_found")
        session = await self._session(req["owner"], req["session"]) if req.get("session") else None
        # Without a session the prompt's own past still goes through memory: a bank that lives as
        # long as the request (it grows as it fills).
        bank = session or self.model.new_bank(1, capacity_tokens=self.args.session_tokens)
        return ids, CombinedMemory(bank, [self.memories[n] for n in names]), session

    def _sampling(self, req: dict):
        from longmem.batching import Sampling

        return Sampling(max_new_tokens=req["max_tokens"], temperature=req["temperature"], top_p=req["top_p"],
                        stop=req.get("stop") or [], seed=req.get("seed"))

    async def _submit(self, req: dict, on_token=None, cancelled: threading.Event | None = None):
        """Queue the request's row in the batch; returns (prompt tokens, future of its RowResult).
        What the generation wrote to a session's memory (a prompt longer than the window) is
        stored once it has finished."""
        ids, memory, session = await self._prepare(req)
        future = self.engine.submit(ids, memory, self._sampling(req), on_token=on_token,
                                    should_stop=None if cancelled is None else cancelled.is_set)
        if session is not None:
            def store(_done):
                self.engine.call(lambda: session.flush() if session.unsaved else None)

            future.add_done_callback(store)
        return int(ids.shape[1]), future

    @staticmethod
    def _reply(result, prompt_tokens: int) -> dict:
        from longmem.model import InputError

        if result.finish_reason == "error":
            if isinstance(result.error, (InputError, ServeError)):
                raise ServeError(400, str(result.error)) if isinstance(result.error, InputError) else result.error
            raise ServeError(500, f"internal error: {type(result.error).__name__}: {result.error}", "server_error")
        return {"text": result.text, "finish_reason": "length" if result.finish_reason == "length" else "stop",
                "prompt_tokens": prompt_tokens, "completion_tokens": len(result.token_ids)}

    async def complete(self, req: dict) -> dict:
        cancelled, start, out = threading.Event(), time.perf_counter(), None
        try:
            async def run():
                prompt_tokens, future = await self._submit(req, cancelled=cancelled)
                return self._reply(await asyncio.wrap_future(future), prompt_tokens)

            out = await self._call(run)
            return out
        finally:  # a cancelled call (the client disconnected) frees its row at the next step
            cancelled.set()
            _log_request(req, out, start, streamed=False)

    async def complete_stream(self, req: dict):
        """Yields {"text": delta} events, then {"finish_reason", usage}; or one {"error"} event."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled, start, last = threading.Event(), time.perf_counter(), None

        def on_token(token_id):  # called in the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, ("token", token_id))

        try:
            try:
                prompt_tokens, future = await self._submit(req, on_token, cancelled)
            except ServeError as e:
                yield e.to_dict()
                return
            except Exception as e:  # noqa: BLE001 - reported to the client, the replica keeps serving
                yield _error_reply(e)
                return

            def done(f):
                loop.call_soon_threadsafe(queue.put_nowait, ("done", f))

            future.add_done_callback(done)
            async for event in self._stream_events(queue, req.get("stop") or [], self.model.tokenizer, prompt_tokens):
                last = event
                yield event
        finally:  # the stream was closed early (the client disconnected): its row leaves the batch
            cancelled.set()
            _log_request(req, last if last and ("finish_reason" in last or "error" in last) else None, start,
                         streamed=True)

    async def _stream_events(self, queue: asyncio.Queue, stops: list[str], tok, prompt_tokens: int):
        sent, tokens = 0, []
        while True:
            kind, payload = await queue.get()
            if kind == "token":
                tokens.append(payload)
                text = tok.decode(tokens, skip_special_tokens=True)
                safe = _safe_prefix(text, stops)  # never emit what may turn out to start a stop string
                if safe > sent:
                    yield {"text": text[sent:safe]}
                    sent = safe
                continue
            result = await self._call(lambda: self._reply(payload.result(), prompt_tokens))
            if "error" in result:
                yield result
                return
            final = result["text"]
            if len(final) > sent:
                yield {"text": final[sent:]}
            yield {"finish_reason": result["finish_reason"], "prompt_tokens": result["prompt_tokens"],
                   "completion_tokens": result["completion_tokens"]}
            return

    async def _call(self, fn, thread: bool = False):
        """fn's result, or its error as a reply. A coroutine function is awaited; `thread` runs fn
        in the engine thread between decoding steps (it uses the model or a session's bank)."""
        try:
            if thread:
                return await asyncio.wrap_future(self.engine.call(fn))
            out = fn()
            return await out if asyncio.iscoroutine(out) else out
        except Exception as e:  # noqa: BLE001 - one failed request must not take the replica down
            return _error_reply(e)

    async def describe(self) -> dict:
        return {"model": self.args.model_name, "memories": [m.info() for m in self.memories.values()],
                "sessions_path": self.sessions.uri, "batching": self.engine.stats(), "config": self.model.config.to_dict()}


def _log_request(req: dict, out: dict | None, start: float, streamed: bool) -> None:
    """One line per generation (Serve adds the request id; JSON with log_encoding JSON)."""
    if out is None:
        outcome = "finish_reason=cancelled"
    elif "error" in out:
        outcome = f"status={out['error']['status']} error={out['error']['type']}"
    else:
        outcome = (f"finish_reason={out['finish_reason']} prompt_tokens={out['prompt_tokens']} "
                   f"completion_tokens={out['completion_tokens']}")
    logger.info(f"generation {outcome} seconds={time.perf_counter() - start:.3f} streamed={streamed} "
                f"session={bool(req.get('session'))} memories={','.join(req.get('memory') or []) or '-'}")


def _error_reply(e: Exception) -> dict:
    from longmem.model import InputError

    if isinstance(e, ServeError):
        return e.to_dict()
    if isinstance(e, InputError):
        return ServeError(400, str(e)).to_dict()
    logger.exception("request failed", exc_info=e)
    return ServeError(500, f"internal error: {type(e).__name__}: {e}", "server_error").to_dict()


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
