"""The main job end to end (pipelines/main_job.py): build memory, adapt the SideNet, serve, complete, score.

    python jobs/main.py [--set job.corpus=book.txt] [--set job.train_steps=40]
"""

from common import load_config, run


def main(argv=None) -> int:
    config = load_config("main", argv)
    from pipelines.main_job import MainJob, run_main_job

    run_main_job(MainJob(**config.get("job", {}), address=config.get("address")))
    return 0


if __name__ == "__main__":
    run(main)
