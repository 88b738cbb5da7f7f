"""Format rewards.

- `format` (section 2.2.2, Table 1): <think> reasoning </think> <answer> answer </answer>, nothing else.
- `format_think`: R1's <think> ... </think> answer, for evaluating R1-style models.
- `format_readable` (section 2.3.1): the pattern |special_token|<reasoning_process>|special_token|<summary>
  used from the cold start on; the marker is configurable (it is a placeholder in the paper).

In both, each tag appears exactly once and in order, so a tag inside the answer, or nested tags,
do not earn the reward.
"""

from __future__ import annotations

import re

from r1flow.data.formats import READABLE_MARKER, split_readable
from r1flow.rewards import Reward, per_sample, register

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
FORMAT_RE = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)


@register("format")
@per_sample
def format_reward(completion: str, gold: str = "") -> Reward:
    if any(completion.count(t) != 1 for t in TAGS):
        return Reward(0.0, "tags_missing_or_repeated")
    if FORMAT_RE.match(completion) is None:
        return Reward(0.0, "tags_out_of_order")
    return Reward(1.0, "ok")


@register("format_think")
@per_sample
def format_think(completion: str, gold: str = "") -> Reward:
    """R1's output in evaluation: one <think> ... </think> block, then a non-empty answer."""
    if completion.count("<think>") != 1 or completion.count("</think>") != 1:
        return Reward(0.0, "think_tags_missing_or_repeated")
    m = re.match(r"^\s*<think>(.*?)</think>(.*)$", completion, re.DOTALL)
    if m is None:
        return Reward(0.0, "text_before_think")
    if not m.group(2).strip():
        return Reward(0.0, "no_answer_after_think")
    return Reward(1.0, "ok")


@register("format_readable")
@per_sample
def format_readable(completion: str, gold: str = "", marker: str = READABLE_MARKER) -> Reward:
    n = completion.count(marker)
    if n != 2:
        return Reward(0.0, "markers_missing_or_repeated")
    parts = split_readable(completion, marker)
    if parts is None:
        return Reward(0.0, "text_before_reasoning")
    reasoning, summary = parts
    if not reasoning.strip():
        return Reward(0.0, "empty_reasoning")
    if not summary.strip():
        return Reward(0.0, "no_summary")
    if any(t in completion for t in TAGS):  # mixing the two patterns is not readable either
        return Reward(0.0, "mixed_patterns")
    return Reward(1.0, "ok")
