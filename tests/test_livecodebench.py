"""LiveCodeBench as published (livecodebench/code_generation_lite): records in that exact layout are
built here, loaded through the benchmark loader, and graded by the code reward, stdin and functional
(LeetCode-style `Solution().method`) problems both."""

import base64
import json
import pickle
import zlib

import pytest

from r1flow import rewards as R
from r1flow.data.prompts import render
from r1flow.evaluation.benchmarks import (
    STDIN_INSTRUCTION,
    TEMPLATES,
    BenchmarkSpec,
    build_prompt,
    decode_lcb_tests,
    load_benchmark,
)
from r1flow.rewards.sandbox import namespaces_available

needs_sandbox = pytest.mark.skipif(not namespaces_available(),
                                   reason="no root and no unprivileged user namespaces: the sandbox refuses to run")

TWO_SUM_STARTER = "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:"
LIMITS = {"wall_s": 5.0, "cpu_s": 3, "memory_mb": 256}


def private(tests: list) -> str:
    """code_generation_lite's private tests: base64 of zlib of a pickled JSON string."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def record(qid, *, date="2024-08-03T00:00:00", public=(), hidden=(), starter="", func_name=None,
           content=None, platform="atcoder"):
    return {
        "question_title": f"title {qid}",
        "question_content": content or f"Problem {qid}: read n and print n squared.",
        "platform": platform,
        "question_id": qid,
        "contest_id": "abc000",
        "contest_date": date,
        "starter_code": starter,
        "difficulty": "easy",
        "public_test_cases": json.dumps(list(public)),
        "private_test_cases": private(list(hidden)),
        "metadata": json.dumps({"func_name": func_name} if func_name else {}),
    }


def stdin_test(i, o):
    return {"input": i, "output": o, "testtype": "stdin"}


def fn_test(i, o):
    return {"input": i, "output": o, "testtype": "functional"}


SQUARE = record("sq1", public=[stdin_test("3\n", "9\n")], hidden=[stdin_test("12\n", "144\n"), stdin_test("0\n", "0\n")])
TWO_SUM = record("1", platform="leetcode", starter=TWO_SUM_STARTER, func_name="twoSum",
                 content="Given nums and target, return the indices of the two numbers adding up to target.",
                 public=[fn_test("[2, 7, 11, 15]\n9", "[0, 1]")],
                 hidden=[fn_test("[3, 2, 4]\n6", "[1, 2]"), fn_test("[3, 3]\n6", "[0, 1]")])


def write(tmp_path, records, name="lcb.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def load(path, name="lcb", **kw):
    return load_benchmark(BenchmarkSpec.from_config(name, {"loader": "livecodebench", "path": str(path),
                                                           "answer_type": "code", "template": "code", **kw}))


def answer(code: str) -> str:
    return f"<think> x </think><answer>\n```python\n{code}\n```\n</answer>"


def grade(code: str, gold: str):
    return R.get("code_accuracy")([answer(code)], [gold], workers=1, **LIMITS)[0]


# -- loading ----------------------------------------------------------------------------------------
def test_public_and_private_tests_decoded_into_the_gold(tmp_path):
    df = load(write(tmp_path, [SQUARE, TWO_SUM]))
    assert list(df["problem_id"]) == ["sq1", "1"]
    stdin_gold = json.loads(df["answer"].iloc[0])
    assert stdin_gold == {"language": "python", "tests": [{"input": "3\n", "output": "9\n"},
                                                          {"input": "12\n", "output": "144\n"},
                                                          {"input": "0\n", "output": "0\n"}]}
    fn_gold = json.loads(df["answer"].iloc[1])
    assert fn_gold["fn_name"] == "twoSum" and fn_gold["language"] == "python"
    assert fn_gold["tests"] == [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"},
                                {"input": "[3, 2, 4]\n6", "output": "[1, 2]", "testtype": "functional"},
                                {"input": "[3, 3]\n6", "output": "[0, 1]", "testtype": "functional"}]


def test_decode_lcb_tests_both_encodings():
    tests = [stdin_test("1\n", "1\n")]
    assert decode_lcb_tests(json.dumps(tests)) == tests
    assert decode_lcb_tests(private(tests)) == tests
    assert decode_lcb_tests("") == [] and decode_lcb_tests(None) == []


def test_date_window_inclusive(tmp_path):
    recs = [record("before", date="2024-07-31T00:00:00"), record("first", date="2024-08-01T00:00:00"),
            record("inside", date="2024-10-15T00:00:00"), record("last", date="2025-01-31T00:00:00"),
            record("after", date="2025-02-01T00:00:00")]
    for r in recs:
        r["public_test_cases"] = json.dumps([stdin_test("1\n", "1\n")])
    p = write(tmp_path, recs)
    df = load(p, date_from="2024-08-01", date_to="2025-01-31")
    assert list(df["problem_id"]) == ["first", "inside", "last"]
    assert list(load(p, date_from="2024-10-15")["problem_id"]) == ["inside", "last", "after"]
    assert list(load(p, date_to="2024-08-01")["problem_id"]) == ["before", "first"]
    assert len(load(p)) == 5  # no window: all
    with pytest.raises(ValueError, match="benchmark 'lcb_late'.*no problem"):
        load(p, name="lcb_late", date_from="2026-01-01")


def test_bad_windows_refused():
    with pytest.raises(ValueError, match="date_from must be a date"):
        BenchmarkSpec.from_config("lcb", {"loader": "livecodebench", "path": "x", "date_from": "Aug 2024"})
    with pytest.raises(ValueError, match="after date_to"):
        BenchmarkSpec.from_config("lcb", {"loader": "livecodebench", "path": "x",
                                          "date_from": "2025-01-31", "date_to": "2024-08-01"})
    with pytest.raises(ValueError, match="only the livecodebench loader"):
        BenchmarkSpec.from_config("m", {"loader": "math500", "path": "x", "date_from": "2024-08-01"})


def test_unknown_layout_names_missing_fields_and_file(tmp_path):
    bad = dict(SQUARE)
    del bad["contest_date"]
    p = write(tmp_path, [SQUARE, bad], "other_layout.jsonl")
    with pytest.raises(ValueError, match=r"record 1 of '.*other_layout\.jsonl' lacks \['contest_date'\]"):
        load(p)


class Payload:
    """Anything but a str: a crafted file could pickle an object whose loading runs code."""


def test_pickled_non_string_refused(tmp_path):
    crafted = dict(SQUARE)
    crafted["private_test_cases"] = base64.b64encode(zlib.compress(pickle.dumps(Payload()))).decode()
    with pytest.raises(ValueError, match="problem sq1.*not LiveCodeBench's layout.*refusing"):
        load(write(tmp_path, [crafted]))
    listed = dict(SQUARE)  # a pickled list needs no class, but is still not the published JSON string
    listed["private_test_cases"] = base64.b64encode(zlib.compress(pickle.dumps([1, 2]))).decode()
    with pytest.raises(ValueError, match="not LiveCodeBench's layout"):
        load(write(tmp_path, [listed]))
    for garbage in (b"", pickle.dumps(json.dumps([]))[:-3]):  # empty or truncated: still a layout error
        cut = dict(SQUARE)
        cut["private_test_cases"] = base64.b64encode(zlib.compress(garbage)).decode()
        with pytest.raises(ValueError, match="not LiveCodeBench's layout"):
            load(write(tmp_path, [cut]))


def test_questions_say_how_the_program_takes_input(tmp_path):
    df = load(write(tmp_path, [SQUARE, TWO_SUM]))
    stdin_q, fn_q = df["question"]
    assert stdin_q == SQUARE["question_content"] + "\n" + STDIN_INSTRUCTION
    assert TWO_SUM_STARTER in fn_q and STDIN_INSTRUCTION not in fn_q and "twoSum" in fn_q
    assert fn_q.startswith(TWO_SUM["question_content"])


def test_stdin_prompt_text_unchanged(tmp_path):
    df = load(write(tmp_path, [SQUARE]))
    old = (SQUARE["question_content"] + "\nWrite a complete Python program that reads from standard input and "
           "writes to standard output. Reason step by step, then give the program in one ```python code block.")
    assert render(df["question"].iloc[0], TEMPLATES["code"]) == old
    assert build_prompt(df["question"].iloc[0], "code") == (old, False)


# -- grading ----------------------------------------------------------------------------------------
GOOD_SQUARE = "n = int(input())\nprint(n * n)"
GOOD_TWO_SUM = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
                "        seen = {}\n        for i, x in enumerate(nums):\n"
                "            if target - x in seen:\n                return [seen[target - x], i]\n"
                "            seen[x] = i\n")


@pytest.fixture
def golds(tmp_path):
    df = load(write(tmp_path, [SQUARE, TWO_SUM]))
    return dict(zip(df["problem_id"], df["answer"]))


@needs_sandbox
def test_stdin_problem_graded(golds):
    assert grade(GOOD_SQUARE, golds["sq1"]).score == 1.0
    wrong = grade("n = int(input())\nprint(n + n)", golds["sq1"])
    assert wrong.score == 0.0 and wrong.reason == "wrong_output"


@needs_sandbox
def test_functional_problem_graded(golds):
    ok = grade(GOOD_TWO_SUM, golds["1"])
    assert (ok.score, ok.reason) == (1.0, "passed")
    wrong = grade("class Solution:\n    def twoSum(self, nums, target):\n        return [0, 0]\n", golds["1"])
    assert (wrong.score, wrong.reason) == (0.0, "wrong_output")


@needs_sandbox
@pytest.mark.parametrize("code,reason", [
    ("class Solution:\n    def threeSum(self, nums, target):\n        return [0, 1]\n", "missing_method:twoSum"),
    ("def twoSum(nums, target):\n    return [0, 1]\n", "missing_class:Solution"),
    ("class Solution:\n    def twoSum(self, nums, target):\n        raise KeyError(target)\n", "runtime_error"),
])
def test_functional_failures_named(golds, code, reason):
    r = grade(code, golds["1"])
    assert (r.score, r.reason) == (0.0, reason)


@needs_sandbox
def test_functional_tuple_equals_list_and_stdin_is_not_read(golds):
    code = GOOD_TWO_SUM.replace("return [seen[target - x], i]", "return (seen[target - x], i)")
    assert grade(code, golds["1"]).score == 1.0
    # an example-usage block under __main__ stays off, and prints do not disturb the verdict
    noisy = GOOD_TWO_SUM.replace("        seen = {}\n", "        print('debug', nums)\n        seen = {}\n")
    noisy += "\nif __name__ == '__main__':\n    print(Solution().twoSum(*eval(input())))\n"
    assert grade(noisy, golds["1"]).score == 1.0
