"""DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, section 3.4, eq. 13).

A completion cut off at the length limit is scored as a failure whatever its reasoning, which is noise
in the reward; DAPO instead penalises length smoothly over the last `buffer_length` tokens of the budget:

    R_length(y) = 0                                   if |y| <= L_max - L_cache
                  ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                  -1                                   if |y| > L_max

with L_max = `max_length` (GRPO's max_completion_length) and L_cache = `buffer_length`. It is added to the
task reward as a term of its own; its weight (GRPO's overlong_penalty_factor) is verl's
`overlong_buffer.penalty_factor`. |y| counts completion tokens, the stop token included.
"""

from __future__ import annotations

from r1flow.rewards import Reward, register


def overlong_penalty(length: int, max_length: int, buffer_length: int) -> float:
    """R_length of eq. 13 for one completion of `length` tokens."""
    if buffer_length <= 0:
        return 0.0
    start = max_length - buffer_length
    if length <= start:
        return 0.0
    if length > max_length:
        return -1.0
    return (start - length) / buffer_length


@register("overlong")
def overlong(completions, golds, *, lengths, max_length: int | None = None, buffer_length: int | None = None):
    if max_length is None or buffer_length is None:
        raise ValueError("the overlong reward needs max_length and buffer_length: set overlong_buffer_length "
                         "in the GRPO section")
    return [Reward(overlong_penalty(n, max_length, buffer_length), "overlong" if n > max_length - buffer_length
                   else "within_budget") for n in lengths]


overlong.needs_lengths = True
