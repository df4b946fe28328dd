"""Job: the memory-augmented completion endpoint with Ray Serve (pipelines/serve/).

    python jobs/serve.py --set args.checkpoint=ckpt/ --set args.memories='{books: memory/}'
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/serve.py ...

Runs until stopped (the job keeps the application up); `serve deploy cluster/serve_config.yaml`
is the declarative alternative.
"""

from common import load_config, run


def main(argv=None) -> int:
    config = load_config("serve", argv)
    from pipelines.serve import ServeArgs, run_local

    args = ServeArgs(**config.get("args", {}))
    http = config.get("http", {})
    print(f"serving on http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}", flush=True)
    run_local(args.model_dump(), host=http.get("host", "127.0.0.1"), port=int(http.get("port", 8000)),
              address=config.get("address"), blocking=True)
    return 0


if __name__ == "__main__":
    run(main)
