"""Do the miniature's findings hold as statistics? The default on several seeds and on other rounding.

    python benchmarks/bench_findings.py --workdir DIR [--seeds 0 1 2 3 4] [--perturbed-seed 0]
        [--config config/config.yaml] [--out benchmarks/results/findings/NAME.md] [--write README.md]

Runs the default target (benchmarks/bench_default.py, one run after another, each from a clean results
folder) on every seed offset of --seeds, then once more on --perturbed-seed with ATen's vectorised CPU kernels
switched to their plain versions (ATEN_CPU_CAPABILITY=default): the same arithmetic with other rounding, as
on a CPU with other vector instructions. On this code one thread instead of two leaves the tiny model's loss
and gradients bit for bit the same, so it would not perturb anything; the plain kernels move the gradients by
about 5e-9, which a few hundred optimizer steps amplify like a change of CPU.

For each finding of the README it prints the margin on every run (points of held-out pass@1, or tokens and
re-checks for the trends), on how many runs it holds, and the mean margin over the seeds with its standard
error. A finding counts as shown when it holds on all but at most one run and its mean margin is at least
twice its standard error. A run whose results are complete is not run again (the command resumes).
With --write FILE, the block between `<!-- findings -->` and `<!-- /findings -->` in FILE is replaced by
held-out pass@1 of every model on every run, the findings table and the findings line, with the commit
and the machine the runs recorded: the README's figures are this command's output, never typed by hand.
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from readme_tables import _label, finding_margins, provenance_commit  # noqa: E402

sys.path.insert(0, str(ROOT))
from r1flow.provenance import describe_machine  # noqa: E402

PERTURBATION = {"ATEN_CPU_CAPABILITY": "default"}


def run(workdir: Path, config: str, seed: int, perturbed: bool) -> dict:
    """One run of the default, or its figures if the run already finished."""
    name = f"seed{seed}" + ("-plain-kernels" if perturbed else "")
    wd, log = workdir / name, workdir / f"{name}.log"
    res = wd / "results"
    if not (res / "tables" / "benchmarks.csv").exists():
        if wd.exists():
            shutil.rmtree(wd)  # an interrupted run: its times would be wrong, so it starts again
        env = dict(os.environ, **(PERTURBATION if perturbed else {}))
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_default.py"), "--workdir", str(wd),
               "--config", config, "--seed-offset", str(seed)]
        print(f"running {name} ...", flush=True)
        with open(log, "w") as f:
            p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if p.returncode:
            raise SystemExit(f"{name} failed; see {log}")
    wall = next((float(line.split(":")[1].split()[0]) for line in log.read_text().splitlines()
                 if line.startswith("wall time")), math.nan) if log.exists() else math.nan
    t = pd.read_csv(res / "tables" / "benchmarks.csv")
    pass1 = {m: 100 * float(v) for m, v in t[t["benchmark"] == "held_out"].set_index("model")["pass@1"].items()}
    rec = json.loads((res / "provenance" / "benchmark_table.json").read_text())
    mach = describe_machine(rec["machine"]) if "machine" in rec else None
    return {"run": name, "seed": seed, "perturbed": perturbed, "wall_s": wall, "pass@1": pass1,
            "commit": provenance_commit(res), "machine": mach, **finding_margins(res)}


def mean_se(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return (xs[0] if xs else math.nan), math.nan
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summarise(runs: list[dict]) -> tuple[str, list[dict]]:
    """The findings table (markdown) and its rows."""
    names = [k for k in runs[0] if isinstance(runs[0][k], dict) and "margin" in runs[0][k]]
    seeds = [r for r in runs if not r["perturbed"]]
    rows = []
    for name in names:
        margins = [r[name]["margin"] for r in runs]
        held = [r[name]["holds"] for r in runs]
        m, se = mean_se([r[name]["margin"] for r in seeds])
        shown = sum(held) >= len(runs) - 1 and not math.isnan(se) and m >= 2 * se and m > 0
        rows.append({"finding": name, "margins": margins, "holds": sum(held), "runs": len(runs),
                     "mean": m, "se": se, "shown": shown, "unit": runs[0][name]["unit"]})
    head = "| finding | " + " | ".join(r["run"] for r in runs) + " | holds on | mean ± SE over seeds | shown |"
    lines = [head, "|" + "---|" * (len(runs) + 4)]
    for r in rows:
        cells = [f"{x:+.1f}" if r["unit"] == "points" or abs(x) >= 1 else f"{x:+.3f}" for x in r["margins"]]
        lines.append(f"| {r['finding']} ({r['unit']}) | " + " | ".join(cells)
                     + f" | {r['holds']}/{r['runs']} | {r['mean']:+.2f} ± {r['se']:.2f} | "
                     + ("yes" if r["shown"] else "**not shown**") + " |")
    lines.append("| wall time (s) | " + " | ".join(f"{r['wall_s']:.0f}" for r in runs) + " | | | |")
    return "\n".join(lines), rows


def pass_table(runs: list[dict]) -> str:
    """Held-out pass@1 (%) of every model on every run, with the mean and standard error over the seeds."""
    models = list(runs[0]["pass@1"])
    seeds = [r for r in runs if not r["perturbed"]]
    lines = ["| held-out pass@1 | " + " | ".join(r["run"] for r in runs) + " | mean ± SE over seeds |",
             "|" + "---|" * (len(runs) + 2)]
    for m in models:
        mean, se = mean_se([r["pass@1"][m] for r in seeds])
        lines.append(f"| {_label(m)} | " + " | ".join(f"{r['pass@1'][m]:.1f}" for r in runs)
                     + f" | {mean:.1f} ± {se:.1f} |")
    return "\n".join(lines)


def findings_line(rows: list[dict]) -> str:
    def fmt(r):
        return f"{r['finding']} ({r['holds']}/{r['runs']} runs, {r['mean']:+.2f} ± {r['se']:.2f} {r['unit']})"
    shown = [fmt(r) for r in rows if r["shown"]]
    not_shown = [fmt(r) for r in rows if not r["shown"]]
    return ("**Shown** (holds on all runs but at most one, mean margin at least twice its standard error): "
            + "; ".join(shown) + ". **Not shown**: " + ("; ".join(not_shown) or "none") + ".")


def write_block(path: Path, runs: list[dict], table: str, rows: list[dict]) -> None:
    """Replace the findings block of `path` with this study's figures."""
    commits = sorted({r["commit"] for r in runs})
    machines = sorted({r["machine"] for r in runs if r["machine"]})
    where = ("; ".join(machines) if machines else
             f"not recorded by the runs (this summary was written on {describe_machine()})")
    body = "\n\n".join([
        f"Commit {', '.join(commits)}; machine: {where}; `snakemake --cores 2` from a clean `results/` per run, "
        f"one run at a time; written by `python benchmarks/bench_findings.py --workdir DIR --write {path.name}`.",
        pass_table(runs), "Each finding's margin on each run (points of held-out pass@1; tokens and re-checks "
        "for the trends, the smallest rise from one quarter of R1-Zero's training to the next):", table,
        findings_line(rows)])
    text = path.read_text()
    new, n = re.subn(r"<!-- findings -->.*?<!-- /findings -->", lambda _: f"<!-- findings -->\n{body}\n<!-- /findings -->",
                     text, flags=re.S)
    if n != 1:
        raise SystemExit(f"{path}: no single <!-- findings --> ... <!-- /findings --> block to replace")
    path.write_text(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--perturbed-seed", type=int, default=0, help="-1: no perturbed run")
    ap.add_argument("--out", default=None, help="also write the table and the figures (.md and .json)")
    ap.add_argument("--write", default=None, help="a markdown file whose findings block is rewritten")
    a = ap.parse_args()
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    runs = [run(wd, a.config, s, False) for s in a.seeds]
    if a.perturbed_seed >= 0:
        runs.append(run(wd, a.config, a.perturbed_seed, True))
    table, rows = summarise(runs)
    print(table)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(pass_table(runs) + "\n\n" + table + "\n")
        out.with_suffix(".json").write_text(json.dumps({"runs": runs, "findings": rows}, indent=1) + "\n")
    if a.write:
        write_block(Path(a.write), runs, table, rows)


if __name__ == "__main__":
    main()
