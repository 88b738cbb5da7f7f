"""Grading n sampled completions per problem, and the metrics of section 3 over them. Evaluation
(r1flow.evaluation.runner) and GRPO's validation curve both use these.

- pass@1 = 1/k sum_i p_i, the mean correctness over the samples of a problem, averaged over problems;
- pass@k, the unbiased estimator of Chen et al. (2021) from n >= k samples;
- cons@k, majority vote over the first k samples, answers grouped by mathematical equivalence
  (so 1/2 and 0.5 vote together), ties credited by the mean correctness of the tied groups;
- error bars over problems: the standard error of pass@1, bootstrap intervals of pass@k and cons@k.
A truncated sample (no end of sequence within max_new_tokens) counts as wrong, whatever it contains, and
does not vote. Every metric is independent of the order of a problem's samples.
Asking for a k larger than the samples generated is an error, never a silently smaller k.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from r1flow import rewards as R
from r1flow.data.formats import reflections
from r1flow.rewards.math_answer import normalize, verify_pairs


def pass_at_1(correct: np.ndarray) -> float:
    """correct: (problems, k) of 0/1. pass@1 = 1/k sum_i p_i, averaged over problems."""
    return float(np.asarray(correct, dtype=float).mean(axis=1).mean())


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with c correct among n samples: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def equivalence_groups(answers: list[str | None], same: Callable[[list[str], list[str]], list[bool]] | None = None) -> list[int | None]:
    """A group id per answer (None for no answer): equal after normalisation, or judged equivalent by
    `same(preds, golds)` (default: the math verifier) between the groups' representatives.

    Independent of the answers' order: the normalised keys are compared in sorted order, each
    represented by its smallest raw spelling, so a permutation of the answers permutes the ids only."""
    keys = [None if a is None else normalize(a) for a in answers]
    rep_of: dict[str, str] = {}
    for a, key in zip(answers, keys):
        if key is not None and (key not in rep_of or a < rep_of[key]):
            rep_of[key] = a
    order = sorted(rep_of)
    index = {key: i for i, key in enumerate(order)}
    reps = [rep_of[key] for key in order]
    parent = list(range(len(reps)))
    if len(reps) > 1:  # merge groups whose representatives are equivalent (union-find)
        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        pairs = [(i, j) for i in range(len(reps)) for j in range(i + 1, len(reps))]
        if same is None:
            verdicts = [v is True for v, _ in verify_pairs([reps[j] for _, j in pairs], [reps[i] for i, _ in pairs])]
        else:
            verdicts = same([reps[j] for _, j in pairs], [reps[i] for i, _ in pairs])
        for (i, j), ok in zip(pairs, verdicts):
            if ok:
                ri, rj = root(i), root(j)
                parent[max(ri, rj)] = min(ri, rj)  # the smaller id is the root: no dependence on merge order
        parent = [root(i) for i in range(len(reps))]
    return [None if key is None else parent[index[key]] for key in keys]


def vote_credit(answers: list[str | None], correct: list[float], truncated: list[bool] | None = None,
                same=None) -> float:
    """The credit of one problem's majority vote (cons@k, section 3), in [0, 1].

    Only samples that ended (not truncated) and gave an answer vote: a sample cut off at the length
    limit has no final answer, whatever its text holds. A group is as correct as the mean correctness of
    its members (equivalent answers grade alike; the mean only matters where the grader disagrees with
    the grouping). A tie between the largest groups gives the mean of their correctness: the expected
    credit of a random tie-break, so the result never depends on the samples' order."""
    truncated = truncated if truncated is not None else [False] * len(answers)
    voters = [i for i, (a, t) in enumerate(zip(answers, truncated)) if a is not None and not t]
    if not voters:
        return 0.0
    ids = equivalence_groups([answers[i] for i in voters], same)
    members: dict[int, list[float]] = {}
    for i, g in zip(voters, ids):
        members.setdefault(g, []).append(float(correct[i]))
    best = max(len(m) for m in members.values())
    winners = [np.mean(m) for m in members.values() if len(m) == best]
    return float(np.mean(winners))


def cons_credits(answers: list[list[str | None]], correct: list[list[float]], k: int,
                 truncated: list[list[bool]] | None = None, same=None) -> np.ndarray:
    """Per-problem credit of the majority vote over the first k samples (see vote_credit)."""
    out = []
    for p, (ans, ok) in enumerate(zip(answers, correct)):
        if k > len(ans):
            raise ValueError(f"cons@{k} needs {k} samples per problem, got {len(ans)}")
        cut = None if truncated is None else list(truncated[p])[:k]
        out.append(vote_credit(list(ans)[:k], list(ok)[:k], cut, same))
    return np.asarray(out, dtype=float)


def cons_at_k(answers: list[list[str | None]], correct: list[list[float]], k: int,
              truncated: list[list[bool]] | None = None, same=None) -> float:
    """cons@k: the mean over problems of the credit of the majority answer of the first k samples."""
    credits = cons_credits(answers, correct, k, truncated, same)
    return float(credits.mean()) if len(credits) else 0.0


