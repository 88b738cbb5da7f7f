"""Evaluation as in section 3: k samples per prompt at temperature 0.6 and top-p 0.95, reported as
pass@1 (mean correctness over the k samples, averaged over prompts) and cons@k (majority vote)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from r1flow import rewards as R
from r1flow.data.prompts import render
from r1flow.generation import Generator, SamplingParams
from r1flow.rewards.math_answer import normalize


def pass_at_1(correct: np.ndarray) -> float:
    """correct: (prompts, k) of 0/1. pass@1 = 1/k sum_i p_i, averaged over prompts."""
    return float(np.asarray(correct, dtype=float).mean(axis=1).mean())


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent normalised answer among those extracted; ties go to the first seen."""
    votes = Counter(normalize(a) for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    for a in answers:
        if a is not None and votes[normalize(a)] == best:
            return normalize(a)
    return None  # unreachable


def cons_at_k(answers: list[list[str | None]], correct: list[list[float]]) -> float:
    """cons@k: a prompt counts as solved when its majority answer is one graded correct."""
    solved = []
    for ans, ok in zip(answers, correct):
        winner = majority_vote(ans)
        solved.append(any(o > 0 and a is not None and normalize(a) == winner for a, o in zip(ans, ok)))
    return float(np.mean(solved)) if solved else 0.0


def sample_and_score(generator: Generator, tasks: pd.DataFrame, params: SamplingParams, template: str,
                     reward_options: dict | None = None) -> pd.DataFrame:
    """k = params.n completions per prompt, each graded by the accuracy and format rewards."""
    prompts = [render(q, template) for q in tasks["question"]]
    out = generator.generate(prompts, params)
    golds = [a for a in tasks["answer"] for _ in range(params.n)]
    _, per = R.score_batch(out.texts, golds, {"accuracy": 1.0, "format": 1.0}, reward_options)
    acc, fmt = per["accuracy"], per["format"]
    return pd.DataFrame({
        "prompt_id": [p for p in tasks["prompt_id"] for _ in range(params.n)],
        "sample": [j for _ in range(len(tasks)) for j in range(params.n)],
        "completion": out.texts,
        "extracted": [a.extracted for a in acc],
        "accuracy": [a.score for a in acc],
        "format": [f.score for f in fmt],
        "reason": [a.reason for a in acc],
        "num_tokens": out.lengths.tolist(),
        "truncated": out.truncated.tolist(),
    })


def summarize(samples: pd.DataFrame, k: int) -> dict:
    groups = samples.groupby("prompt_id", sort=False)
    correct = np.stack([g["accuracy"].to_numpy() for _, g in groups])
    answers = [[None if pd.isna(a) else a for a in g["extracted"]] for _, g in groups]
    return {
        "k": k,
        "num_prompts": len(correct),
        "pass@1": pass_at_1(correct),
        "cons@k": cons_at_k(answers, correct.tolist()),
        "format_rate": float(samples["format"].mean()),
        "mean_length": float(samples["num_tokens"].mean()),
    }
