"""Write the README's result tables from a finished run's `results/`, stating the commit they came from.

    python benchmarks/readme_tables.py --results RUN/results [--label default-seed0] [--write README.md]
        [--benchmark held_out] [--base-label "base (tiny Llama)"] [--jobs]

Prints a markdown block: the held-out table of the default target (pass@1, cons@k, format, length of
every model), the commit recorded in the run's provenance (and whether the tree was modified), and each
job's time. With --write, replaces the block between `<!-- results:LABEL -->` and `<!-- /results:LABEL -->`
in that file, so the README's figures are always a run's own output, never typed by hand. --jobs adds a
table of every job's wall time and peak resident memory (what a real-model config's `resources` are
declared from).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

from r1flow.evaluation.report import format_cell
from r1flow.rewards.grading import paired_difference, per_problem_pass_at_1

LABELS = {
    "base": "base (tiny Llama)",
    "r1_zero": "R1-Zero",
    "cold_start": "cold start",
    "reasoning_rl": "reasoning-oriented RL",
    "r1_sft": "SFT on rejection samples + non-reasoning data",
    "r1": "**R1** (RL for all scenarios)",
}


def _label(model: str, base_label: str | None = None) -> str:
    if model == "base" and base_label:
        return base_label
    if model.startswith("distill_"):
        return f"distilled student ({model[len('distill_'):]})"
    if model.startswith("rl_only_"):
        return f"RL-only student ({model[len('rl_only_'):]})"
    return LABELS.get(model, model)


def provenance_commit(results: Path) -> str:
    rec = json.loads((results / "provenance" / "benchmark_table.json").read_text())
    git = rec["git"]
    return f"{git['commit'][:10]}{' (with uncommitted changes)' if git['dirty'] else ''}"


def block(results: Path, benchmark: str = "held_out", base_label: str | None = None, jobs: bool = False) -> str:
    t = pd.read_csv(results / "tables" / "benchmarks.csv")
    t = t[t["benchmark"] == benchmark]
    k = int(t["cons_k"].dropna().iloc[0]) if t["cons_k"].notna().any() else None
    head = ["model", "pass@1"] + ([f"cons@{k}"] if k else []) + ["format", "length (tokens)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in t.iterrows():  # pass@1 with its standard error over problems, cons@k with its 95% interval
        cells = [_label(r["model"], base_label), format_cell(r, "pass@1")]
        if k:
            cells.append(format_cell(r, "cons@k"))
        cells += [f"{100 * r['format_rate']:.1f}", f"{r['mean_length']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    r0 = t.iloc[0]
    lines += ["", f"{int(r0['num_problems'])} held-out problems, n = {int(r0['n'])} samples each at temperature "
              f"{r0['temperature']} and top-p {r0['top_p']}, at most {int(r0['max_new_tokens'])} new tokens; "
              "pass@1 ± its standard error over problems, cons@k with a 95% bootstrap interval over problems. "
              f"Measured on commit `{provenance_commit(results)}`."]
    times, rss = [], {}
    for tsv in sorted((results / "benchmarks").glob("*.tsv")):
        b = pd.read_csv(tsv, sep="\t")
        times.append((float(b["s"].iloc[0]), tsv.stem))
        rss[tsv.stem] = float(b["max_rss"].iloc[0])
    lines += [""] + [f"- {f}" for f in findings(results, benchmark)]
    if times:
        top = ", ".join(f"{name} {s:.0f} s" for s, name in sorted(times, reverse=True)[:8])
        lines += ["", f"Job times (Snakemake's benchmark records, {len(times)} jobs, {sum(s for s, _ in times):.0f} s "
                  f"in all): {top}."]
    if jobs and times:
        lines += ["", "| job | wall time (s) | peak RSS (MB) |", "|---|---|---|"]
        lines += [f"| {name} | {s:.0f} | {rss[name]:,.0f} |" for s, name in sorted(times, key=lambda x: x[1])]
    return "\n".join(lines)


def findings(results: Path, benchmark: str = "held_out") -> list[str]:
    """The paper's findings as differences of held-out pass@1 (points) with the standard error of each
    difference (paired over the problems both models answered), and R1-Zero's length by quarter."""
    t = pd.read_csv(results / "tables" / "benchmarks.csv")
    p = {m: 100 * float(v) for m, v in t[t["benchmark"] == benchmark].set_index("model")["pass@1"].items()}
    out = []

    def per_problem(m):
        path = results / "eval" / m / benchmark / "samples.parquet"
        return per_problem_pass_at_1(pd.read_parquet(path)) if path.exists() else None

    def diff(a, b, what):
        if a in p and b in p:
            line = f"{what}: {p[a]:.1f} vs {p[b]:.1f} ({p[a] - p[b]:+.1f}"
            pa, pb = per_problem(a), per_problem(b)
            if pa is not None and pb is not None:
                d, se = paired_difference(pa, pb)
                line += f" ± {100 * se:.1f}" + ("; within two standard errors: not shown apart" if abs(d) <= 2 * se
                                                else "")
            out.append(line + ")")

    diff("r1", "r1_zero", "R1 vs R1-Zero")
    diff("cold_start", "base", "cold start vs base")
    diff("reasoning_rl", "cold_start", "reasoning RL vs cold start")
    diff("r1_sft", "reasoning_rl", "final SFT vs reasoning RL (the checkpoint that produced its data)")
    diff("r1", "r1_sft", "R1 vs final SFT")
    for m in p:
        if m.startswith("distill_"):
            diff(m, "rl_only_" + m[len("distill_"):], f"distilled vs RL-only student ({m[len('distill_'):]})")
    r = t[(t["benchmark"] == benchmark) & (t["model"] == "r1_zero")]
    if not r.empty and pd.notna(r["cons@k"].iloc[0]):
        out.append(f"R1-Zero cons@{int(r['cons_k'].iloc[0])} vs pass@1: {100 * r['cons@k'].iloc[0]:.1f} vs "
                   f"{100 * r['pass@1'].iloc[0]:.1f}")
    metrics = results / "r1_zero" / "metrics.csv"
    if metrics.exists():
        m = pd.read_csv(metrics)
        q = m.groupby(pd.qcut(m["step"], 4, labels=False))
        out.append("R1-Zero mean response length by quarter of training: "
                   + ", ".join(f"{x:.1f}" for x in q["completion_length"].mean()) + " tokens")
        if "reflections" in m:
            out.append("R1-Zero re-checked steps per completion by quarter: "
                       + ", ".join(f"{x:.3f}" for x in q["reflections"].mean()))
    return out


