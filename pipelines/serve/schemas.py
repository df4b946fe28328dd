"""Request schemas and the error type of the serve app: ServeArgs, ServeError, the HTTP bodies."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from longmem.loading import ModelSource


class ServeArgs(BaseModel):
    """Typed arguments of the serve application (`app_builder`)."""

    model_config = ConfigDict(extra="forbid")

    # A trained checkpoint, or a fresh zero-init SideNet on a backbone (then equal to the backbone).
    model: ModelSource = Field(default_factory=ModelSource)
    model_name: str = "longmem"
    memories: dict[str, str] = Field(default_factory=dict)  # name -> built memory folder
    api_keys: list[str] = Field(default_factory=list)  # bearer tokens; empty: no auth
    # Session memories are written through to `sessions_path` (a local folder, a shared mount or
    # an object-store URI such as s3://bucket/sessions; default: the local cache), so they outlive
    # replicas and any replica can serve them. A key may hold max_sessions_per_key of them; beyond
    # that a new session is refused (429). A replica unloads the least recent from RAM, never deletes.
    sessions_path: str | None = None
    max_sessions_per_key: int = 16
    # Tokens a key may spend in any 60 s: prompts and completions, and documents written to its
    # sessions. Past it, 429 with Retry-After. None: no limit.
    tokens_per_minute_per_key: int | None = Field(default=None, ge=1)
    session_tokens: int = 65_536  # memory capacity of one session
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 512
    max_document_bytes: int = 2_000_000
    # Generations a replica decodes together (continuous batching: a request joins at the next
    # step, a finished one leaves); requests a replica takes at once, and how many may wait
    # beyond that. Past both, a 503 with Retry-After instead of a long wait.
    max_batch_size: int = 32
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    model_replicas: int = 1
    autoscaling: dict | None = None  # Serve autoscaling_config for the model deployment
    model_cpus: float = 1.0
    model_gpus: float = 0.0  # GPUs per model replica (Ray shows a replica only the GPUs it asked for)
    torch_threads: int | None = None  # the model replica's compute threads; default: model_cpus, at least 1
    # A built memory of at most this many tokens is searched inside the model replica (its shards
    # memory-mapped, searched on a helper thread while the layers above the memory layer compute):
    # no shard replicas and no round trips, which cost more than the search itself at this size.
    # Larger memories get one MemoryShardServer deployment per shard. 0: always shard replicas.
    replica_search_tokens: int = Field(default=262_144, ge=0)
    shard_cpus: float = 0.25
    # Replicas of each shard deployment: a fixed count, or a Serve autoscaling_config per shard
    # (a hot shard grows on its own); at most this many replicas of one shard on a node, so a
    # shard's replicas (and their page caches) spread over nodes. None: Serve's default.
    shard_replicas: int = Field(default=1, ge=1)
    shard_autoscaling: dict | None = None
    shard_max_replicas_per_node: int | None = Field(default=None, ge=1)
    shard_gpus: float = 0.0  # GPUs per shard replica: its faiss index is searched there (the gpu extra)
    ingress_cpus: float = 0.25
    # "auto": CUDA where the replica sees a GPU, else the CPU. dtype "auto": bfloat16 on CUDA
    # (float16 where bfloat16 is not supported) and on CPUs with bfloat16 matrix units (AMX,
    # AVX512-BF16), else the model source's dtype (`longmem.loading.inference_dtype`).
    device: str = "auto"
    dtype: str = "auto"
    nprobe: int | None = None  # IVF lists a shard search probes (None: each shard's measured setting)
    # Each replica that searches a built memory reads its files into the page cache on a background
    # thread when it starts (up to half the memory the node has available), so that its first
    # searches do not read every page from disk one at a time (`MemoryStore.prewarm`).
    prewarm_memory: bool = True
    log_encoding: str = "TEXT"  # the deployments' logs: "TEXT" or "JSON" (one object a line, with request ids)
    docs: bool = True  # /docs, /redoc and /openapi.json (always closed when API keys are set)
    api_keys_file: str | None = None  # one key per line (a mounted secret); added to api_keys
    # sha256 of accepted keys: what app_builder hands the deployments instead of the keys, so a
    # deployed application's visible arguments never hold a key
    api_key_hashes: list[str] = Field(default_factory=list)

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if v not in ("auto", "cpu") and not v.startswith("cuda"):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v

    @field_validator("log_encoding")
    @classmethod
    def _log_encoding(cls, v):
        if v not in ("TEXT", "JSON"):
            raise ValueError("log_encoding must be TEXT or JSON")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError("dtype must be auto, float32, bfloat16 or float16")
        return v

    def resolved_device(self) -> str:
        """Where this process serves: resolved in the replica, which sees only its own GPUs."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            from longmem.model import InputError

            raise InputError(f"device {self.device!r} was asked for but this replica sees no GPU: give the "
                             "deployment GPUs (model_gpus / shard_gpus) or serve on device cpu")
        return self.device

    def resolved_dtype(self, device: str) -> str:
        from longmem.loading import inference_dtype

        return self.dtype if self.dtype != "auto" else inference_dtype(device, fallback=self.model.dtype)


    def resolved_sessions_path(self) -> str:
        from longmem.backbone import cache_dir

        return self.sessions_path or str(cache_dir() / "sessions")


