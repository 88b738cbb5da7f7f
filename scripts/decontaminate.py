"""Rule `decontamination`: n-gram overlap of the training prompts with every benchmark (r1flow.data.decontamination);
with data.decontamination.drop, the train and validation splits without their contaminated prompts."""

import argparse
import logging

from _common import json_arg, setup

from r1flow.data import decontamination as D
from r1flow.data.artifacts import read_table, write_table, write_text
from r1flow.data.schemas import DECONTAMINATION, DECONTAMINATION_MATCHES, TASKS
from r1flow.evaluation.benchmarks import BenchmarkSpec, load_benchmark

log = logging.getLogger("scripts.decontaminate")


def named(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--settings", type=json_arg, required=True, help="the config's data.decontamination section")
    ap.add_argument("--benchmarks", type=json_arg, required=True,
                    help="{name: benchmark entry}: what says where each benchmark's questions come from")
    ap.add_argument("--data", type=named, nargs="*", default=[],
                    help="NAME=PATH: a benchmark's file, overriding its entry's path (built by another rule)")
    for split in D.SPLITS:
        ap.add_argument(f"--{split}", required=True, help=f"the {split} split (TASKS parquet)")
        ap.add_argument(f"--{split}-out", default=None, help=f"with drop: the {split} split without its contaminated prompts")
    ap.add_argument("--table-csv", required=True)
    ap.add_argument("--table-md", required=True)
    ap.add_argument("--matches", required=True, help="output CSV: one row per contaminated (prompt, benchmark)")
    a = ap.parse_args()
    setup()
    n, drop = a.settings["ngram"], a.settings["drop"]
    files = dict(a.data)
    splits = {split: read_table(getattr(a, split), TASKS) for split in D.SPLITS}
    benchmarks = {}
    for name, entry in a.benchmarks.items():
        spec = BenchmarkSpec.from_config(name, {**entry, **({"path": files[name]} if name in files else {})})
        benchmarks[name] = load_benchmark(spec)
    summary, matches = D.check(splits, benchmarks, n)
    write_table(summary, a.table_csv, DECONTAMINATION)
    write_table(matches, a.matches, DECONTAMINATION_MATCHES)
    write_text(D.to_markdown(summary, matches, n, drop), a.table_md)
    for _, r in summary.iterrows():
        log.info(f"{r['split']} vs {r['benchmark']}: {r['contaminated']} of {r['prompts']} prompts share {n} words")
    if drop:
        outs = {split: getattr(a, f"{split}_out") for split in D.SPLITS}
        missing = [f"--{split}-out" for split, path in outs.items() if path is None]
        if missing:
            ap.error(f"settings.drop is true: {' and '.join(missing)} must be given")
        for split, clean in D.drop_contaminated(splits, matches).items():
            write_table(clean, outs[split], TASKS)
            log.info(f"{split}: {len(splits[split]) - len(clean)} contaminated prompts dropped, {len(clean)} left "
                     f"-> {outs[split]}")


if __name__ == "__main__":
    main()
