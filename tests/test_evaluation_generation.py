"""pass@1, cons@k and nucleus sampling against hand-computed values."""

import numpy as np
import pandas as pd
import pytest
import torch

from r1flow.evaluation import cons_at_k, majority_vote, pass_at_1, summarize
from r1flow.generation import sample_next


def test_pass_at_1():
    # prompt 1: 3 of 4 correct, prompt 2: 0 of 4 -> (0.75 + 0) / 2
    assert pass_at_1(np.array([[1, 1, 0, 1], [0, 0, 0, 0]])) == pytest.approx(0.375)


def test_majority_vote_and_cons():
    assert majority_vote(["3", "4", "4", None, "3"]) == "3"  # tie: first seen wins
    assert majority_vote([None, None]) is None
    assert majority_vote(["1,000", "1000", "7"]) == "1000"  # votes on normalised answers
    answers = [["5", "5", "6", "5"], ["6", "7", "7", "5"], [None, None, None, None]]
    correct = [[1, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
    # prompt 1: majority 5 correct; prompt 2: majority 7 wrong even though one sample is right; prompt 3: none
    assert cons_at_k(answers, correct) == pytest.approx(1 / 3)


def test_summarize():
    s = pd.DataFrame({"prompt_id": ["a", "a", "b", "b"], "extracted": ["1", "2", "3", None],
                      "accuracy": [1.0, 0.0, 1.0, 0.0], "format": [1.0, 1.0, 0.0, 1.0], "num_tokens": [10, 20, 30, 40]})
    out = summarize(s, 2)
    assert out == {"k": 2, "num_prompts": 2, "pass@1": 0.5, "cons@k": 1.0, "format_rate": 0.75, "mean_length": 25.0}


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
