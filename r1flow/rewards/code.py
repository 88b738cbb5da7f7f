"""Code accuracy (section 2.2.2): run the model's program against the prompt's test cases in the sandbox.

The gold answer of a code prompt is JSON: {"language": "python", "tests": [{"input": ..., "output": ...}]}
(a bare list of tests means Python). A stdin test passes when the program exits 0 and its stdout equals
the expected output up to trailing whitespace on each line. A functional test (LeetCode style, as in
LiveCodeBench: {"testtype": "functional"}, with the method's name in the gold's "fn_name") calls that
method of the answer's `Solution()` with the input's lines parsed as JSON, one argument per line, and
passes when the returned value equals the JSON output (tuples equal lists). score="all" gives 1 only
when every test passes (stopping at the first failure); score="fraction" gives the share passed.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

from r1flow.rewards import Reward, register
from r1flow.rewards.math_answer import answer_region
from r1flow.rewards.sandbox import Limits, namespaces_available, run_program, sandbox_preflight
from r1flow.rewards.workers import cpu_workers

log = logging.getLogger(__name__)

FENCE_RE = re.compile(r"```([A-Za-z0-9_+#-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str, language: str = "python") -> str | None:
    """The last fenced block of the answer region, preferring one labelled with the language."""
    blocks = FENCE_RE.findall(answer_region(completion))
    if not blocks:
        return None
    labelled = [b for lang, b in blocks if lang.lower() in (language, "py" if language == "python" else language)]
    return (labelled or [b for _, b in blocks])[-1]


def functional_args(text: str) -> list:
    """A functional test's input: one JSON value per line, the method's arguments in order."""
    return [json.loads(line) for line in str(text).split("\n") if line.strip()]


def parse_tests(gold: str) -> tuple[str, list[dict]]:
    """The language and the tests. A functional test gets the gold's fn_name and its arguments and
    expected value parsed here, so a malformed one is a bad gold, not a failure charged to the answer."""
    spec = json.loads(gold)
    if isinstance(spec, list):
        spec = {"tests": spec}
    tests = [t if t.get("testtype") != "functional" else
             {**t, "fn_name": spec["fn_name"], "args": functional_args(t["input"]), "expected": json.loads(t["output"])}
             for t in spec["tests"]]
    return spec.get("language", "python"), tests


def same_output(got: str, expected: str) -> bool:
    a = [line.rstrip() for line in got.strip().splitlines()]
    b = [line.rstrip() for line in str(expected).strip().splitlines()]
    return a == b


# LeetCode runs answers with these already imported (starter code annotates with List, Optional, ...
# without importing them), and LiveCodeBench's grader does the same.
PRELUDE = ("from typing import *\nfrom collections import *\nfrom functools import *\nfrom itertools import *\n"
           "from heapq import *\nfrom bisect import *\nfrom math import *\n"
           "import bisect, collections, functools, heapq, itertools, math, re, string, sys\n")

# Runs one functional test. The answer is compiled from a string in its own namespace, with
# __name__ != "__main__" so its example-usage block stays off; it reads stdin only after the arguments
# were taken, and its prints go to a buffer, so the last stdout line is the harness's verdict. The
# expected value never enters the sandbox: the grader compares. An exception in the answer is left
# uncaught, so the sandbox classifies it (runtime_error, memory) as for a stdin program.
HARNESS = r'''
import io, json, sys
sys.setrecursionlimit(1 << 16)  # recursive LeetCode solutions go deeper than the default 1000
args = json.loads(sys.stdin.read())
sys.stdin = io.StringIO("")
verdict_out, sys.stdout = sys.stdout, io.StringIO()


def verdict(**v):
    verdict_out.write("\n" + json.dumps(v) + "\n")
    verdict_out.flush()


namespace = {"__name__": "solution"}
exec(PRELUDE, namespace)
exec(compile(CODE, "solution.py", "exec"), namespace)
cls = namespace.get("Solution")
if not isinstance(cls, type):
    verdict(missing="class")
else:
    method = getattr(cls(), FN_NAME, None)
    if not callable(method):
        verdict(missing="method")
    else:
        result = method(*args)
        try:
            verdict(result=result)  # json turns tuples into lists, which LiveCodeBench also accepts
        except (TypeError, ValueError):
            verdict(unserializable=type(result).__name__)
'''


def harness_source(code: str, fn_name: str) -> str:
    return f"CODE = {code!r}\nFN_NAME = {fn_name!r}\nPRELUDE = {PRELUDE!r}\n{HARNESS}"


def _failure(r) -> str:
    """A failed run's reason; a sandbox error keeps the sandbox's own message (what could not be done), so
    a host that cannot run programs is told apart from programs that fail."""
    if r.status == "sandbox_error":
        return "sandbox_error:" + (r.stderr.strip().splitlines() or [""])[0][:200]
    return r.status


def _run_stdin(code: str, t: dict, language: str, limits: Limits, isolate: bool = True) -> str | None:
    """None when the test passes, else the reason it failed."""
    r = run_program(code, str(t.get("input", "")), language, limits, isolate)
    if r.status != "ok":
        return _failure(r)
    return None if same_output(r.stdout, t["output"]) else "wrong_output"


def _run_functional(code: str, t: dict, limits: Limits, isolate: bool = True) -> str | None:
    """None when the test passes, else the reason it failed; the arguments travel on stdin."""
    r = run_program(harness_source(code, t["fn_name"]), json.dumps(t["args"]), "python", limits, isolate)
    if r.status != "ok":
        return _failure(r)
    lines = r.stdout.strip().splitlines()
    try:
        v = json.loads(lines[-1])
    except (IndexError, ValueError):
        v = None
    if not isinstance(v, dict):  # it ended without a verdict, e.g. exit() inside the method
        return "no_verdict"
    if v.get("missing") == "class":
        return "missing_class:Solution"
    if v.get("missing") == "method":
        return f"missing_method:{t['fn_name']}"
    if "result" not in v:
        return "wrong_output"  # a value JSON cannot hold cannot equal a JSON output
    return None if v["result"] == t["expected"] else "wrong_output"


def run_tests(code: str, gold: str, limits: Limits, score: str, isolate: bool = True) -> Reward:
    try:
        language, tests = parse_tests(gold)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return Reward(0.0, f"bad_tests:{type(e).__name__}")
    if not tests:
        return Reward(0.0, "no_tests")
    functional = any(t.get("testtype") == "functional" for t in tests)
    if functional and language != "python":
        return Reward(0.0, "bad_tests:functional_needs_python")
    passed, reason = 0, "passed"
    for t in tests:
        failed = (_run_functional(code, t, limits, isolate) if t.get("testtype") == "functional"
                  else _run_stdin(code, t, language, limits, isolate))
        if failed is None:
            passed += 1
            continue
        reason = failed
        if score == "all":
            break
    value = passed / len(tests) if score == "fraction" else float(passed == len(tests))
    return Reward(value, reason if passed < len(tests) else "passed", f"{passed}/{len(tests)}")


@register("code_accuracy")
def code_accuracy(completions, golds, *, score: str = "all", workers: int = 0, wall_s: float = 10.0, cpu_s: int = 5,
                  memory_mb: int = 512, max_output_bytes: int = 1 << 20, max_processes: int = 16,
                  language: str = "python", allow_unisolated: bool = False) -> list[Reward]:
    if score not in ("all", "fraction"):
        raise ValueError(f"code_accuracy score must be 'all' or 'fraction', not {score!r}")
    limits = Limits(wall_s, cpu_s, memory_mb, max_output_bytes, max_processes)
    # unisolated only when asked for and the host cannot isolate (the job's preflight said so in its log)
    isolate = not (allow_unisolated and not _isolation_available())

    def one(pair):
        completion, gold = pair
        code = extract_code(completion, language)
        if code is None:
            return Reward(0.0, "no_code")
        return run_tests(code, gold, limits, score, isolate)

    # Threads are enough: each run is a child process; the threads only wait for them.
    with ThreadPoolExecutor(max_workers=workers or cpu_workers()) as ex:
        return list(ex.map(one, zip(completions, golds)))


@functools.lru_cache(maxsize=1)
def _isolation_available() -> bool:
    return namespaces_available()


def _reward_names(weights: dict) -> set[str]:
    """The reward names of a stage's weights, flat ({name: w}) or by prompt kind ({kind: {name: w}})."""
    out = set()
    for k, v in (weights or {}).items():
        out |= _reward_names(v) if isinstance(v, dict) else {k}
    return out


def code_preflight(weights: dict, options: dict | None = None) -> str | None:
    """Before a job that scores code: the sandbox's preflight with the configured limits (see
    r1flow.rewards.sandbox.sandbox_preflight), logged; None when the job uses no code reward."""
    if "code_accuracy" not in _reward_names(weights):
        return None
    o = (options or {}).get("code_accuracy", {})
    limits = Limits(*(o.get(k, d) for k, d in (("wall_s", 10.0), ("cpu_s", 5), ("memory_mb", 512),
                                                ("max_output_bytes", 1 << 20), ("max_processes", 16))))
    t0 = time.perf_counter()
    mode = sandbox_preflight(limits, o.get("allow_unisolated", False))
    msg = f"code sandbox preflight: {mode} ({time.perf_counter() - t0:.2f} s)"
    if mode == "unisolated":
        log.warning(msg + ": rewards.code_accuracy.allow_unisolated is set and this host cannot isolate programs; "
                          "the model's programs share this job's network, processes and files")
    else:
        log.info(msg)
    return mode
