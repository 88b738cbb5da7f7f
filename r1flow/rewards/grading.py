"""Grading n sampled completions per problem, and the metrics of section 3 over them. Evaluation
(r1flow.evaluation.runner) and GRPO's validation curve both use these.

- pass@1 = 1/k sum_i p_i, the mean correctness over the samples of a problem, averaged over problems;
- pass@k, the unbiased estimator of Chen et al. (2021) from n >= k samples;
- cons@k, majority vote over the first k samples, answers grouped by mathematical equivalence
  (so 1/2 and 0.5 vote together).
A truncated sample (no end of sequence within max_new_tokens) counts as wrong, whatever it contains.
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
    `same(preds, golds)` (default: the math verifier) between the groups' first members."""
    reps: list[str] = []
    group_of_norm: dict[str, int] = {}
    ids: list[int | None] = []
    for a in answers:
        if a is None:
            ids.append(None)
            continue
        key = normalize(a)
        if key not in group_of_norm:
            group_of_norm[key] = len(reps)
            reps.append(a)
        ids.append(group_of_norm[key])
    if len(reps) > 1:  # merge groups whose representatives are equivalent (union-find)
        parent = list(range(len(reps)))

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
                parent[root(j)] = root(i)
        ids = [None if g is None else root(g) for g in ids]
    return ids


def majority_vote(answers: list[str | None], same=None) -> int | None:
    """Index of a sample of the winning group (the largest; ties go to the group seen first)."""
    ids = equivalence_groups(answers, same)
    counts: dict[int, int] = {}
    for g in ids:
        if g is not None:
            counts[g] = counts.get(g, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, g in enumerate(ids) if g is not None and counts[g] == best)


def cons_at_k(answers: list[list[str | None]], correct: list[list[float]], k: int, same=None) -> float:
    """cons@k: a problem is solved when the majority answer of its first k samples is graded correct."""
    solved = []
    for ans, ok in zip(answers, correct):
        if k > len(ans):
            raise ValueError(f"cons@{k} needs {k} samples per problem, got {len(ans)}")
        winner = majority_vote(ans[:k], same)
        solved.append(winner is not None and ok[winner] > 0)
    return float(np.mean(solved)) if solved else 0.0


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
    """pass@1, pass@k for each k, cons@k, format rate, mean length and truncation rate of a samples table."""
    groups = [g for _, g in samples.groupby("problem_id", sort=False)]
    n = min(len(g) for g in groups)
    if max(len(g) for g in groups) != n:
        raise ValueError("every problem must have the same number of samples")
    correct = np.stack([g["correct"].to_numpy()[:n] for g in groups])
    row = {"num_problems": len(groups), "n": n, "pass@1": pass_at_1(correct)}
    for k in pass_ks:
        if k != 1:
            row[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c.sum()), k) for c in correct]))
    row["cons@k"] = row["cons_k"] = None  # no vote asked (or none possible, as for programs)
    if cons_k is not None and vote:
        answers = [[None if pd.isna(a) else a for a in g["extracted"]] for g in groups]
        row["cons@k"] = cons_at_k(answers, correct.tolist(), cons_k)
        row["cons_k"] = cons_k
    row.update(format_rate=float(samples["format"].mean()), mean_length=float(samples["completion_tokens"].mean()),
               language_consistency=(float(samples["language"].mean()) if "language" in samples
                                     and samples["language"].notna().any() else None),
               truncated_rate=float(samples["truncated"].mean()),
               reflections=(float(samples["completion"].map(reflections).mean()) if "completion" in samples
                            else None))
    return row
