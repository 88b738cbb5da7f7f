"""Rule `r1_zero_report`: the results table (CSV and markdown) and the training plots."""

import argparse
import logging

import pandas as pd
from _common import setup

from r1flow.data.artifacts import read_table
from r1flow.data.schemas import EVAL_SUMMARY, GRPO_METRICS
from r1flow.evaluation.report import plot_training, write_tables

log = logging.getLogger("scripts.report")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--summaries", nargs="+", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--validation-curve", required=True)
    ap.add_argument("--table-csv", required=True)
    ap.add_argument("--table-md", required=True)
    ap.add_argument("--accuracy-plot", required=True)
    ap.add_argument("--length-plot", required=True)
    a = ap.parse_args()
    setup()
    table = write_tables([read_table(p, EVAL_SUMMARY) for p in a.summaries], a.table_csv, a.table_md,
                         "R1-Zero on held-out prompts")
    plot_training(read_table(a.metrics, GRPO_METRICS), pd.read_csv(a.validation_curve),
                  a.accuracy_plot, a.length_plot)
    log.info("\n%s", table.to_string(index=False))


if __name__ == "__main__":
    main()