class ServeError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.retry_after: int | None = None  # seconds, sent as Retry-After

    def to_dict(self) -> dict:
        return {"error": {"status": self.status, "message": self.message, "type": self.kind}}


# ------------------------------------------------------------------------------ HTTP
class ErrorDetail(BaseModel):
    message: str
    type: str


class ErrorResponse(BaseModel):
    """Every error reply: {"error": {"message": ..., "type": ...}} (OpenAI's shape)."""

    error: ErrorDetail


ERROR_MEANINGS = {400: "invalid request", 401: "missing or invalid API key", 404: "no such model, memory or session",
                  413: "document too large", 422: "invalid request", 429: "over this key's quota",
                  503: "busy: retry after the Retry-After header's seconds"}


def _number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number")
    return float(v)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields both OpenAI routes share, including those popular clients send by default: each is
    accepted at its neutral value, and any other value is a clear 400 (not an unknown field)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    logit_bias: dict | None = None
    # extensions: which memories to read
    memory: str | list[str] | None = None  # built memory name(s)
    session: str | None = None  # a session memory id from POST /v1/memories

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _numbers(cls, v):
        return _number(v)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: str
    content: str | list[dict] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None


class DocumentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str


CHAT_ROLES = ("system", "user", "assistant")


def _chat_messages(req: ChatRequest) -> list[dict]:
    """OpenAI messages -> [{role, content}] for the tokenizer's chat template (text parts only)."""
    if not req.messages:
        raise ServeError(400, "messages is empty")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise ServeError(400, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        content = m.content or ""
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise ServeError(400, f"messages[{i}].content: only text parts are supported")
            content = "".join(part["text"] for part in content)
        out.append({"role": m.role, "content": content})
    if out[-1]["role"] == "assistant":
        raise ServeError(400, "the last message must be the user's (or system's): the reply is the assistant's")
    return out


def _normalise_chat(req: ChatRequest) -> dict:
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise ServeError(400, "max_tokens and max_completion_tokens disagree; send one")
    if req.top_logprobs:
        raise ServeError(400, "top_logprobs is not supported")
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    # unset: the server's own limit (OpenAI's chat default is "until the model stops")
    return {**_sampling(req, limit), "messages": _chat_messages(req)}


def _normalise(req: CompletionRequest) -> dict:
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise ServeError(400, "send one prompt per request (a list of exactly one string)")
        prompt = req.prompt[0]
    else:
        prompt = req.prompt
    if not prompt:
        raise ServeError(400, "the prompt is empty")
    if req.echo or (req.best_of not in (None, 1)) or req.suffix:
        raise ServeError(400, "echo, best_of > 1 and suffix are not supported")
    return {**_sampling(req, 16 if req.max_tokens is None else req.max_tokens), "prompt": prompt}


def _sampling(req: _Sampling, max_tokens: int | None) -> dict:
    if req.n != 1:
        raise ServeError(400, "n must be 1")
    if req.presence_penalty or req.frequency_penalty:
        raise ServeError(400, "presence_penalty and frequency_penalty are not supported (send 0 or leave them out)")
    if req.logprobs:
        raise ServeError(400, "logprobs are not supported (send false or leave it out)")
    if req.logit_bias:
        raise ServeError(400, "logit_bias is not supported")
    if max_tokens is not None and max_tokens <= 0:
        raise ServeError(400, f"max_tokens must be positive, got {max_tokens}")
    if req.temperature < 0 or not 0 < req.top_p <= 1:
        raise ServeError(400, "need temperature >= 0 and 0 < top_p <= 1")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop) or len(stop) > 4:
        raise ServeError(400, "stop must be up to 4 non-empty strings")
    memory = [req.memory] if isinstance(req.memory, str) else list(req.memory or [])
    return {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "stop": stop,
            "seed": req.seed, "memory": memory, "session": req.session,
            "include_usage": bool(req.stream_options and req.stream_options.include_usage)}
