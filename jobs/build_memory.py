"""Job: build a sharded memory from corpora (pipelines/build_memory.py).

    python jobs/build_memory.py --set job.corpus='[data/books]' --set job.out=memory/
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/build_memory.py ...
"""

import json

from common import load_config, run


def main(argv=None) -> int:
    config = load_config("build_memory", argv)
    from pipelines.build_memory import BuildJob, build_memory

    summary = build_memory(BuildJob(**config["job"]).validate(), address=config.get("address"))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    run(main)
