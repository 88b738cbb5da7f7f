"""Benchmark loaders, prompts (zero-shot, chat templates that open <think>), choice grading, and the
grader's agreement with MATH-500's own reference solutions."""

import json
from pathlib import Path

import pandas as pd
import pytest

from r1flow import rewards as R
from r1flow.evaluation.benchmarks import (
    BenchmarkSpec,
    build_prompt,
    gsm8k_answer,
    load_benchmark,
)

HERE = Path(__file__).parent
SHARED = HERE.parent.parent / "shared" / "benchmarks"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/benchmarks not present")


def spec(name, loader, path, **kw):
    return BenchmarkSpec.from_config(name, {"loader": loader, "path": str(path), **kw})


def test_k_above_n_is_refused():
    with pytest.raises(ValueError, match="k=64 asked but only n=16"):
        spec("aime", "aime24", "x", n=16, cons_at_k=64)
    with pytest.raises(ValueError, match="k=8 asked but only n=4"):
        spec("m", "math500", "x", n=4, pass_at_k=[1, 8])
    with pytest.raises(ValueError, match="unknown loader"):
        spec("m", "nope", "x")


def test_gsm8k_answer_parsing():
    assert gsm8k_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert gsm8k_answer("#### 1,200") == "1200"


@needs_shared
@pytest.mark.parametrize("loader,file,count,first_answer", [
    ("math500", "math500.jsonl", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("aime24", "aime24.jsonl", 30, None),
    ("amc23", "amc23.jsonl", 40, None),
    ("gsm8k", "gsm8k_test.jsonl", 1319, "18"),
    ("minerva", "minerva_math.jsonl", 272, None),
])
def test_real_benchmark_files_load(loader, file, count, first_answer):
    df = load_benchmark(spec(loader, loader, SHARED / file))
    assert len(df) == count and df["problem_id"].is_unique
    assert (df["question"].str.len() > 10).all() and (df["answer"].str.len() > 0).all()
    if first_answer:
        assert df["answer"].iloc[0] == first_answer
    if loader in ("aime24", "amc23"):
        assert not df["answer"].str.endswith(".0").any()  # AMC floats such as 27.0 become 27
    assert len(load_benchmark(spec(loader, loader, SHARED / file, limit=7))) == 7


@needs_shared
def test_grader_agrees_with_math500_reference_solutions():
    """Gold answer vs the boxed answer of the problem's own reference solution: >= 99% agreement."""
    rows = [json.loads(line) for line in (SHARED / "math500.jsonl").read_text().splitlines()]
    out = R.get("accuracy")([r["solution"] for r in rows], [r["answer"] for r in rows], timeout_s=10)
    disagree = [(r["unique_id"], r["answer"], o.extracted, o.reason) for r, o in zip(rows, out) if o.score < 1]
    print(f"MATH-500 self-agreement {1 - len(disagree) / len(rows):.3f}; disagreements: {disagree}")
    assert len(disagree) <= 5


def test_gpqa_choices_shuffled_with_a_fixed_seed():
    a = load_benchmark(spec("gpqa", "gpqa_diamond", HERE / "data" / "gpqa_mini.jsonl", answer_type="multiple_choice"))
    b = load_benchmark(spec("gpqa", "gpqa_diamond", HERE / "data" / "gpqa_mini.jsonl", answer_type="multiple_choice"))
    c = load_benchmark(spec("gpqa", "gpqa_diamond", HERE / "data" / "gpqa_mini.jsonl", answer_type="multiple_choice",
                            seed=7))
    assert a.equals(b)  # same seed, same order
    assert list(a["answer"]) != list(c["answer"]) or list(a["question"]) != list(c["question"])
    for q, ans in zip(a["question"], a["answer"]):  # the gold letter points at the correct answer
        line = next(x for x in q.splitlines() if x.startswith(f"{ans})"))
        assert line.split(") ", 1)[1] in ("photon", "7", "thymine", "newton")
    assert len(set(a["answer"])) > 1  # not always the same letter


@pytest.mark.parametrize("completion,score", [
    ("<think> photons mediate it </think> The answer is \\boxed{B}", 1.0),
    ("<think>x</think> \\boxed{(B)}", 1.0),
    ("<think>x</think> \\boxed{\\text{B}}", 1.0),
    ("<think>x</think> So the answer is (B).", 1.0),
    ("<think>x</think> \\boxed{C}", 0.0),
    ("<think> the answer is B </think> no letter after", 0.0),
    ("<think>x</think> \\boxed{B and C}", 0.0),
])
def test_choice_accuracy(completion, score):
    assert R.get("choice_accuracy")([completion], ["B"])[0].score == score


def test_livecodebench_stdin_gold():
    """A stdin problem's gold keeps the old form (functional problems: tests/test_livecodebench.py)."""
    df = load_benchmark(spec("lcb", "livecodebench", HERE / "data" / "lcb_mini.jsonl", answer_type="code",
                             template="code"))
    gold = json.loads(df["answer"].iloc[0])
    assert gold == {"language": "python", "tests": [{"input": "3\n", "output": "9\n"}, {"input": "12\n", "output": "144\n"}]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math500_file_without_answer_names_it(tmp_path):
    p = _jsonl(tmp_path / "math_other.jsonl", [{"problem": "1+1?", "solution": "\\boxed{2}", "unique_id": "a"}])
    with pytest.raises(ValueError, match=r"benchmark 'm': record 0 of '.*math_other\.jsonl' lacks \['answer'\]"):
        load_benchmark(spec("m", "math500", p))


GPQA_CSV_COLUMNS = ["Pre-Revision Question", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                    "Incorrect Answer 3", "Explanation", "Record ID", "Subdomain", "High-level domain"]


def test_gpqa_published_csv_read_back(tmp_path):
    """gpqa_diamond.csv's columns (and more it does not read); cells stay text: "7" is not 7.0, "NA" not NaN."""
    rows = [json.loads(line) for line in (HERE / "data" / "gpqa_mini.jsonl").read_text().splitlines() if line.strip()]
    for r in rows:
        r.update({"Pre-Revision Question": r["Question"], "Explanation": "NA", "Subdomain": "Physics",
                  "High-level domain": "Physics"})
    p = tmp_path / "gpqa_diamond.csv"
    pd.DataFrame(rows, columns=GPQA_CSV_COLUMNS).to_csv(p, index=False)
    from_csv = load_benchmark(spec("gpqa", "gpqa_diamond", p, answer_type="multiple_choice"))
    from_jsonl = load_benchmark(spec("gpqa", "gpqa_diamond", HERE / "data" / "gpqa_mini.jsonl",
                                     answer_type="multiple_choice"))
    assert from_csv.equals(from_jsonl)  # the same shuffled choices, letters and ids
    assert list(from_csv["problem_id"]) == [r["Record ID"] for r in rows]
    for q, ans, r in zip(from_csv["question"], from_csv["answer"], rows):
        choices = [x.split(") ", 1)[1] for x in q.splitlines() if x[:3] in ("A) ", "B) ", "C) ", "D) ")]
        assert sorted(choices) == sorted(str(r[k]) for k in ("Correct Answer", "Incorrect Answer 1",
                                                             "Incorrect Answer 2", "Incorrect Answer 3"))
        assert choices["ABCD".index(ans)] == r["Correct Answer"]
        assert "7.0" not in q


def test_gpqa_file_without_a_distractor_names_it(tmp_path):
    rows = [json.loads(line) for line in (HERE / "data" / "gpqa_mini.jsonl").read_text().splitlines() if line.strip()]
    del rows[0]["Incorrect Answer 3"]
    p = tmp_path / "gpqa.csv"
    pd.DataFrame(rows[:1]).to_csv(p, index=False)
    with pytest.raises(ValueError, match=r"record 0 of '.*gpqa\.csv' lacks \['Incorrect Answer 3'\]"):
        load_benchmark(spec("gpqa", "gpqa_diamond", p, answer_type="multiple_choice"))
    p = _jsonl(tmp_path / "gpqa.jsonl", rows)
    with pytest.raises(ValueError, match=r"record 0 of '.*gpqa\.jsonl' lacks \['Incorrect Answer 3'\]"):
        load_benchmark(spec("gpqa", "gpqa_diamond", p, answer_type="multiple_choice"))


class _Tok:
    """A tokenizer whose chat template opens the reasoning, as DeepSeek-R1's distilled models do."""

    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return f"<|User|>{messages[0]['content']}<|Assistant|><think>\n"


def test_prompts_zero_shot_and_prefilled_think():
    text, pre = build_prompt("What is 2+2?", "math")
    assert text == "What is 2+2?\nPlease reason step by step, and put your final answer within \\boxed{}." and not pre
    text, pre = build_prompt("What is 2+2?", "math", _Tok(), chat=True)
    assert text.startswith("<|User|>What is 2+2?\nPlease reason") and text.endswith("<think>\n") and pre
    text, pre = build_prompt("Q", "table1")
    assert text.endswith("User: Q. Assistant:") and not pre
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt("Q", "math", None, chat=True)
