"""Write the README's result tables from a finished run's `results/`, stating the commit they came from.

    python benchmarks/readme_tables.py --results RUN/results [--label default-seed0] [--write README.md]

Prints a markdown block: the held-out table of the default target (pass@1, cons@k, format, length of
every model), the commit recorded in the run's provenance (and whether the tree was modified), and each
job's time. With --write, replaces the block between `<!-- results:LABEL -->` and `<!-- /results:LABEL -->`
in that file, so the README's figures are always a run's own output, never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

LABELS = {
    "base": "base (tiny Llama)",
    "r1_zero": "R1-Zero",
    "cold_start": "cold start",
    "reasoning_rl": "reasoning-oriented RL",
    "r1_sft": "SFT on rejection samples + non-reasoning data",
    "r1": "**R1** (RL for all scenarios)",
}


def _label(model: str) -> str:
    if model.startswith("distill_"):
        return f"distilled student ({model[len('distill_'):]})"
    if model.startswith("rl_only_"):
        return f"RL-only student ({model[len('rl_only_'):]})"
    return LABELS.get(model, model)


def provenance_commit(results: Path) -> str:
    rec = json.loads((results / "provenance" / "benchmark_table.json").read_text())
    git = rec["git"]
    return f"{git['commit'][:10]}{' (with uncommitted changes)' if git['dirty'] else ''}"


def block(results: Path, benchmark: str = "held_out") -> str:
    t = pd.read_csv(results / "tables" / "benchmarks.csv")
    t = t[t["benchmark"] == benchmark]
    k = int(t["cons_k"].dropna().iloc[0]) if t["cons_k"].notna().any() else None
    head = ["model", "pass@1"] + ([f"cons@{k}"] if k else []) + ["format", "length (tokens)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in t.iterrows():
        cells = [_label(r["model"]), f"{100 * r['pass@1']:.1f}"]
        if k:
            cells.append(f"{100 * r['cons@k']:.1f}")
        cells += [f"{100 * r['format_rate']:.1f}", f"{r['mean_length']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    r0 = t.iloc[0]
    lines += ["", f"{int(r0['num_problems'])} held-out problems, n = {int(r0['n'])} samples each at temperature "
              f"{r0['temperature']} and top-p {r0['top_p']}, at most {int(r0['max_new_tokens'])} new tokens. "
              f"Measured on commit `{provenance_commit(results)}`."]
    times = []
    for tsv in sorted((results / "benchmarks").glob("*.tsv")):
        b = pd.read_csv(tsv, sep="\t")
        times.append((float(b["s"].iloc[0]), tsv.stem))
    if times:
        top = ", ".join(f"{name} {s:.0f} s" for s, name in sorted(times, reverse=True)[:8])
        lines += ["", f"Job times (Snakemake's benchmark records, {len(times)} jobs, {sum(s for s, _ in times):.0f} s "
                  f"in all): {top}."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="a run's results/ folder")
    ap.add_argument("--label", default="default", help="the README block to replace")
    ap.add_argument("--write", default=None, help="a markdown file with the block's markers")
    a = ap.parse_args()
    text = block(Path(a.results))
    print(text)
    if a.write:
        path = Path(a.write)
        start, end = f"<!-- results:{a.label} -->", f"<!-- /results:{a.label} -->"
        doc = path.read_text()
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        if not pattern.search(doc):
            raise SystemExit(f"{path} has no {start} ... {end} block")
        path.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", doc))


if __name__ == "__main__":
    main()
