"""Synthetic preference pairs for the reward models of section 2.3.4 (helpfulness, harmlessness)."""

import argparse
import logging

from _common import json_arg, setup

from r1flow.data.artifacts import write_table
from r1flow.data.preferences import make_preferences
from r1flow.data.schemas import PREFERENCES

log = logging.getLogger("scripts.preferences")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="output parquet (PREFERENCES schema)")
    ap.add_argument("--settings", type=json_arg, required=True,
                    help='JSON: {"helpfulness": pairs, "harmlessness": pairs, "seed": int, optional '
                         '"readable_share", "harmful_share", "unhelpful_kinds"}')
    a = ap.parse_args()
    setup()
    s = dict(a.settings)
    df = make_preferences(s.pop("helpfulness"), s.pop("harmlessness"), **s)
    write_table(df, a.out, PREFERENCES)
    counts = {k: int(v) for k, v in df["aspect"].value_counts().items()}
    log.info(f"preferences: {counts} pairs -> {a.out}")


if __name__ == "__main__":
    main()
