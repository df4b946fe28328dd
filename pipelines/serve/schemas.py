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


class ServeError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def to_dict(self) -> dict:
        return {"error": {"status": self.status, "message": self.message, "type": self.kind}}


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
