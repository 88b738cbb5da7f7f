"""The readable pattern of section 2.3.1, |special_token|<reasoning_process>|special_token|<summary>,
used from the cold start on: the data stages write it, the rewards and reward models read it."""

from __future__ import annotations

import re

READABLE_MARKER = "|special_token|"


def split_readable(completion: str, marker: str = READABLE_MARKER) -> tuple[str, str] | None:
    """(reasoning_process, summary) of a readable completion, or None when the pattern does not hold."""
    parts = completion.split(marker)
    if len(parts) != 3 or parts[0].strip():
        return None
    return parts[1], parts[2]


# A reflective step: the model stops and redoes a step ("wait 7+5=12"), the "aha moment" of section 2.2.4
REFLECTION = re.compile(r"\bwait\b", re.IGNORECASE)


def reflections(completion: str) -> int:
    """How many times a completion stops to re-check a step."""
    return len(REFLECTION.findall(completion))
