"""How a model checks its guesses on the guess tasks of a run's held-out evaluation (the default's 40%).

    python benchmarks/guess_checks.py --results RUN/results [--models base r1_zero ...]

For each model: held-out pass@1 on chains and on guess tasks, re-checks ("wait") per guess completion,
pass@1 by the number of re-checks, and what the model writes after a check whose result misses the
target: "wait" and another guess (a re-check), "x=" (it accepts the failed guess anyway) or nothing more
(it stops and answers from its head). Checks whose result meets the target are counted apart.
"""

import argparse
import re
from collections import Counter
from pathlib import Path

import pandas as pd

TRY = re.compile(r"try (\d+): ((?:\d+[-+*]\d+=-?\d+ ?)+)vs (\d+) ?(?:low |high )?(wait|x=\d+|)")


def checks(completion: str, target: str) -> Counter:
    """(result meets the target, what follows: wait / x / stop) for each checked guess of a completion."""
    out = Counter()
    for m in TRY.finditer(completion.split("</think>")[0]):
        result = m.group(2).split()[-1].split("=")[1]
        out[(result == target, m.group(4).split("=")[0] or "stop")] += 1
    return out


MODELS = ["base", "r1_zero", "cold_start", "reasoning_rl", "r1_sft", "r1", "distill_student", "rl_only_student"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True)
    ap.add_argument("--models", nargs="+", default=None, help="default: every model the run evaluated")
    a = ap.parse_args()
    res = Path(a.results)
    tasks = pd.read_parquet(res / "data" / "tasks" / "test.parquet").rename(columns={"prompt_id": "problem_id"})
    models = a.models or [m for m in MODELS if (res / "eval" / m / "held_out" / "samples.parquet").exists()]
    for model in models:
        d = pd.read_parquet(res / "eval" / model / "held_out" / "samples.parquet").merge(tasks, on="problem_id")
        d["rechecks"] = d["completion"].str.count(r"\bwait\b")
        g = d[d["task"] == "guess"]
        c = Counter()
        for comp, q in g[["completion", "question"]].to_numpy():
            c.update(checks(comp, q.rsplit(" = ", 1)[1]))
        missed = sum(v for (ok, _), v in c.items() if not ok)
        met = sum(v for (ok, _), v in c.items() if ok)
        print(f"{model}: pass@1 chains {100 * d[d.task == 'chain'].correct.mean():.1f}, guess tasks "
              f"{100 * g.correct.mean():.1f} ({len(g)} samples); re-checks per guess completion {g.rechecks.mean():.2f}")
        by = g.groupby(g["rechecks"].clip(upper=3))["correct"].agg(["mean", "size"])
        print("  pass@1 by re-checks (3 = 3 or more): "
              + ", ".join(f"{k}: {100 * r['mean']:.0f} ({int(r['size'])})" for k, r in by.iterrows()))
        if missed:
            print(f"  after a check that misses the target ({missed}): "
                  + ", ".join(f"{w} {100 * c[(False, w)] / missed:.0f}%" for w in ("wait", "stop", "x")))
        if met:
            print(f"  after a check that meets it ({met}): "
                  + ", ".join(f"{w} {100 * c[(True, w)] / met:.0f}%" for w in ("x", "stop", "wait")))


if __name__ == "__main__":
    main()
