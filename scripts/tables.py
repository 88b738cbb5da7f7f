"""Rule `benchmark_table`: evaluation summaries -> one table in the paper's layout (CSV and markdown)."""

import argparse
import logging

from _common import setup

from r1flow.data.artifacts import read_table
from r1flow.data.schemas import EVAL_SUMMARY
from r1flow.evaluation.report import plot_benchmarks, write_tables

log = logging.getLogger("scripts.tables")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--summaries", nargs="+", required=True)
    ap.add_argument("--table-csv", required=True)
    ap.add_argument("--table-md", required=True)
    ap.add_argument("--plot", default=None, help="pass@1 bar chart (PNG)")
    ap.add_argument("--title", default="Evaluation")
    a = ap.parse_args()
    setup()
    table = write_tables([read_table(p, EVAL_SUMMARY) for p in a.summaries], a.table_csv, a.table_md, a.title)
    if a.plot:
        plot_benchmarks(table, a.plot)
    log.info("\n%s", table.to_string(index=False))


if __name__ == "__main__":
    main()
