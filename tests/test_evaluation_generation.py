"""pass@1, pass@k, cons@k, grading and nucleus sampling against hand-computed values."""

from math import comb
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from r1flow.models.decoding import sample_next
from r1flow.rewards.grading import (
    bootstrap_interval,
    cons_at_k,
    cons_credits,
    equivalence_groups,
    pass_at_1,
    pass_at_k,
    sample_and_grade,
    standard_error,
    summarize,
    vote_credit,
)


def test_pass_at_1():
    # prompt 1: 3 of 4 correct, prompt 2: 0 of 4 -> (0.75 + 0) / 2
    assert pass_at_1(np.array([[1, 1, 0, 1], [0, 0, 0, 0]])) == pytest.approx(0.375)


@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (10, 3, 5), (16, 15, 4), (6, 6, 6)])
def test_pass_at_k_closed_form(n, c, k):
    """Chen et al. 2021: pass@k = 1 - C(n-c, k) / C(n, k)."""
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_pass_at_k_hand_values_and_k_above_n():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pass_at_k(4, 1, 5)


def test_equivalent_answers_vote_together():
    # 1/2, 0.5 and \frac{1}{2} are one answer (3 votes) and beat 2 votes for 3
    answers = ["3", "0.5", "\\frac{1}{2}", "3", "1/2"]
    ids = equivalence_groups(answers)
    assert ids[1] == ids[2] == ids[4] and ids[0] == ids[3] and ids[0] != ids[1]
    correct = [0, 1, 1, 0, 1]
    assert vote_credit(answers, correct) == 1.0
    # with string equality only, 3 wins 2 to 1 each
    assert vote_credit(answers, correct, same=lambda p, g: [False] * len(p)) == 0.0


def test_vote_ties_truncation_and_empty():
    # a tie between 3 (right) and 4 (wrong): the expected credit of a random tie-break, whatever the order
    assert vote_credit(["3", "4", "4", None, "3"], [1, 0, 0, 0, 1]) == 0.5
    assert vote_credit(["4", "3", "4", "3"], [0, 1, 0, 1]) == 0.5
    # a three-way tie with one right group: 1/3
    assert vote_credit(["1", "2", "3"], [0, 1, 0]) == pytest.approx(1 / 3)
    assert vote_credit([None, None], [0, 0]) == 0.0
    assert vote_credit(["1,000", "1000", "7"], [1, 1, 0]) == 1.0  # thousands separators normalised
    # truncated samples do not vote: the two cut-off 5s lose to the one finished 12
    assert vote_credit(["5", "5", "12"], [0, 0, 1], [True, True, False]) == 1.0
    assert vote_credit(["5", "5", "12"], [0, 0, 1]) == 0.0  # ... which they would win if they voted
    assert vote_credit(["12", "12"], [0, 0], [True, True]) == 0.0  # nothing finished: no vote


def test_cons_at_k_does_not_depend_on_the_order_of_the_samples():
    """The review's case: the first "12" was truncated (correct forced to 0). It no longer votes, the finished
    "12" and the "5" tie, and the credit is 0.5 in every order of the three samples."""
    import itertools

    answers, correct, truncated = ["12", "12", "5"], [0.0, 1.0, 0.0], [True, False, False]
    seen = set()
    for perm in itertools.permutations(range(3)):
        seen.add(cons_at_k([[answers[i] for i in perm]], [[correct[i] for i in perm]], 3,
                           [[truncated[i] for i in perm]]))
    assert seen == {0.5}
    # the fixtures of this file, every permutation of every problem: one cons@k each
    fixtures = [(["x=2", "2", "3", "2.0"], [1, 1, 0, 1], [False] * 4), (["6", "7", "7", "5"], [0, 0, 0, 1], [False] * 4),
                (["3", "0.5", "\\frac{1}{2}", "3", "1/2"], [0, 1, 1, 0, 1], [False, False, True, False, False]),
                (["4", "3", "4", None], [0, 1, 0, 0], [False, False, False, True])]
    for ans, ok, cut in fixtures:
        values = {cons_at_k([[ans[i] for i in perm]], [[ok[i] for i in perm]], len(ans), [[cut[i] for i in perm]])
                  for perm in itertools.permutations(range(len(ans)))}
        assert len(values) == 1, (ans, values)


