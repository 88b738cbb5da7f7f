"""Math accuracy throughput: r1flow's reward (cheap checks, then Math-Verify in worker processes with
hard timeouts, the gold parsed once per prompt) against calling Math-Verify naively in one process.

Pairs are GRPO-like batches built from MATH-500: for each problem, `per_prompt` completions, half of
them its reference solution (correct, ending in \\boxed{}), half the same solution with a different
final answer, each wrong one distinct: a digit changed, a sign flipped or a term added, as near misses
are. Usage:

    python benchmarks/bench_rewards.py --math500 ../shared/benchmarks/math500.jsonl --pairs 10000
"""

from __future__ import annotations

import argparse
import json
import random
import time

from r1flow import rewards as R
from r1flow.rewards.math_answer import last_boxed


def near_miss(answer: str, rng: random.Random, k: int) -> str:
    digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
    kind = k % 3
    if kind == 0 and digits:
        i = rng.choice(digits)
        return answer[:i] + str((int(answer[i]) + rng.randrange(1, 10)) % 10) + answer[i + 1 :]
    if kind == 1:
        return answer[1:] if answer.startswith("-") else "-" + answer
    if answer.lstrip("-").isdigit():  # a different number, as a model would write it
        return str(int(answer) + k)
    return f"{answer}+{k}"


def build_pairs(path: str, n_pairs: int, per_prompt: int, seed: int = 0) -> tuple[list[str], list[str]]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    rng = random.Random(seed)
    golds, completions = [], []
    i = 0
    while len(golds) < n_pairs:
        row = rows[i % len(rows)]
        sol = row["solution"]
        start = sol.rfind("\\boxed{")
        boxed = last_boxed(sol)
        for j in range(per_prompt):
            golds.append(row["answer"])
            if j % 2 == 0 or boxed is None:
                completions.append(sol)
            else:
                wrong = near_miss(boxed, rng, j // 2)
                end = start + len("\\boxed{") + len(boxed)
                completions.append(sol[:start] + "\\boxed{" + wrong + sol[end:])
        i += 1
    return golds[:n_pairs], completions[:n_pairs]


def naive(golds, completions, timeout_s: int):
    """What a reference script does: parse both and verify, per sample, in the calling process."""
    from math_verify import parse, verify

    out = []
    for g, c in zip(golds, completions):
        out.append(bool(verify(parse("\\boxed{" + g + "}", parsing_timeout=timeout_s), parse(c, parsing_timeout=timeout_s),
                               timeout_seconds=timeout_s)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--math500", required=True)
    ap.add_argument("--pairs", type=int, default=10000)
    ap.add_argument("--per-prompt", type=int, default=16, help="completions per prompt (G)")
    ap.add_argument("--batch", type=int, default=256, help="pairs per reward call (a GRPO step's batch)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=5)
    a = ap.parse_args()
    golds, comps = build_pairs(a.math500, a.pairs, a.per_prompt)

    acc = R.get("accuracy")
    acc(comps[:2], golds[:2], workers=a.workers, timeout_s=a.timeout)  # start the pool outside the clock
    t0 = time.perf_counter()
    ours = []
    for s in range(0, len(golds), a.batch):
        ours += acc(comps[s : s + a.batch], golds[s : s + a.batch], workers=a.workers, timeout_s=a.timeout)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = naive(golds, comps, a.timeout)
    t_naive = time.perf_counter() - t0

    ours_ok = [r.score > 0 for r in ours]
    differ = [i for i, (x, y) in enumerate(zip(ours_ok, ref)) if x != y]
    timeouts = sum(r.reason.endswith("timeout") for r in ours)
    print(f"pairs {len(golds)}  correct (naive) {sum(ref)}  timeouts (ours) {timeouts}")
    print(f"r1flow: {len(golds) / t_ours:8.1f} checks/s  ({t_ours:.1f} s)")
    print(f"naive : {len(golds) / t_naive:8.1f} checks/s  ({t_naive:.1f} s)")
    print(f"ratio : {t_naive / t_ours:.2f}x   verdicts differ on {len(differ)} pairs")
    for i in differ[:10]:
        print(f"  gold {golds[i]!r}  ours {ours[i].score} ({ours[i].reason}, {ours[i].extracted!r})  naive {ref[i]}")


if __name__ == "__main__":
    main()
