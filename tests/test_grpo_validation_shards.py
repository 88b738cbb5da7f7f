"""GRPO validation on several ranks (GRPOTrainer.validate): each rank samples and grades only its share of
the validation prompts, each prompt from its own seed, and the gathered grades give every rank the
metrics of the whole set, exactly those of one process grading the same samples. Ranks are threads here,
each with its own trainer and a stand-in engine whose all_gather concatenates the ranks' rows in rank
order (as DeepSpeedEngine.all_gather does)."""


import pandas as pd
import pytest
import torch
from conftest import FAMILIES
from helpers.thread_ranks import ThreadRanks

from r1flow import rewards as R
from r1flow.data.tasks import generate_tasks
from r1flow.generation import SamplingParams
from r1flow.models import load_policy
from r1flow.rewards.grading import sample_and_grade, summarize
from r1flow.training.engine import LocalEngine
from r1flow.training.grpo import GRPOConfig, GRPOTrainer, _SeededGenerator

N_PROMPTS, K = 5, 3  # 5 prompts: uneven shares on 2 ranks (3 + 2), an empty one on 4 (2 + 2 + 1 + 0)


class RankEngine(LocalEngine):
    def __init__(self, ranks: ThreadRanks, rank: int):
        self.ranks, self.rank, self.world_size = ranks, rank, ranks.world_size
        self.loss_scale, self.master = float(ranks.world_size), None

    def all_gather(self, rows):
        return self.ranks.all_gather(self.rank, rows)


@pytest.fixture
def graded_by_text(monkeypatch):
    """The tiny policy writes no correct answer, so every pass@1 would be 0: accuracy and format are
    replaced by scores that depend on each completion's text, so the metrics say which samples were
    graded where."""
    real = R.score_batch

    def score_batch(completions, answers, weights, options=None, prompts=None):
        total, per = real(completions, answers, weights, options, prompts)
        for name in ("accuracy", "format"):
            if name in per:
                per[name] = [R.Reward(float(len(t) % (2 if name == "accuracy" else 3) == 0), "text")
                             for t in completions]
        return total, per

    monkeypatch.setattr(R, "score_batch", score_batch)


def _trainer(path, state, engine=None, monkeypatch=None):
    if engine is not None:
        monkeypatch.setattr("r1flow.training.grpo.make_engine", lambda *a, **k: engine)
    splits = generate_tasks(5, FAMILIES, {"train": 16, "validation": N_PROMPTS})
    policy, tok = load_policy(str(path))
    cfg = GRPOConfig.from_dict({"prompts_per_step": 4, "num_generations": 2, "max_completion_length": 24,
                                "steps": 1, "eval_every": 1, "eval_prompts": N_PROMPTS, "eval_k": K, "beta": 0.0})
    return GRPOTrainer(policy, None, tok, cfg, splits["train"], splits["validation"], state)


def _one_process_reference(t: GRPOTrainer):
    """Every validation prompt sampled in one process with the prompt seeds the ranks use, graded and
    summarised as validate() does: (samples, metrics)."""
    c = t.cfg
    params = SamplingParams(c.eval_k, c.eval_temperature, c.eval_top_p, c.max_completion_length)
    problems = t.val_df.assign(benchmark="validation", problem_id=t.val_df["prompt_id"])
    prompts = [t._prompt(q) for q in problems["question"]]
    seeded = _SeededGenerator(t.generator, [t._validation_seed(i) for i in range(len(problems))])
    samples = sample_and_grade(seeded, problems, prompts, params, "accuracy", c.reward_options)
    s = summarize(samples)
    return samples, {"val_pass@1": s["pass@1"], "val_format_rate": s["format_rate"], "val_length": s["mean_length"]}


def _run_ranks(path, tmp_path, monkeypatch, world_size: int):
    """validate() on every rank at once; (each rank's metrics, the prompts each rank sampled)."""
    ranks = ThreadRanks(world_size)
    trainers = [_trainer(path, tmp_path / f"r{r}", RankEngine(ranks, r), monkeypatch) for r in range(world_size)]
    sampled = {r: [] for r in range(world_size)}
    for r, t in enumerate(trainers):
        real = t.generator.generate

        def generate(prompts, params, seeds=None, _r=r, _real=real):
            sampled[_r].extend(prompts)
            return _real(prompts, params, seeds=seeds)

        t.generator.generate = generate
    results = ranks.run(lambda r: trainers[r].validate())
    return results, sampled, trainers


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_validation_equals_one_process(tiny_policy, tmp_path, monkeypatch, graded_by_text, world_size):
    path, _ = tiny_policy
    results, sampled, trainers = _run_ranks(path, tmp_path, monkeypatch, world_size)
    ref_samples, want = _one_process_reference(_trainer(path, tmp_path / "one"))
    # the reference is not degenerate: some samples are right and some wrong, of different lengths
    assert 0 < want["val_pass@1"] < 1 and 0 < want["val_format_rate"] < 1
    assert ref_samples["completion_tokens"].nunique() > 1
    for r in range(world_size):
        assert results[r] == want, f"rank {r}"  # the same floats, not merely close

    # each rank sampled its own contiguous share, once: 1/W of the work, not all of it
    per = -(-N_PROMPTS // world_size)
    prompts = [trainers[0]._prompt(q) for q in trainers[0].val_df["question"]]
    for r in range(world_size):
        assert sampled[r] == prompts[r * per:(r + 1) * per], f"rank {r}"
    assert sum(len(v) for v in sampled.values()) == N_PROMPTS


def test_gathered_samples_are_the_one_process_samples_in_order(tiny_policy, tmp_path, monkeypatch, graded_by_text):
    """The table the metrics come from, row by row: gathered across 2 ranks, it is the one-process table
    (problem, sample index, grade, format, length, truncation)."""
    path, _ = tiny_policy
    ranks = ThreadRanks(2)
    trainers = [_trainer(path, tmp_path / f"r{r}", RankEngine(ranks, r), monkeypatch) for r in range(2)]
    c = trainers[0].cfg
    params = SamplingParams(c.eval_k, c.eval_temperature, c.eval_top_p, c.max_completion_length)

    def run(r):
        t = trainers[r]
        problems = t.val_df.assign(benchmark="validation", problem_id=t.val_df["prompt_id"])
        return t._sharded_validation(problems, [t._prompt(q) for q in problems["question"]], params, "format")

    tables = ranks.run(run)
    ref, _ = _one_process_reference(_trainer(path, tmp_path / "one"))
    cols = ["problem_id", "sample", "correct", "format", "completion_tokens", "truncated"]
    for r in range(2):
        pd.testing.assert_frame_equal(tables[r][cols].reset_index(drop=True), ref[cols].reset_index(drop=True),
                                      check_dtype=False)


def test_validation_draws_the_same_samples_however_often_it_runs(tiny_policy, tmp_path, monkeypatch, graded_by_text):
    """On one rank (the default pipeline) validation draws from the generator's own stream and puts it
    back; on several ranks from per-prompt seeds: either way a second validation of the same weights
    gives the same metrics, and training's sampling stream is untouched."""
    path, _ = tiny_policy
    one = _trainer(path, tmp_path / "one")
    state = one.generator.state_dict()["rng"].clone()
    first = one.validate()
    assert one.validate() == first and torch.equal(one.generator.state_dict()["rng"], state)
    twice = [_run_ranks(path, tmp_path / f"w{i}", monkeypatch, 2)[0] for i in range(2)]
    assert twice[0] == twice[1]