def test_cons_at_k_with_equivalence_and_first_k():
    answers = [["x=2", "2", "3", "2.0"], ["6", "7", "7", "5"], [None, None, None, None]]
    correct = [[1, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    # problem 1: x=2, 2 and 2.0 are one answer and it is right; 2: majority 7 wrong; 3: no answer
    assert cons_at_k(answers, correct, 4) == pytest.approx(1 / 3)
    # the first 2 samples of problem 2 tie between 6 and 7, both wrong: still 1/3
    assert cons_at_k(answers, correct, 2) == pytest.approx(1 / 3)
    # problem 2's samples 3-4 would be 7 (wrong) vs 5 (right): a tie worth 1/2 -- not among the first k=2
    assert cons_credits(answers, correct, 2).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="cons@8 needs 8 samples"):
        cons_at_k(answers, correct, 8)


def test_standard_error_and_bootstrap_by_hand():
    # per-problem means 1, 0, 0.5, 0.5: mean 0.5, sample sd sqrt(((.5)^2 * 2) / 3) = 0.40825, se = 0.20412
    assert standard_error(np.array([1.0, 0.0, 0.5, 0.5])) == pytest.approx(0.2041241, abs=1e-6)
    assert np.isnan(standard_error(np.array([0.3])))
    lo, hi = bootstrap_interval(np.array([1.0] * 10))
    assert lo == hi == 1.0  # no spread, no interval
    x = np.array([0.0, 1.0] * 50)  # a mean of 0.5 over 100 0/1 problems: about 0.5 +- 1.96 * 0.05
    lo, hi = bootstrap_interval(x)
    assert 0.38 < lo < 0.42 and 0.58 < hi < 0.62
    assert bootstrap_interval(x) == (lo, hi)  # seeded: a table is reproducible


def test_summarize_counts_truncated_as_wrong():
    s = pd.DataFrame({"problem_id": ["a", "a", "b", "b"], "extracted": ["1", "1", "3", None],
                      "correct": [1.0, 0.0, 1.0, 0.0], "format": [1.0, 1.0, 0.0, 1.0],
                      "completion_tokens": [10, 20, 30, 40], "truncated": [False, True, False, False]})
    out = summarize(s, pass_ks=(1, 2), cons_k=2)
    # a: only the finished "1" votes, right -> solved; b: only "3" voted, right -> solved
    # per-problem pass@1 0.5 and 0.5: no spread between problems, se 0
    assert {k: v for k, v in out.items() if not k.endswith(("_lo", "_hi"))} == {
        "num_problems": 2, "n": 2, "pass@1": 0.5, "pass@1_se": 0.0, "pass@2": 1.0, "cons@k": 1.0, "cons_k": 2,
        "language_consistency": None, "format_rate": 0.75, "mean_length": 25.0, "truncated_rate": 0.25,
        "reflections": None, "sandbox_errors": 0}
    assert out["cons@k_lo"] == out["cons@k_hi"] == 1.0 and out["pass@2_lo"] == out["pass@2_hi"] == 1.0
    # with the completions: re-checked steps ("wait") per completion
    texts = ["=13 wait 7+5=12", "Wait, wait.", "no", "awaited"]
    assert summarize(s.assign(completion=texts))["reflections"] == (1 + 2 + 0 + 0) / 4


def test_summarize_first_sample_truncated_and_order():
    """The review's case: a samples table whose first sample is truncated gave cons@3 = 0."""
    s = pd.DataFrame({"problem_id": ["a"] * 3, "sample": [0, 1, 2], "extracted": ["12", "12", "5"],
                      "correct": [1.0, 1.0, 0.0], "format": [1.0] * 3, "completion_tokens": [50, 9, 9],
                      "truncated": [True, False, False], "reason": ["truncated", "correct", "wrong_answer"]})
    out = summarize(s, cons_k=3)
    assert out["pass@1"] == pytest.approx(1 / 3)  # the truncated right answer is wrong (section 3)
    assert out["cons@k"] == 0.5  # finished 12 (right) ties with 5 (wrong)
    shuffled = s.iloc[[2, 0, 1]].assign(sample=[0, 1, 2])
    assert summarize(shuffled, cons_k=3)["cons@k"] == 0.5
    errors = s.assign(reason=["truncated", "sandbox_error", "correct"])
    assert summarize(errors)["sandbox_errors"] == 1


class _FakeGen:
    """Returns fixed completions; the second of each pair is cut off at the length limit."""

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, params):
        n = len(prompts) * params.n
        t = self.texts[:n]
        return SimpleNamespace(texts=t, truncated=torch.tensor([i % 2 == 1 for i in range(n)]),
                               lengths=torch.tensor([len(x) for x in t]))


def test_sample_and_grade_marks_truncated_wrong_and_prefilled_think():
    from r1flow.generation import SamplingParams

    problems = pd.DataFrame({"benchmark": ["b"], "problem_id": ["p1"], "answer": ["12"]})
    right = " 5+7=12 </think> The answer is \\boxed{12}"
    gen = _FakeGen([right, right])  # both right, but the second is truncated
    s = sample_and_grade(gen, problems, ["Q"], SamplingParams(n=2), "accuracy", prefilled_think=True,
                         format_reward="format_think")
    assert s["correct"].tolist() == [1.0, 0.0] and s["reason"].tolist() == ["correct", "truncated"]
    assert s["extracted"].tolist() == ["12", "12"]
    assert s["format"].tolist() == [1.0, 1.0]  # the <think> the chat template opened is counted
    assert s["completion"].iloc[0] == right  # the record keeps what the model wrote


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    seen = torch.bincount(sample_next(logits, 1.0, 0.7, g), minlength=4)
    assert seen[2] == 0 and seen[3] == 0  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are cut
    assert seen[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)
    seen = torch.bincount(sample_next(logits, 1.0, 0.95, g), minlength=4)
    assert seen[3] == 0 and seen[2] > 0
    assert sample_next(torch.tensor([[0.1, 3.0, 0.2]]), 0.0, 1.0).tolist() == [1]  # temperature 0: greedy


