"""pass@1, pass@k, cons@k, grading and nucleus sampling against hand-computed values."""

from math import comb
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from r1flow.models.decoding import sample_next
from r1flow.rewards.grading import (
    cons_at_k,
    equivalence_groups,
    majority_vote,
    pass_at_1,
    pass_at_k,
    sample_and_grade,
    summarize,
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
    assert majority_vote(answers) == 1  # a sample of the winning group (the first of it)
    # with string equality only, 3 would win 2 to 1 each
    assert majority_vote(answers, same=lambda p, g: [False] * len(p)) == 0


def test_majority_vote_ties_and_empty():
    assert majority_vote(["3", "4", "4", None, "3"]) == 0  # tie: the group seen first wins
    assert majority_vote([None, None]) is None
    assert majority_vote(["1,000", "1000", "7"]) == 0  # thousands separators normalised


def test_cons_at_k_with_equivalence_and_first_k():
    answers = [["x=2", "2", "3", "2.0"], ["6", "7", "7", "5"], [None, None, None, None]]
    correct = [[1, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    # problem 1: x=2, 2 and 2.0 are one answer and it is right; 2: majority 7 wrong; 3: no answer
    assert cons_at_k(answers, correct, 4) == pytest.approx(1 / 3)
    # the first 2 samples of problem 2 tie between 6 and 7: 6, seen first, wins and is wrong
    assert cons_at_k(answers, correct, 2) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="cons@8 needs 8 samples"):
        cons_at_k(answers, correct, 8)


def test_summarize_counts_truncated_as_wrong():
    s = pd.DataFrame({"problem_id": ["a", "a", "b", "b"], "extracted": ["1", "1", "3", None],
                      "correct": [1.0, 0.0, 1.0, 0.0], "format": [1.0, 1.0, 0.0, 1.0],
                      "completion_tokens": [10, 20, 30, 40], "truncated": [False, True, False, False]})
    out = summarize(s, pass_ks=(1, 2), cons_k=2)
    # a: majority "1", its first sample right -> solved; b: only "3" voted, right -> solved
    assert out == {"num_problems": 2, "n": 2, "pass@1": 0.5, "pass@2": 1.0, "cons@k": 1.0, "cons_k": 2,
                   "language_consistency": None,
                   "format_rate": 0.75, "mean_length": 25.0, "truncated_rate": 0.25, "reflections": None}
    # with the completions: re-checked steps ("wait") per completion
    texts = ["=13 wait 7+5=12", "Wait, wait.", "no", "awaited"]
    assert summarize(s.assign(completion=texts))["reflections"] == (1 + 2 + 0 + 0) / 4


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
