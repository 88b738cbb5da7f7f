"""Math accuracy (section 2.2.2): extract the final answer, then decide equivalence with the gold answer.

Order of work, cheapest first:
1. extraction (string scanning only): the <answer> span after the reasoning, else the last \\boxed{};
2. exact and plain-number comparisons, which settle the common case without sympy;
3. Math-Verify (sympy underneath) in worker processes with a hard wall-clock limit per check
   (r1flow.rewards.workers), the gold parsed once per prompt.
"""

from __future__ import annotations

import re
from fractions import Fraction

from r1flow.rewards import Reward, register
from r1flow.rewards.workers import WorkerPool, cpu_workers

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Markers that end the reasoning: Table 1's </think>, and the readable pattern of section 2.3.1
# (|special_token|<reasoning_process>|special_token|<summary>), whose summary follows the last marker.
REASONING_END = ("</think>", "|special_token|")
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?", re.ASCII)
MAX_NUMBER_CHARS = 40  # plain numbers longer than this go to the verifier instead of Fraction()


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces balanced; None if unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        m = list(re.finditer(r"\\boxed (\S+)", text))  # \boxed 5, as some models write it
        return m[-1].group(1) if m else None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def answer_region(completion: str) -> str:
    """The text that may hold the final answer: what follows the reasoning.

    An answer written only inside the reasoning earns nothing, and an unclosed <think> means the
    reasoning never ended, so there is no answer region at all.
    """
    cut = max((completion.rfind(m) + len(m)) if m in completion else -1 for m in REASONING_END)
    if cut >= 0:
        return completion[cut:]
    if "<think>" in completion:
        return ""
    return completion


def extract_answer(completion: str, fallback: str = "none") -> str | None:
    """The final answer: the last <answer> span (its \\boxed{} if it has one), else the last \\boxed{}.

    fallback="last_number" takes the last number of the answer region when neither is present.
    """
    tail = answer_region(completion)
    spans = ANSWER_RE.findall(tail)
    if spans:
        inner = spans[-1]
        boxed = last_boxed(inner)
        return (boxed if boxed is not None else inner).strip()
    boxed = last_boxed(tail)
    if boxed is not None:
        return boxed.strip()
    if fallback == "last_number":
        nums = NUMBER_RE.findall(tail)
        return nums[-1] if nums else None
    if fallback != "none":
        raise ValueError(f"unknown answer fallback {fallback!r}; expected 'none' or 'last_number'")
    return None


