"""Code accuracy (section 2.2.2): run the model's program against the prompt's test cases in the sandbox.

The gold answer of a code prompt is JSON: {"language": "python", "tests": [{"input": ..., "output": ...}]}
(a bare list of tests means Python). A test passes when the program exits 0 and its stdout equals the
expected output up to trailing whitespace on each line. score="all" gives 1 only when every test
passes (stopping at the first failure); score="fraction" gives the share of tests passed.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

from r1flow.rewards import Reward, register
from r1flow.rewards.math_answer import answer_region
from r1flow.rewards.sandbox import Limits, run_program
from r1flow.rewards.workers import cpu_workers

FENCE_RE = re.compile(r"```([A-Za-z0-9_+#-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str, language: str = "python") -> str | None:
    """The last fenced block of the answer region, preferring one labelled with the language."""
    blocks = FENCE_RE.findall(answer_region(completion))
    if not blocks:
        return None
    labelled = [b for lang, b in blocks if lang.lower() in (language, "py" if language == "python" else language)]
    return (labelled or [b for _, b in blocks])[-1]


def parse_tests(gold: str) -> tuple[str, list[dict]]:
    spec = json.loads(gold)
    if isinstance(spec, list):
        return "python", spec
    return spec.get("language", "python"), spec["tests"]


def same_output(got: str, expected: str) -> bool:
    a = [line.rstrip() for line in got.strip().splitlines()]
    b = [line.rstrip() for line in str(expected).strip().splitlines()]
    return a == b


def run_tests(code: str, gold: str, limits: Limits, score: str) -> Reward:
    try:
        language, tests = parse_tests(gold)
    except (ValueError, KeyError, TypeError) as e:
        return Reward(0.0, f"bad_tests:{type(e).__name__}")
    if not tests:
        return Reward(0.0, "no_tests")
    passed, reason = 0, "passed"
    for t in tests:
        r = run_program(code, str(t.get("input", "")), language, limits)
        if r.status == "ok" and same_output(r.stdout, t["output"]):
            passed += 1
            continue
        reason = r.status if r.status != "ok" else "wrong_output"
        if score == "all":
            break
    value = passed / len(tests) if score == "fraction" else float(passed == len(tests))
    return Reward(value, reason if passed < len(tests) else "passed", f"{passed}/{len(tests)}")


@register("code_accuracy")
def code_accuracy(completions, golds, *, score: str = "all", workers: int = 0, wall_s: float = 10.0, cpu_s: int = 5,
                  memory_mb: int = 512, max_output_bytes: int = 1 << 20, max_processes: int = 16,
                  language: str = "python") -> list[Reward]:
    if score not in ("all", "fraction"):
        raise ValueError(f"code_accuracy score must be 'all' or 'fraction', not {score!r}")
    limits = Limits(wall_s, cpu_s, memory_mb, max_output_bytes, max_processes)

    def one(pair):
        completion, gold = pair
        code = extract_code(completion, language)
        if code is None:
            return Reward(0.0, "no_code")
        return run_tests(code, gold, limits, score)

    # Threads are enough: each run is a child process; the threads only wait for them.
    with ThreadPoolExecutor(max_workers=workers or cpu_workers()) as ex:
        return list(ex.map(one, zip(completions, golds)))
