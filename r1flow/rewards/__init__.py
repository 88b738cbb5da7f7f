"""The reward registry: every reward is a function (completion, gold answer) -> Reward, chosen by name
and weighted in the config (section 2.2.2: rule-based accuracy and format rewards)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class Reward:
    score: float
    reason: str  # short, lands in the per-sample records
    extracted: str | None = None


RewardFn = Callable[[str, str], Reward]
REGISTRY: dict[str, RewardFn] = {}


def register(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        if name in REGISTRY:
            raise ValueError(f"reward '{name}' registered twice")
        REGISTRY[name] = fn
        return fn

    return deco


def get(name: str) -> RewardFn:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward '{name}'; registered: {sorted(REGISTRY)}") from None


def score_batch(completions: Iterable[str], answers: Iterable[str], weights: dict[str, float]):
    """Score each completion with every named reward.

    Returns (total, per_reward) where total[i] = sum_name weight * score and per_reward[name] is the
    list of Reward objects, so metrics can report each function separately.
    """
    completions, answers = list(completions), list(answers)
    fns = {name: get(name) for name in weights}
    per = {name: [fn(c, a) for c, a in zip(completions, answers)] for name, fn in fns.items()}
    total = [sum(weights[n] * per[n][i].score for n in weights) for i in range(len(completions))]
    return total, per


from r1flow.rewards import rule_based  # noqa: E402,F401  (registers accuracy and format)
