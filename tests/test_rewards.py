"""The reward registry, answer extraction, the cheap checks, format and language consistency."""

import pytest

from r1flow import rewards as R
from r1flow.rewards.language import chain_of_thought, count_words
from r1flow.rewards.math_answer import cheap_verdict, extract_answer, last_boxed

OK = " <think> 7+5=12 12*2=24 </think> <answer> 24 </answer>"


def one(name, completion, gold="1", **options):
    return R.get(name)([completion], [gold], **options)[0]


@pytest.mark.parametrize(
    "completion,expected",
    [
        (OK, "24"),
        ("<think>x</think><answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
        ("so the answer is \\boxed{\\frac{a}{\\sqrt{b}}} done", "\\frac{a}{\\sqrt{b}}"),
        ("<think> the answer is <answer>5</answer> </think> nothing after", None),  # only inside the reasoning
        ("<think> the answer is \\boxed{5} and it never ends", None),  # unclosed reasoning: no answer region
        ("<think> 3 </think> <answer> 4 </answer> <answer> 9 </answer>", "9"),  # last answer span
        ("no answer at all 42", None),
        ("\\boxed{unclosed", None),
        ("|special_token| 2+2=4 |special_token| The sum is \\boxed{4}.", "4"),  # readable pattern's summary
        ("answer: \\boxed 7", "7"),
        ("\\fbox{12}", "12"),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_fallback_last_number():
    assert extract_answer("we get 3 then 17.5", fallback="last_number") == "17.5"
    assert extract_answer("we get 3 then 17.5") is None
    with pytest.raises(ValueError, match="unknown answer fallback"):
        extract_answer("3", fallback="first")


def test_last_boxed_nested():
    assert last_boxed("\\boxed{1} and \\boxed{{2}+{3}}") == "{2}+{3}"
    deep = "\\boxed{" + "{" * 3000 + "7" + "}" * 3000 + "}"
    assert last_boxed(deep) == "{" * 3000 + "7" + "}" * 3000


@pytest.mark.parametrize(
    "pred,gold,verdict",
    [("24", "24", True), ("24.0", "24", True), ("1/2", "0.5", True), ("\\frac{1}{2}", "0.5", True),
     ("\\dfrac{1}{2}", "\\frac12", True), ("1,000", "1000", True), ("$24$", "24", True), ("\\text{24}", "24", True),
     ("25", "24", False), ("-3", "3", False), ("24x", "24", None), ("0.333333", "\\frac{1}{3}", None), ("0.75", "0.15", False),
     ("-\\frac{10}{11}", "\\frac{10}{11}", False), ("\\frac43", "\\frac{4}{3}", True), ("1.5", "-\\frac32", False),
     ("１２", "12", None)],  # fullwidth digits are not settled by the cheap check
)
def test_cheap_verdict(pred, gold, verdict):
    """True/False only when plain comparison settles it; None sends the pair to Math-Verify."""
    assert cheap_verdict(pred, gold) is verdict


def test_accuracy_exact_verifier_and_reasons():
    acc = R.get("accuracy")
    got = acc([OK, "<think>.</think><answer>25</answer>", "nothing", "<think></think><answer>" + "9" * 5000 + "</answer>",
               "<think>.</think><answer>24x</answer>"], ["24"] * 5, verifier="exact")
    assert [(r.score, r.reason) for r in got] == [(1.0, "correct"), (0.0, "wrong"), (0.0, "no_answer"),
                                                  (0.0, "answer_too_long"), (0.0, "wrong")]
    assert got[0].extracted == "24"


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
    assert one("format", completion).score == score


@pytest.mark.parametrize(
    "completion,score,reason",
    [
        ("|special_token| 7+5=12, then 12*2=24 |special_token| The answer is 24.", 1.0, "ok"),
        ("  |special_token|a|special_token|b", 1.0, "ok"),
        ("|special_token| reasoning only |special_token|   ", 0.0, "no_summary"),
        ("|special_token|  |special_token| summary", 0.0, "empty_reasoning"),
        ("Sure! |special_token| r |special_token| s", 0.0, "text_before_reasoning"),
        ("|special_token| r |special_token| s |special_token|", 0.0, "markers_missing_or_repeated"),
        ("|special_token| r |special_token| s |special_token| t |special_token|", 0.0, "markers_missing_or_repeated"),
        ("no markers at all", 0.0, "markers_missing_or_repeated"),
        ("|special_token| <think> r </think> |special_token| s", 0.0, "mixed_patterns"),
    ],
)
def test_format_readable(completion, score, reason):
    r = one("format_readable", completion)
    assert (r.score, r.reason) == (score, reason)


def test_format_readable_custom_marker():
    assert one("format_readable", "<|r|> a <|r|> b", marker="<|r|>").score == 1.0
    assert one("format_readable", "<|r|> a <|r|> b").score == 0.0


def test_count_words_english_chinese_and_math():
    # Let, so, x, don't, go, step-by-step = 6 English words; 所以答案是 = 5 Han characters; math and 42 dropped
    c = count_words("Let $x^2 = 4$, so x \\cdot 2: don't go step-by-step. 所以答案是 42")
    assert c == {"en": 6, "zh": 5, "other": 0}
    assert count_words("Привет мир, hello") == {"en": 1, "zh": 0, "other": 2}
    assert count_words("$$\\frac{1}{2}$$ 12 + 3 = 15") == {"en": 0, "zh": 0, "other": 0}


def test_language_consistency_scores():
    en = "<think> First add seven and five, 先 加 then double. </think><answer>24</answer>"
    r = one("language_consistency", en, target="en")
    assert r.score == pytest.approx(7 / 9) and r.reason == "en=7/9"  # 7 English words, 2 Han characters
    zh = "<think>先算七加五等于十二 then 乘以二</think><answer>24</answer>"
    assert one("language_consistency", zh, target="zh").score == pytest.approx(12 / 13)
    assert one("language_consistency", "<think> 1+1=2 </think><answer>2</answer>").reason == "no_words"
    # only the chain of thought counts: an English answer after Chinese reasoning changes nothing
    assert one("language_consistency", "<think>思考</think><answer>two words</answer>", target="zh").score == 1.0
    with pytest.raises(ValueError, match="supports"):
        one("language_consistency", en, target="fr")


def test_chain_of_thought_parts():
    assert chain_of_thought("<think> a </think> b") == " a "
    assert chain_of_thought("|special_token| r |special_token| s") == " r "
    assert chain_of_thought("<think> never closed") == " never closed"
    assert chain_of_thought("plain") == "plain"


def test_language_and_accuracy_summed_with_weights():
    """Section 2.3.2: reward = accuracy + weight * language consistency."""
    c = "<think> seven plus five is twelve 所以 </think><answer>12</answer>"
    total, per = R.score_batch([c], ["12"], {"accuracy": 1.0, "language_consistency": 0.5},
                               {"accuracy": {"verifier": "exact"}, "language_consistency": {"target": "en"}})
    assert per["language_consistency"][0].score == pytest.approx(5 / 7)
    assert total == [pytest.approx(1.0 + 0.5 * 5 / 7)]


def test_registry_weights_and_unknown():
    total, per = R.score_batch([OK, "<answer> 24 </answer>", "junk"], ["24", "24", "24"],
                               {"accuracy": 1.0, "format": 0.5}, {"accuracy": {"verifier": "exact"}})
    assert total == [1.5, 1.0, 0.0]
    assert [r.reason for r in per["format"]] == ["ok", "tags_missing_or_repeated", "tags_missing_or_repeated"]
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        R.get("nope")
    with pytest.raises(ValueError, match="registered twice"):
        R.register("format")(lambda c, g: [])
