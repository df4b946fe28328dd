"""Ray Serve: memory-augmented completions over HTTP.

    Ingress (FastAPI: auth, validation, OpenAI-style JSON and SSE)
      -> LongMemServer (backbone + SideNet, KV-cached decoding, session banks under per-key quotas)
           -> MemoryShardServer x shards of each built memory (faiss search, batched queries)

A completion reads a CombinedMemory: the session's bank (or a fresh one for a one-off request) and
any built memories named in the request. The model replica fans a search out to every shard of a
memory at once and merges the top-k by score, so 1 shard and N shards give the same completion.

    serve run cluster/serve_config.yaml   (args: model: {checkpoint: DIR}, memories: {austen: /data/mem})
    longmem serve --checkpoint DIR --memory austen=/data/mem
"""

from pipelines.serve.app import app_builder, build_api, run_local
from pipelines.serve.model_server import LongMemServer
from pipelines.serve.schemas import ServeArgs, ServeError
from pipelines.serve.shard_server import MemoryShardServer, RemoteMemory

__all__ = ["app_builder", "run_local", "ServeArgs", "ServeError", "LongMemServer", "MemoryShardServer",
           "RemoteMemory", "build_api"]
