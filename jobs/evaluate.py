"""Job: the paper's evaluations on Ray Data actors (pipelines/evaluate.py).

    python jobs/evaluate.py --set job.task=suffix --set job.checkpoint=runs/longmem
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py ...
"""

from common import load_config, run


def main(argv=None) -> int:
    config = load_config("evaluate", argv)
    from pipelines.evaluate import EvalJob, evaluate

    job = EvalJob(**config["job"])
    report = evaluate(job, address=config.get("address"))
    print(open(f"{job.out}/report.md").read(), end="")
    print(f"seconds: {report['seconds']}")
    return 0


if __name__ == "__main__":
    run(main)
