"""Sharded sampling with DeepSpeed: each rank samples only its share of a step's groups, each group with
its own seed, so a step on 2 CPU ranks equals the single-process step (the same completions, rewards,
loss and updated weights). Single-process pieces: per-group seeds make a group's samples independent of
the batch it is decoded in."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1flow.generation import Generator, SamplingParams
from r1flow.models.decoding import GroupGenerators, sample_next

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5


def test_a_groups_samples_do_not_depend_on_the_other_prompts(tiny_policy):
    """With per-prompt seeds, a prompt's n samples are the same alone, in a batch, in another decoding
    chunk, on the fast path and the reference path; the batch generator's state is left untouched."""
    from r1flow.models import load_policy

    model, tok = load_policy(str(tiny_policy[0]))
    prompts = ["Compute 1+2", "Compute (3+4)*2", "Compute 9-5"]
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10)
    gen = Generator(model, tok, batch_size=64, seed=0)
    state = gen.rng.get_state()
    whole = gen.generate(prompts, params, seeds=[7, 8, 9])
    assert torch.equal(gen.rng.get_state(), state)
    alone = Generator(model, tok, batch_size=3, seed=1).generate(prompts[1:2], params, seeds=[8])
    assert whole.texts[3:6] == alone.texts
    chunked = Generator(model, tok, batch_size=3, seed=2).generate(prompts[::-1], params, seeds=[9, 8, 7])
    assert chunked.texts[3:6] == whole.texts[3:6] and chunked.texts[0:3] == whole.texts[6:9]
    slow = Generator(model, tok, batch_size=64, seed=3, fast=False).generate(prompts, params, seeds=[7, 8, 9])
    assert slow.texts == whole.texts
    with pytest.raises(ValueError, match="seeds for"):
        gen.generate(prompts, params, seeds=[1])


def test_group_generators_draw_per_group():
    probs = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), -1)
    a = sample_next(probs.log(), 1.0, 1.0, GroupGenerators([1, 2, 3], 2))
    b = sample_next(probs[2:4].log(), 1.0, 1.0, GroupGenerators([2], 2))
    assert torch.equal(a[2:4], b)
    with pytest.raises(ValueError, match="groups of"):
        sample_next(probs.log(), 1.0, 1.0, GroupGenerators([1, 2], 2))


@pytest.mark.distributed
def test_sharded_sampling_on_two_cpu_ranks_matches_one_process(tiny_policy, tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[distributed]')")
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "helpers" / "sharded_worker.py"), "--model", str(tiny_policy[0]), "--out", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2
    for step in range(2):
        single = r["single"][step]
        assert len(single["prompts"]) == 4
        for rank in range(2):  # each rank sampled its half of the groups, with those groups' seeds
            mine = r["dist"][rank][step]
            assert mine["prompts"] == single["prompts"][2 * rank : 2 * rank + 2]
            assert mine["seeds"] == single["seeds"][2 * rank : 2 * rank + 2]
        assert r["dist"][0][step]["texts"] + r["dist"][1][step]["texts"] == single["texts"]
        for k, v in r["rows_single"][step].items():
            assert r["rows_dist"][step][k] == pytest.approx(v, abs=ATOL), (step, k)
    assert r["weights_max_abs_diff"] < ATOL and r["weights_moved"] > 1e-4, r