def test_draws_follow_the_probabilities():
    """The inverse-CDF draw: frequencies match the softmax, tiny and zero probabilities keep theirs, per-group
    streams draw the same as a batch stream of one group."""
    from r1flow.models.decoding import GroupGenerators

    N = 40000
    logits = torch.tensor([0.0, -0.5, -1.0, -float("inf"), -9.0]).expand(N, 5)
    p = torch.softmax(logits[0], -1)
    seen = torch.bincount(sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(1)), minlength=5) / N
    assert seen[3] == 0  # probability 0: never
    assert torch.allclose(seen[:3], p[:3], atol=0.01)
    assert 0 < seen[4] < 5 * p[4]  # 1.2e-4: drawn about 5 times in 40,000
    # a row whose mass sits on its last token (the clamp at the end of the cdf)
    assert sample_next(torch.tensor([[-float("inf"), -float("inf"), 0.0]]).expand(100, 3), 1.0, 1.0,
                       torch.Generator().manual_seed(0)).eq(2).all()
    a = sample_next(logits[:6], 1.0, 1.0, GroupGenerators([7], 6))
    b = sample_next(logits[:6], 1.0, 1.0, torch.Generator().manual_seed(7))
    assert a.tolist() == b.tolist()


def test_generator_fast_and_reference_paths_agree(tiny_policy):
    from r1flow.data.prompts import render
    from r1flow.generation import Generator, SamplingParams
    from r1flow.models import load_policy

    model, tok = load_policy(str(tiny_policy[0]))
    prompts = [render(q) for q in ("Compute 3+4*2", "Compute (9-2)*3+1", "Compute 5")]
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=24)
    fast = Generator(model, tok, fast=True, batch_size=4).generate(prompts, params)
    ref = Generator(model, tok, fast=False, batch_size=4).generate(prompts, params)
    assert fast.texts == ref.texts
    assert torch.equal(fast.completion_mask, ref.completion_mask) and torch.equal(fast.truncated, ref.truncated)
    assert fast.prompt_ids.shape[0] == 6 and torch.equal(fast.prompt_ids, ref.prompt_ids)
    # rows are prompt-major: the two samples of a prompt are adjacent and, greedy, identical
    assert fast.texts[0] == fast.texts[1] and fast.texts[2] == fast.texts[3]
    # completion mask ends at (and includes) the stop token
    for row, m in zip(fast.completion_ids, fast.completion_mask):
        n = int(m.sum())
        if n < row.shape[0] and n > 0:
            assert row[n - 1].item() == tok.eos_token_id


def test_tables_carry_error_bars_and_sandbox_errors():
    from r1flow.evaluation.report import results_table, to_markdown

    # 4 problems x 2 samples: per-problem pass@1 1, .5, .5, 0 -> 50.0, sd sqrt(.5/3) = .4082, se .2041
    s = pd.DataFrame({"problem_id": [p for p in "abcd" for _ in range(2)], "sample": [0, 1] * 4,
                      "extracted": ["1", "1", "2", "3", "4", "5", "6", "6"],
                      "correct": [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0], "format": 1.0, "completion_tokens": 5,
                      "truncated": False, "reason": ["ok"] * 7 + ["sandbox_error"]})
    row = summarize(s, pass_ks=(1, 2), cons_k=2)
    assert row["pass@1"] == 0.5 and row["pass@1_se"] == pytest.approx(0.2041241, abs=1e-6)
    # cons@2: a solved, b and c ties worth 1/2 each, d wrong -> (1 + .5 + .5 + 0) / 4
    assert row["cons@k"] == 0.5 and row["cons@k_lo"] <= 0.5 <= row["cons@k_hi"]
    meta = {"model": "m", "benchmark": "b", "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 9}
    table = results_table([pd.DataFrame([{**row, **meta}])])
    assert list(table.columns[-3:]) == ["pass@2", "pass@2_lo", "pass@2_hi"]
    md = to_markdown(table, "T")
    assert "| b pass@1 | b cons@2 | b pass@2 |" in md
    assert f"| m | 50.0 ± 20.4 | 50.0 [{100 * row['cons@k_lo']:.1f}, {100 * row['cons@k_hi']:.1f}] | 75.0 [" in md
    assert "**m on b: 1 samples hit a sandbox error**" in md
