"""Rule `non_reasoning_data`: writing, factual QA, self-cognition and translation as SFT data (section
2.3.3), from the preferred answers of the synthetic preference pairs, plus greetings without reasoning."""

import argparse
import logging

from _common import json_arg, setup

from r1flow.data.artifacts import read_table, write_table
from r1flow.data.cold_start import non_reasoning_rows
from r1flow.data.schemas import PREFERENCES, SFT_DATA

log = logging.getLogger("scripts.non_reasoning")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--settings", type=json_arg, required=True, help="the config's r1.non_reasoning section")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    setup()
    pairs = read_table(a.pairs, PREFERENCES)
    rows = non_reasoning_rows(pairs, a.settings["size"], a.settings["seed"])
    write_table(rows, a.out, SFT_DATA)
    log.info(f"non-reasoning data: {len(rows)} samples ({rows['source'].value_counts().to_dict()})")


if __name__ == "__main__":
    main()
