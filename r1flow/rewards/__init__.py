"""The reward registry (section 2.2.2: rule-based rewards only; section 2.3.2: language consistency).

Every reward is a batch function (completions, golds, **options) -> [Reward], registered by name.
A reward that judges a completion against its request (the reward models of section 2.3.4) sets the
attribute `needs_prompts = True` and also receives `prompts=`, one user request per completion; one that
judges its length in tokens (DAPO's overlong punishment) sets `needs_lengths = True` and receives
`lengths=`, one token count per completion.
A stage's config names the rewards it sums and their weights; the `rewards` config section holds each
reward's options (time limits, workers, target language). Batch functions let a reward share one
worker pool or sandbox pool across a whole GRPO step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Reward:
    score: float
    reason: str  # short, lands in the per-sample records
    extracted: str | None = None


RewardFn = Callable[..., list]
REGISTRY: dict[str, RewardFn] = {}


def register(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        if name in REGISTRY:
            raise ValueError(f"reward '{name}' registered twice")
        REGISTRY[name] = fn
        return fn

    return deco


def per_sample(fn: Callable[..., Reward]) -> RewardFn:
    """Lift a (completion, gold, **options) -> Reward function to a batch reward."""

    def batch(completions, golds, **options):
        return [fn(c, g, **options) for c, g in zip(completions, golds)]

    batch.__doc__, batch.__name__ = fn.__doc__, fn.__name__
    return batch


def get(name: str) -> RewardFn:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward '{name}'; registered: {sorted(REGISTRY)}") from None


def needs_prompts(fn: RewardFn) -> bool:
    return bool(getattr(fn, "needs_prompts", False))


def needs_lengths(fn: RewardFn) -> bool:
    return bool(getattr(fn, "needs_lengths", False))


def score_batch(completions: Iterable[str], answers: Iterable[str], weights: dict[str, float],
                options: dict[str, dict] | None = None, prompts: Iterable | None = None,
                lengths: Iterable[int] | None = None):
    """Score each completion with every named reward.

    prompts: the user request of each completion (a string or a message list; the question itself, not
    the rendered template), aligned with `completions`. Only rewards with `needs_prompts` receive it, so
    rule-based rewards keep their (completions, golds, **options) signature; naming such a reward
    without passing prompts is an error. lengths: each completion's length in tokens, passed the same
    way to rewards with `needs_lengths` only.

    Returns (total, per_reward) where total[i] = sum_name weight * score and per_reward[name] is the
    list of Reward objects, so metrics can report each function separately.
    """
    completions, answers = list(completions), list(answers)
    prompts = None if prompts is None else list(prompts)
    if prompts is not None and len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    lengths = None if lengths is None else [int(n) for n in lengths]
    if lengths is not None and len(lengths) != len(completions):
        raise ValueError(f"{len(lengths)} lengths for {len(completions)} completions")
    options = options or {}
    per = {}
    for name in weights:
        fn = get(name)
        kw = dict(options.get(name, {}))
        if needs_prompts(fn):
            if prompts is None:
                raise ValueError(f"reward '{name}' judges completions against their prompts: "
                                 "pass prompts= to score_batch")
            kw["prompts"] = prompts
        if needs_lengths(fn):
            if lengths is None:
                raise ValueError(f"reward '{name}' judges completions by their length in tokens: "
                                 "pass lengths= to score_batch")
            kw["lengths"] = lengths
        per[name] = fn(completions, answers, **kw)
        if len(per[name]) != len(completions):
            raise RuntimeError(f"reward '{name}' returned {len(per[name])} scores for {len(completions)} completions")
    total = [sum(weights[n] * per[n][i].score for n in weights) for i in range(len(completions))]
    return total, per


from r1flow.rewards import choice, code, formats, language, math_answer, model_based, overlong  # noqa: F401  (register)