def normalize(ans: str) -> str:
    """Surface normalisation for the cheap check and for grouping votes: never changes a value."""
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("{,}", "").replace("\\,", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # thousands separators
    s = re.sub(r"\\?%$", "", s)  # 12.5\% and 12.5 are the same answer to "what percent..."
    s = s.rstrip(".").strip()
    return s


def as_number(s: str) -> Fraction | None:
    """A plain number (integer, decimal, a/b or \\frac{a}{b}) as an exact fraction, else None."""
    s = s.replace(" ", "")
    if len(s) > MAX_NUMBER_CHARS:
        return None
    # ASCII digits only: Fraction() would also read look-alikes such as fullwidth digits.
    m = re.fullmatch(r"(-?)\\frac(?:\{(-?\d+)\}\{(-?\d+)\}|(\d)(\d))", s, re.ASCII)  # \frac{3}{4}, -\frac34
    try:
        if m:
            sign = -1 if m.group(1) else 1
            return sign * Fraction(int(m.group(2) or m.group(4)), int(m.group(3) or m.group(5)))
        if re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", s, re.ASCII):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def cheap_verdict(pred: str, gold: str) -> bool | None:
    """True/False when plain string or number comparison settles it, None when it needs the verifier.

    Only exact equality, two different integers, or two numbers further apart than Math-Verify's
    6-decimal rounding could bridge are settled: 0.333333 vs 1/3 is left to Math-Verify, which accepts it.
    """
    p, g = normalize(pred), normalize(gold)
    if p == g and p:
        return True
    pn, gn = as_number(p), as_number(g)
    if pn is None or gn is None:
        return None
    if pn == gn:
        return True
    if pn.denominator == 1 and gn.denominator == 1 and "." not in p + g:
        return False
    if abs(pn - gn) > Fraction(1, 10**4) * max(1, abs(pn), abs(gn)):
        return False
    return None


# -- Math-Verify in worker processes -----------------------------------------------------------------
def _wrap(s: str) -> str:
    # Boxed, so Math-Verify reads the whole string as one LaTeX answer instead of searching inside it.
    return "\\boxed{" + s + "}"


def mv_prepare(gold: str):
    from math_verify import parse

    return parse(_wrap(gold), parsing_timeout=None)  # the worker pool enforces the time limit


def mv_check(gold_parsed, pred: str) -> tuple:
    from math_verify import parse, verify

    if not gold_parsed:
        return None, "gold_unparsed"
    target = parse(_wrap(pred), parsing_timeout=None)
    if not target:
        return False, "unparsed"
    ok = verify(gold_parsed, target, timeout_seconds=None)
    return bool(ok), "correct" if ok else "wrong"


_POOLS: dict[tuple, WorkerPool] = {}


def verifier_pool(workers: int = 0, timeout_s: float = 5.0) -> WorkerPool:
    """One pool per (workers, timeout) per process, started lazily and reused across batches."""
    key = (workers or cpu_workers(), float(timeout_s))
    if key not in _POOLS:
        _POOLS[key] = WorkerPool(f"{__name__}:mv_prepare", f"{__name__}:mv_check", workers=key[0], timeout_s=key[1])
    return _POOLS[key]


def verify_pairs(preds: list[str], golds: list[str], *, verifier: str = "math_verify", workers: int = 0,
                 timeout_s: float = 5.0) -> list[tuple]:
    """(verdict, reason) for each (pred, gold): cheap checks first, the rest through Math-Verify.

    verifier="exact" stops after the cheap checks (anything they do not settle is wrong), for setups
    without sympy or for tiny synthetic tasks.
    """
    out: list = [None] * len(preds)
    jobs: dict[str, tuple[list, list]] = {}
    for i, (p, g) in enumerate(zip(preds, golds)):
        v = cheap_verdict(p, g)
        if v is not None:
            out[i] = (v, "correct" if v else "wrong")
        elif verifier == "exact":
            out[i] = (False, "wrong")
        elif verifier == "math_verify":
            items, idx = jobs.setdefault(g, ([], []))
            items.append(p)
            idx.append(i)
        else:
            raise ValueError(f"unknown verifier {verifier!r}; expected 'math_verify' or 'exact'")
    if jobs:
        pool = verifier_pool(workers, timeout_s)
        keys = list(jobs)
        res = pool.run([(g, jobs[g][0]) for g in keys])
        pos = 0
        for g in keys:
            for i in jobs[g][1]:
                out[i] = res[pos]
                pos += 1
    return out


@register("accuracy")
def accuracy(completions, golds, *, verifier: str = "math_verify", workers: int = 0, timeout_s: float = 5.0,
             max_answer_chars: int = 1000, fallback: str = "none") -> list[Reward]:
    """1 if the extracted final answer is equivalent to the gold answer, else 0 (section 2.2.2)."""
    rewards: list = [None] * len(completions)
    todo = []
    for i, c in enumerate(completions):
        pred = extract_answer(c, fallback)
        if pred is None or not pred.strip():
            rewards[i] = Reward(0.0, "no_answer", None)
        elif len(pred) > max_answer_chars:  # a megabyte "answer" is not worth parsing
            rewards[i] = Reward(0.0, "answer_too_long", pred[:100])
        else:
            todo.append((i, pred))
    verdicts = verify_pairs([p for _, p in todo], [str(golds[i]) for i, _ in todo], verifier=verifier,
                            workers=workers, timeout_s=timeout_s)
    for (i, pred), (ok, reason) in zip(todo, verdicts):
        rewards[i] = Reward(1.0 if ok else 0.0, reason, pred)
    return rewards
