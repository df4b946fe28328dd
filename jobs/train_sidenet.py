"""Job: memory-augmented adaptation of the SideNet with Ray Train (pipelines/train_sidenet.py).

    python jobs/train_sidenet.py --set job.corpus='[data/books]' --set job.out=ckpt/ --set job.workers=2
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_sidenet.py ...
"""

import json

from common import load_config, run


def main(argv=None) -> int:
    config = load_config("train_sidenet", argv)
    from pipelines.train_sidenet import TrainJob, run_training

    job = TrainJob(**config["job"])
    job.train_config()
    summary = run_training(job, address=config.get("address"))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    run(main)
