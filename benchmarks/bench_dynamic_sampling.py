"""DAPO's dynamic sampling on a real pretrained model: R1-Zero on SmolLM2-135M-Instruct
(config/smollm2_r1_zero.yaml) with grpo.dynamic_sampling on and off, on two seed offsets.

    python benchmarks/bench_dynamic_sampling.py --workdir /tmp/dyn [--seeds 0 1] [--parallel 2]
        [--out benchmarks/results/dynamic_sampling/NAME.md]

Each run is config/config.yaml, then config/smollm2_r1_zero.yaml, then the budget below (merged as
Snakemake merges --configfile files), every `seed` shifted by the offset, and only the R1-Zero job (with the
task splits it needs) is built. The budget is a cut-down copy of the config, so that four runs fit in about
75 minutes on 2 cores: 4 prompts a step instead of 8 (G = 8 kept), 20 steps instead of 40, validation every
5 steps on 32 validation prompts x 2 samples, one thread a job so that two jobs share the 2 cores. Needs the GGUF
file under models/smollm2 (the config's comments say how to fetch it); it is linked into each workdir.

Prints, per seed: the final validation pass@1 of the run without dynamic sampling, the step and the
completions sampled when the run with it first reached that, both curves, the completions sampled per step
(metrics.csv's samples_drawn) and each job's wall time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_default import shift_seeds  # noqa: E402
from r1flow.config import validate_config  # noqa: E402
from r1flow.provenance import describe_machine  # noqa: E402

BUDGET = {"threads": 1,
          "r1_zero": {"grpo": {"prompts_per_step": 4, "steps": 20, "eval_every": 5, "eval_prompts": 32,
                               "save_every": 5}}}
MODEL = "models/smollm2"


def config(seed: int, dynamic: bool) -> dict:
    from snakemake.utils import update_config

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(cfg, yaml.safe_load((ROOT / "config" / "smollm2_r1_zero.yaml").read_text()))
    update_config(cfg, BUDGET)
    update_config(cfg, {"r1_zero": {"grpo": {"dynamic_sampling": dynamic}}})
    return shift_seeds(validate_config(cfg, ROOT / "workflow" / "schemas" / "config.schema.yaml"), seed)


def run(workdir: Path, seed: int, dynamic: bool) -> Path:
    wd = workdir / f"seed{seed}-{'dynamic' if dynamic else 'plain'}"
    cfg = config(seed, dynamic)
    res = wd / cfg["results"]
    curve = res / "r1_zero" / "validation_curve.csv"
    if curve.exists():
        return res
    if wd.exists():
        shutil.rmtree(wd)
    (wd / MODEL).parent.mkdir(parents=True)
    (wd / MODEL).symlink_to((ROOT / MODEL).resolve())
    conf = wd / "bench_config.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(wd),
           "--configfile", str(conf), "--cores", "1", str(curve.relative_to(wd))]
    t0 = time.time()
    with open(wd / "snakemake.log", "w") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    (wd / "wall_s").write_text(f"{time.time() - t0:.1f}\n")
    if p.returncode:
        raise SystemExit(f"{wd}: snakemake failed, see {wd / 'snakemake.log'}")
    return res


def workdir_of(res: Path) -> Path:
    """The run's folder (with bench_config.yaml and wall_s) above its results folder."""
    return next(d for d in res.parents if (d / "bench_config.yaml").exists())


def summary(seed: int, plain: Path, dyn: Path) -> dict:
    base = pd.read_csv(plain / "r1_zero" / "validation_curve.csv")
    mine = pd.read_csv(dyn / "r1_zero" / "validation_curve.csv")
    m_dyn = pd.read_csv(dyn / "r1_zero" / "metrics.csv")
    cfg = yaml.safe_load((workdir_of(plain) / "bench_config.yaml").read_text())["r1_zero"]["grpo"]
    per_step = cfg["prompts_per_step"] * cfg["num_generations"]
    drawn = m_dyn.set_index("step")["samples_drawn"]
    target = float(base["val_pass@1"].iloc[-1])
    hit = mine[(mine["val_pass@1"] >= target) & (mine["step"] > 0)]
    reached = int(hit["step"].iloc[0]) if len(hit) else None
    return {"seed": seed, "target": target, "steps": int(base["step"].iloc[-1]), "reached_at": reached,
            "samples_to_reach": int(drawn.loc[drawn.index <= reached].sum()) if reached else None,
            "plain_samples": per_step * int(base["step"].iloc[-1]), "per_step": per_step,
            "dyn_mean": float(drawn.mean()), "dyn_max": int(drawn.max()),
            "extra_steps": int((drawn > per_step).sum()), "n_steps": len(drawn),
            "final": float(mine["val_pass@1"].iloc[-1]), "best": float(mine["val_pass@1"].max()),
            "start": float(base["val_pass@1"].iloc[0]),
            "base_curve": base[["step", "val_pass@1"]].values.tolist(),
            "curve": mine[["step", "val_pass@1"]].values.tolist(),
            "wall": [float((workdir_of(r) / "wall_s").read_text()) for r in (plain, dyn)]}


def table(rows: list[dict]) -> str:
    lines = ["| seed offset | without: val pass@1 at step 0 -> final (step) | with: step reaching that final | "
             "with: completions sampled to reach it (without: to its end) | with: final / best | with: "
             "completions per step, mean (max; steps that drew more than one batch) | wall s: without / with |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = r["reached_at"] if r["reached_at"] is not None else "not reached"
        samples = f"{r['samples_to_reach']:,}" if r["samples_to_reach"] else "-"
        lines.append(f"| {r['seed']} | {r['start']:.3f} -> {r['target']:.3f} ({r['steps']}) | {reach} | {samples} "
                     f"({r['plain_samples']:,}) | {r['final']:.3f} / {r['best']:.3f} | {r['dyn_mean']:.1f} "
                     f"({r['dyn_max']}; {r['extra_steps']} of {r['n_steps']}) against {r['per_step']} | "
                     f"{r['wall'][0]:.0f} / {r['wall'][1]:.0f} |")
    curves = [f"- seed offset {r['seed']}: without " + ", ".join(f"{int(s)}: {v:.3f}" for s, v in r["base_curve"])
              + "; with " + ", ".join(f"{int(s)}: {v:.3f}" for s, v in r["curve"]) for r in rows]
    return "\n".join(lines + ["", "Validation pass@1 (32 prompts x 2 samples) by step:", *curves, "",
                              f"Budget over config/smollm2_r1_zero.yaml: {BUDGET}.", "",
                              f"Machine: {describe_machine()}."])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--parallel", type=int, default=2, help="jobs at once (each on one thread)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not (ROOT / MODEL).exists():
        raise SystemExit(f"{ROOT / MODEL} is missing: see config/smollm2_r1_zero.yaml's first lines")
    wd = Path(a.workdir)
    jobs = [(s, d) for s in a.seeds for d in (False, True)]
    with ThreadPoolExecutor(a.parallel) as pool:
        done = dict(zip(jobs, pool.map(lambda j: run(wd, *j), jobs)))
    rows = [summary(s, done[(s, False)], done[(s, True)]) for s in a.seeds]
    text = table(rows)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
