"""Accuracy and format rewards (first version) on hand-written and adversarial completions."""

import pytest

from r1flow import rewards as R
from r1flow.rewards.rule_based import extract_answer, last_boxed

OK = " <think> 7+5=12 12*2=24 </think> <answer> 24 </answer>"


@pytest.mark.parametrize(
    "completion,expected",
    [
        (OK, "24"),
        ("<think>x</think><answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
        ("so the answer is \\boxed{\\frac{a}{\\sqrt{b}}} done", "\\frac{a}{\\sqrt{b}}"),
        ("<think> the answer is <answer>5</answer> </think> nothing after", None),  # only inside the reasoning
        ("<think> 3 </think> <answer> 4 </answer> <answer> 9 </answer>", "9"),  # last answer span
        ("no answer at all 42", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_last_boxed_nested():
    assert last_boxed("\\boxed{1} and \\boxed{{2}+{3}}") == "{2}+{3}"


@pytest.mark.parametrize(
    "pred,gold,score",
    [("24", "24", 1.0), ("24.0", "24", 1.0), ("1/2", "0.5", 1.0), ("\\frac{1}{2}", "0.5", 1.0),
     ("1,000", "1000", 1.0), ("$24$", "24", 1.0), ("\\text{24}", "24", 1.0), ("25", "24", 0.0),
     ("24x", "24", 0.0), ("-3", "3", 0.0)],
)
def test_accuracy_equivalence(pred, gold, score):
    assert R.get("accuracy")(f"<think> . </think> <answer> {pred} </answer>", gold).score == score


def test_accuracy_reasons_and_huge_answer():
    acc = R.get("accuracy")
    assert acc("nothing", "1").reason == "no_answer"
    r = acc("<think> </think> <answer> " + "9" * 100000 + " </answer>", "9")
    assert (r.score, r.reason) == (0.0, "answer_too_long")


@pytest.mark.parametrize(
    "completion,score",
    [
        (OK, 1.0),
        ("<think></think><answer>1</answer>", 1.0),
        ("<answer> 24 </answer>", 0.0),  # no reasoning
        ("24", 0.0),
        ("<think> a </think> <answer> 1 </answer> trailing text", 0.0),
        ("<answer> 1 </answer> <think> a </think>", 0.0),  # out of order
        ("<think> <think> a </think> </think> <answer> 1 </answer>", 0.0),  # nested
        ("<think> a </think> <answer> <answer> 1 </answer> </answer>", 0.0),
        ("<think> a </think> <answer> 1 </think> </answer>", 0.0),  # tag inside the answer
    ],
)
def test_format_table1(completion, score):
    assert R.get("format")(completion, "1").score == score


def test_registry_weights_and_unknown():
    total, per = R.score_batch([OK, "<answer> 24 </answer>", "junk"], ["24", "24", "24"], {"accuracy": 1.0, "format": 0.5})
    assert total == [1.5, 1.0, 0.0]
    assert [r.reason for r in per["format"]] == ["ok", "tags_missing_or_repeated", "tags_missing_or_repeated"]
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        R.get("nope")
