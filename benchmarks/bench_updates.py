"""Several updates per rollout on the default miniature: R1-Zero with grpo.updates_per_rollout = U against
the same run with one update per step.

    python benchmarks/bench_updates.py --study /tmp/study --workdir /tmp/updates [--seeds 0 1] [--updates 4]
        [--eval-every 20] [--out benchmarks/results/updates_per_rollout/NAME.md]

--study is a finished `benchmarks/bench_findings.py` workdir: its seed{N}/ runs of the default are the
baselines (their R1-Zero validation curves) and give the base model and the task splits, copied here, so
only the R1-Zero job runs again (snakemake --allowed-rules r1_zero), with the same config and seed offset
plus `updates_per_rollout: U` and validation every --eval-every steps (validation does not change the
trajectory: grpo.NOT_TRAJECTORY). Prints, per seed: the baseline's final validation pass@1, the steps the
U-update run took to reach it, both curves, the samples drawn per step and the job's wall time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from r1flow.provenance import describe_machine  # noqa: E402

INPUTS = ("models/base", "data/tasks")


def run(study: Path, workdir: Path, seed: int, updates: int, eval_every: int) -> dict:
    src = study / f"seed{seed}"
    wd = workdir / f"seed{seed}-u{updates}"
    curve = wd / "results" / "r1_zero" / "validation_curve.csv"
    if not curve.exists():
        if wd.exists():
            shutil.rmtree(wd)
        for rel in INPUTS:
            shutil.copytree(src / "results" / rel, wd / "results" / rel)
        extra = wd / "updates.yaml"
        extra.write_text(yaml.safe_dump({"r1_zero": {"grpo": {"updates_per_rollout": updates, "eval_every": eval_every}}}))
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(wd),
               "results/r1_zero/validation_curve.csv", "--cores", "1", "--allowed-rules", "r1_zero",
               "--rerun-triggers", "mtime", "--configfile", str(src / "bench_config.yaml"), str(extra)]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        (wd / "wall_s").write_text(f"{time.time() - t0:.1f}\n")
        if p.returncode:
            raise SystemExit(f"seed {seed}: snakemake failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    base = pd.read_csv(src / "results" / "r1_zero" / "validation_curve.csv")
    mine = pd.read_csv(curve)
    target = float(base["val_pass@1"].iloc[-1])
    reached = mine[mine["val_pass@1"] >= target]
    metrics = pd.read_csv(wd / "results" / "r1_zero" / "metrics.csv")
    job = pd.read_csv(wd / "results" / "benchmarks" / "r1_zero.tsv", sep="\t")
    base_job = pd.read_csv(src / "results" / "benchmarks" / "r1_zero.tsv", sep="\t")
    cfg = yaml.safe_load((src / "bench_config.yaml").read_text())["r1_zero"]["grpo"]
    return {"seed": seed, "target": target, "steps": int(base["step"].iloc[-1]),
            "reached_at": int(reached["step"].iloc[0]) if len(reached) else None,
            "final": float(mine["val_pass@1"].iloc[-1]), "best": float(mine["val_pass@1"].max()),
            "base_curve": base[["step", "val_pass@1"]].values.tolist(),
            "curve": mine[["step", "val_pass@1"]].values.tolist(),
            "samples_per_step": cfg["prompts_per_step"] * cfg["num_generations"],
            "clip_fraction": float(metrics["clip_fraction"].mean()),
            "job_s": float(job["s"].iloc[0]), "base_job_s": float(base_job["s"].iloc[0])}


def table(rows: list[dict], updates: int) -> str:
    lines = [f"| seed offset | one update: final val pass@1 (step) | {updates} updates: step reaching it | "
             f"{updates} updates: final / best | samples per step | mean clip fraction | R1-Zero job (s): "
             f"one update / {updates} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['target']:.3f} ({r['steps']}) | {r['reached_at'] or 'not reached'} | "
                     f"{r['final']:.3f} / {r['best']:.3f} | {r['samples_per_step']} | {r['clip_fraction']:.4f} | "
                     f"{r['base_job_s']:.0f} / {r['job_s']:.0f} |")
    curves = [f"- seed offset {r['seed']}: one update " + ", ".join(f"{int(s)}: {v:.3f}" for s, v in r["base_curve"])
              + f"; {updates} updates " + ", ".join(f"{int(s)}: {v:.3f}" for s, v in r["curve"]) for r in rows]
    return "\n".join(lines + ["", "Validation pass@1 by step:", *curves, "", f"Machine: {describe_machine()}."])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--updates", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = [run(Path(a.study), Path(a.workdir), s, a.updates, a.eval_every) for s in a.seeds]
    text = table(rows, a.updates)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
