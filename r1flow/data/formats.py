"""The readable pattern of section 2.3.1, |special_token|<reasoning_process>|special_token|<summary>,
used from the cold start on: the data stages write it, the rewards and reward models read it."""

from __future__ import annotations

READABLE_MARKER = "|special_token|"


def split_readable(completion: str, marker: str = READABLE_MARKER) -> tuple[str, str] | None:
    """(reasoning_process, summary) of a readable completion, or None when the pattern does not hold."""
    parts = completion.split(marker)
    if len(parts) != 3 or parts[0].strip():
        return None
    return parts[1], parts[2]
