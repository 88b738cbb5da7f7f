"""Multiple-choice accuracy (GPQA Diamond): the chosen letter against the gold letter.

The letter is read from the final answer (<answer> span or last \\boxed{}, after the reasoning), with
"(C)", "C)", "\\text{C}" accepted; without one, from a closing "the answer is C" phrase.
"""

from __future__ import annotations

import re

from r1flow.rewards import Reward, per_sample, register
from r1flow.rewards.math_answer import answer_region, extract_answer

LETTER_RE = re.compile(r"^\(?\s*(?:\\text\{)?\s*\(?([A-J])\)?\s*\}?\s*\)?\s*[.:]?$")
PHRASE_RE = re.compile(r"answer\s+is\s*:?\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE)


def extract_choice(completion: str) -> str | None:
    ans = extract_answer(completion)
    if ans is not None:
        m = LETTER_RE.match(ans.strip())
        return m.group(1) if m else None
    found = PHRASE_RE.findall(answer_region(completion))
    return found[-1].upper() if found else None


@register("choice_accuracy")
@per_sample
def choice_accuracy(completion: str, gold: str) -> Reward:
    letter = extract_choice(completion)
    if letter is None:
        return Reward(0.0, "no_answer")
    ok = letter == gold.strip().upper()
    return Reward(1.0 if ok else 0.0, "correct" if ok else "wrong", letter)
