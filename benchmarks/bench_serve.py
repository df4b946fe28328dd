"""Serving: generated tokens/s with 8 and 32 concurrent clients ÷ 1 client (continuous batching,
one replica), p50/p99 latency and errors at each; latency per generated token with a 3-shard
memory ÷ without memory (same replica, one client), with the memory searched through its 3 shard
replicas and as the deployment is configured (by default a memory this small is searched inside
the model replica).

    python benchmarks/bench_serve.py [--checkpoint DIR] [--memory-tokens 32768] [--seconds 60]

The memory is built in-process from real text (Emma) into 3 shards; the model is the checkpoint
given, else a fresh SideNet on the default backbone shaped like a trained one (common.as_trained).
Half the clients read the memory. Prints one summary line per figure, then one JSON object.
"""

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from common import AUSTEN, as_trained, free_port, machine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--memory-tokens", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--torch-threads", type=int, default=None, help="the model replica's (default: 1, its CPUs)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="auto", help="the model replica's: float32, bfloat16, or auto (the server's choice)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--replica-search-tokens", type=int, default=None,
                    help="the deployment's replica_search_tokens (default: the server's; 0: shard replicas)")
    args = ap.parse_args()

    from ray import serve

    from longmem.loading import load_model
    from longmem.memory.encoder import MemoryEncoder, write_memory_dir
    from pipelines.ray_env import init_ray
    from pipelines.serve import app_builder

    model = load_model(checkpoint=args.checkpoint)
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if not args.checkpoint:
        as_trained(model).save_pretrained(root / "ckpt")
    checkpoint = args.checkpoint or str(root / "ckpt")
    ids = model.encode((AUSTEN / "emma.txt").read_text())[0, : args.memory_tokens].numpy()
    encoder = MemoryEncoder(model)
    third = len(ids) // 3
    docs = [(f"emma-{i}", ids[i * third : (i + 1) * third]) for i in range(3)]
    write_memory_dir(root / "memory", encoder, docs, shards=3)
    prompt = model.tokenizer.decode(ids[5000 : 5000 + args.prompt_tokens].tolist())
    chunk = model.config.memory.chunk_size
    del model, encoder

    init_ray(num_cpus=2, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    body = {"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0}

    def deploy(replica_search_tokens):
        extra = {} if replica_search_tokens is None else {"replica_search_tokens": replica_search_tokens}
        serve.run(app_builder({"model": {"checkpoint": checkpoint}, "memories": {"emma": str(root / "memory")},
                               "model_cpus": 1.0, "shard_cpus": 0.1, "ingress_cpus": 0.1,
                               "max_ongoing_requests": 64, "max_queued_requests": 64,
                               "torch_threads": args.torch_threads, "dtype": args.dtype, **extra}),
                  name="bench", route_prefix="/", blocking=False)
        return serve.get_deployment_handle("LongMemServer", "bench").describe.remote().result()["memories"][0]

    def per_token(extra) -> float:
        t0 = time.perf_counter()
        r = client.post("/v1/completions", json={**body, **extra}).json()
        return (time.perf_counter() - t0) / max(1, r["usage"]["completion_tokens"])

    def memory_ratio() -> dict:
        per_token({"memory": "emma"}), per_token({})  # warm-up
        with_mem, without = [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            with_mem.append(per_token({"memory": "emma"}))
            without.append(per_token({}))
        ms = {"ms_per_token_with_memory": 1000 * statistics.median(with_mem),
              "ms_per_token_without_memory": 1000 * statistics.median(without)}
        return {**ms, "ratio_with_over_without": ms["ms_per_token_with_memory"] / ms["ms_per_token_without_memory"]}

    from longmem.loading import inference_dtype

    report = {"machine": machine(), "dtype": inference_dtype("cpu") if args.dtype == "auto" else args.dtype,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "torch_threads": args.torch_threads or 1, "memory_chunks_per_shard": third // chunk, "shards": 3}
    # First the memory through its 3 shard replicas (as a memory above replica_search_tokens is
    # served), then the deployment as configured (the default searches this memory in the replica).
    remote = deploy(0)
    report["through_shard_replicas"] = {**memory_ratio(), "bytes_received_per_query_token":
                                        serve.get_deployment_handle("LongMemServer", "bench").describe.remote()
                                        .result()["memories"][0]["bytes_received_per_query_token"]}
    assert remote["searched_in"] == "shard replicas", remote
    served = deploy(args.replica_search_tokens)
    report["searched_in"] = served["searched_in"]
    report.update(memory_ratio())

    base = f"http://127.0.0.1:{port}"
    load = {}
    for n in [int(x) for x in args.clients.split(",")]:
        load[n] = run_clients(base, body, n, args.seconds)
    one = load.get(1)
    for n, r in load.items():
        if one and n != 1:
            r["tokens_per_s_over_1_client"] = r["tokens_per_s"] / one["tokens_per_s"]
    report["load"] = load
    serve.shutdown()
    shards = report["through_shard_replicas"]
    print(f"model replica dtype: {report['dtype']}")
    print(f"ms per generated token, 3-shard memory / none, searched in the {report['searched_in']}: "
          f"{report['ratio_with_over_without']:.2f} "
          f"({report['ms_per_token_with_memory']:.1f} / {report['ms_per_token_without_memory']:.1f} ms)")
    print(f"ms per generated token, 3-shard memory / none, through 3 shard replicas: "
          f"{shards['ratio_with_over_without']:.2f} "
          f"({shards['ms_per_token_with_memory']:.1f} / {shards['ms_per_token_without_memory']:.1f} ms)")
    print(f"bytes received from the 3 shard replicas per query token: {shards['bytes_received_per_query_token'] or 0:,.0f} "
          f"(a decoding step: one query token a row; a {args.prompt_tokens}-token prompt: {args.prompt_tokens})")
    print(f"load test: the memory searched in the {report['searched_in']}")
    for n, r in load.items():
        ratio = f", {r['tokens_per_s_over_1_client']:.2f}x 1 client" if "tokens_per_s_over_1_client" in r else ""
        print(f"{n} clients: {r['tokens_per_s']:.1f} tokens/s{ratio}; p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s; "
              f"{r['requests']} requests, {r['errors']} errors, mean batch {r.get('mean_batch', 0):.1f}")
    print(json.dumps(report, indent=2))


def run_clients(base: str, body: dict, clients: int, seconds: float) -> dict:
    """`clients` threads each sending one request after another for `seconds`; half read memory."""
    latencies, tokens, errors, stop = [], [0], [0], time.time() + seconds
    lock = threading.Lock()

    def worker(i):
        c = httpx.Client(base_url=base, timeout=300)
        while time.time() < stop:
            t0 = time.perf_counter()
            try:
                r = c.post("/v1/completions", json={**body, "memory": "emma" if i % 2 else []})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    tokens[0] += r.json()["usage"]["completion_tokens"]
                else:
                    errors[0] += 1

    from ray import serve

    handle = serve.get_deployment_handle("LongMemServer", "bench")
    before = handle.describe.remote().result()["batching"]
    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - t0
    after = handle.describe.remote().result()["batching"]
    latencies.sort()
    steps = after["steps"] - before["steps"]
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(latencies), "errors": errors[0],
            "tokens": tokens[0], "tokens_per_s": tokens[0] / elapsed, "requests_per_s": len(latencies) / elapsed,
            "p50_s": latencies[len(latencies) // 2] if latencies else None,
            "p99_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
            "mean_batch": (after["tokens"] - before["tokens"]) / steps if steps else 0.0,
            "max_batch": after["max_batch"]}


if __name__ == "__main__":
    sys.exit(main())
