"""Rule-based rewards of R1-Zero (section 2.2.2): accuracy and format.

First version: answers are compared exactly, then as numbers. Symbolic equivalence (Math-Verify),
sandboxed code execution and language consistency come with the rewards issue.
"""

from __future__ import annotations

import re
from fractions import Fraction

from r1flow.rewards import Reward, register

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# Table 1: "<think> reasoning process here </think> <answer> answer here </answer>", nothing around it.
FORMAT_RE = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
MAX_ANSWER_CHARS = 1000


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer: the <answer> span after the reasoning, else the last \\boxed{}.

    Only text after </think> counts, so an answer written inside the reasoning earns nothing.
    """
    tail = completion.rsplit("</think>", 1)[1] if "</think>" in completion else completion
    spans = ANSWER_RE.findall(tail)
    if spans:
        inner = spans[-1]
        boxed = last_boxed(inner)
        return (boxed if boxed is not None else inner).strip()
    return last_boxed(tail)


def normalize(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = s.replace("\\!", "").replace("{,}", "").replace("\\,", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # thousands separators
    s = s.rstrip(".").strip()
    return s


def as_number(s: str) -> Fraction | None:
    s = s.replace(" ", "")
    m = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    try:
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
        if re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", s) and len(s) < 100:
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def equivalent(pred: str, gold: str) -> bool:
    p, g = normalize(pred), normalize(gold)
    if p == g:
        return True
    pn, gn = as_number(p), as_number(g)
    return pn is not None and gn is not None and pn == gn


@register("accuracy")
def accuracy(completion: str, gold: str) -> Reward:
    pred = extract_answer(completion)
    if pred is None:
        return Reward(0.0, "no_answer", None)
    if len(pred) > MAX_ANSWER_CHARS:
        return Reward(0.0, "answer_too_long", pred[:MAX_ANSWER_CHARS])
    ok = equivalent(pred, gold)
    return Reward(1.0 if ok else 0.0, "correct" if ok else "wrong", pred)


@register("format")
def format_reward(completion: str, gold: str) -> Reward:
    # Each tag exactly once and in the template's order; anything before or after breaks the format.
    if any(completion.count(t) != 1 for t in TAGS):
        return Reward(0.0, "tags_missing_or_repeated")
    if FORMAT_RE.match(completion) is None:
        return Reward(0.0, "tags_out_of_order")
    return Reward(1.0, "ok")