# -- error bars -----------------------------------------------------------------------------------------
def standard_error(per_problem: np.ndarray) -> float:
    """The standard error of a mean over problems: sample standard deviation / sqrt(problems). For
    pass@1 the per-problem values are each problem's mean over its n samples, so the spread is the one
    between problems (the one a new draw of problems would move), not between samples. NaN for one problem."""
    x = np.asarray(per_problem, dtype=float)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def bootstrap_interval(per_problem: np.ndarray, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean over problems (problems resampled with replacement),
    for metrics whose per-problem values are far from normal (cons@k's 0/1, pass@k near 1). Seeded, so a
    table is reproducible."""
    x = np.asarray(per_problem, dtype=float)
    if len(x) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def per_problem_pass_at_1(samples: pd.DataFrame) -> pd.Series:
    """Each problem's mean correctness over its samples (truncated samples wrong), indexed by problem_id."""
    correct = samples["correct"].astype(float).where(~samples["truncated"].astype(bool), 0.0)
    return correct.groupby(samples["problem_id"].astype(str)).mean()


def paired_difference(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """pass@1 of model a minus model b on the same problems, and the standard error of that difference
    from the per-problem differences (paired: the problems both models saw, so the spread of problem
    difficulty, shared by both, cancels out). Raises when they were not evaluated on the same problems."""
    if set(a.index) != set(b.index):
        raise ValueError(f"a paired difference needs the same problems: {len(set(a.index) ^ set(b.index))} differ")
    d = a.sort_index().to_numpy() - b.sort_index().to_numpy()
    return float(d.mean()), standard_error(d)


# -- sampling and grading -----------------------------------------------------------------------------
def sample_and_grade(generator, problems: pd.DataFrame, prompts: list[str], params,
                     grader: str, reward_options: dict | None = None, prefilled_think: bool = False,
                     format_reward: str = "format") -> pd.DataFrame:
    """n = params.n completions per problem, each graded; one row per sample (the SAMPLES schema)."""
    out = generator.generate(prompts, params)
    n = params.n
    golds = [str(a) for a in problems["answer"] for _ in range(n)]
    texts = [("<think>" + t) if prefilled_think else t for t in out.texts]
    _, per = R.score_batch(texts, golds, {grader: 1.0, format_reward: 1.0, "language_consistency": 1.0},
                           reward_options)
    acc, fmt, lang = per[grader], per[format_reward], per["language_consistency"]
    truncated = out.truncated.tolist()
    return pd.DataFrame({
        "benchmark": [b for b in problems["benchmark"] for _ in range(n)],
        "problem_id": [p for p in problems["problem_id"] for _ in range(n)],
        "sample": [j for _ in range(len(problems)) for j in range(n)],
        "prompt": [p for p in prompts for _ in range(n)],
        "completion": out.texts,
        "extracted": [a.extracted for a in acc],
        # section 3: an answer cut off at the length limit is wrong, even if a number in it matches
        "correct": [0.0 if t else a.score for a, t in zip(acc, truncated)],
        "reason": ["truncated" if t else a.reason for a, t in zip(acc, truncated)],
        "format": [f.score for f in fmt],
        # section 2.3.2: share of target-language words in the chain of thought (none when it has no words)
        "language": [float("nan") if la.reason == "no_words" else la.score for la in lang],
        "completion_tokens": out.lengths.tolist(),
        "truncated": truncated,
    })


def summarize(samples: pd.DataFrame, pass_ks=(1,), cons_k: int | None = None, vote: bool = True) -> dict:
    """pass@1 with its standard error over problems, pass@k for each k and cons@k with bootstrap
    intervals over problems, format rate, mean length, truncation rate and sandbox errors of a samples
    table. Every metric is independent of the order of a problem's samples."""
    groups = [g.sort_values("sample") if "sample" in g else g for _, g in samples.groupby("problem_id", sort=False)]
    n = min(len(g) for g in groups)
    if max(len(g) for g in groups) != n:
        raise ValueError("every problem must have the same number of samples")
    # section 3: a sample cut off at the length limit is wrong, whatever it contains
    truncated = np.stack([g["truncated"].to_numpy(dtype=bool)[:n] for g in groups])
    correct = np.where(truncated, 0.0, np.stack([g["correct"].to_numpy(dtype=float)[:n] for g in groups]))
    per_problem = correct.mean(axis=1)
    row = {"num_problems": len(groups), "n": n, "pass@1": pass_at_1(correct),
           "pass@1_se": standard_error(per_problem)}
    for k in pass_ks:
        if k != 1:
            values = np.array([pass_at_k(n, int(c.sum()), k) for c in correct])
            row[f"pass@{k}"] = float(values.mean())
            row[f"pass@{k}_lo"], row[f"pass@{k}_hi"] = bootstrap_interval(values)
    # no vote asked (or none possible, as for programs)
    row["cons@k"] = row["cons_k"] = row["cons@k_lo"] = row["cons@k_hi"] = None
    if cons_k is not None and vote:
        answers = [[None if pd.isna(a) else a for a in g["extracted"]] for g in groups]
        credits = cons_credits(answers, correct.tolist(), cons_k, truncated.tolist())
        row["cons@k"] = float(credits.mean())
        row["cons_k"] = cons_k
        row["cons@k_lo"], row["cons@k_hi"] = bootstrap_interval(credits)
    row.update(format_rate=float(samples["format"].mean()), mean_length=float(samples["completion_tokens"].mean()),
               language_consistency=(float(samples["language"].mean()) if "language" in samples
                                     and samples["language"].notna().any() else None),
               truncated_rate=float(samples["truncated"].mean()),
               # a program the sandbox could not start scores 0 but says nothing of the model: count them
               sandbox_errors=(int(samples["reason"].astype(str).str.startswith("sandbox_error").sum())
                               if "reason" in samples else 0),
               reflections=(float(samples["completion"].map(reflections).mean()) if "completion" in samples
                            else None))
    return row
