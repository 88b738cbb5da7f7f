"""Rule `stage_curves`: validation curves of the RL stages and loss curves of the SFT stages in one plot."""

import argparse

import pandas as pd
from _common import setup

from r1flow.evaluation.report import plot_stages


def named(items):
    out = {}
    for item in items:
        name, path = item.split("=", 1)
        out[name] = pd.read_csv(path)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rl", nargs="+", required=True, help="name=validation_curve.csv")
    ap.add_argument("--sft", nargs="+", required=True, help="name=sft_metrics.csv")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    setup()
    plot_stages(named(a.rl), named(a.sft), a.out)


if __name__ == "__main__":
    main()