def finding_margins(results: Path, benchmark: str = "held_out") -> dict[str, dict]:
    """Each finding of the README as a margin that is positive (or, for ">=", not negative) when it holds:
    differences of held-out pass@1 in points, and for the trends the smallest rise from one quarter of
    R1-Zero's training to the next."""
    t = pd.read_csv(results / "tables" / "benchmarks.csv")
    t = t[t["benchmark"] == benchmark].set_index("model")
    p = {m: 100 * float(v) for m, v in t["pass@1"].items()}
    out = {}

    def add(name, margin, strict=True, unit="points"):
        out[name] = {"margin": margin, "holds": bool(margin > 0 if strict else margin >= 0), "unit": unit}

    add("RL learns (R1-Zero - base)", p["r1_zero"] - p["base"])
    add("cons@8 > pass@1 (R1-Zero)", 100 * float(t.loc["r1_zero", "cons@k"]) - p["r1_zero"])
    add("R1 >= R1-Zero", p["r1"] - p["r1_zero"], strict=False)
    add("cold start >= base", p["cold_start"] - p["base"], strict=False)
    add("reasoning RL > cold start", p["reasoning_rl"] - p["cold_start"])
    add("final SFT >= its data's checkpoint", p["r1_sft"] - p["reasoning_rl"], strict=False)
    for m in [m for m in p if m.startswith("distill_")]:
        add("distilled >= RL-only + 10", p[m] - p["rl_only_" + m[len("distill_"):]] - 10, strict=False)
    m = pd.read_csv(results / "r1_zero" / "metrics.csv")
    q = m.groupby(pd.qcut(m["step"], 4, labels=False))
    add("length rising each quarter", float(q["completion_length"].mean().diff().min()), unit="tokens")
    if "reflections" in m:
        add("re-checks rising each quarter", float(q["reflections"].mean().diff().min()), unit="re-checks")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="a run's results/ folder")
    ap.add_argument("--label", default="default", help="the README block to replace")
    ap.add_argument("--write", default=None, help="a markdown file with the block's markers")
    ap.add_argument("--benchmark", default="held_out", help="the benchmark whose table is written")
    ap.add_argument("--base-label", default=LABELS["base"], help="how the base model is named in the table")
    ap.add_argument("--jobs", action="store_true", help="also a table of each job's time and peak memory")
    a = ap.parse_args()
    text = block(Path(a.results), a.benchmark, a.base_label, a.jobs)
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
