"""Rule `tasks`: write the train / validation / test prompt tables."""

import argparse
import logging

from _common import json_arg, setup

from r1flow.data import tasks
from r1flow.data.artifacts import write_table
from r1flow.data.schemas import TASKS

log = logging.getLogger("scripts.make_tasks")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=json_arg, required=True, help="the config's `data` section as JSON")
    for split in ("train", "validation", "test"):
        ap.add_argument(f"--{split}", required=True, help=f"output parquet for the {split} split")
    a = ap.parse_args()
    setup()
    splits = tasks.prepare_splits(a.data)
    for split, df in splits.items():
        write_table(df, getattr(a, split), TASKS)
        log.info(f"{split}: {len(df)} prompts -> {getattr(a, split)}")


if __name__ == "__main__":
    main()
