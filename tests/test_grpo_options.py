"""GRPO options of issue 28, each off by default: DAPO's dynamic sampling, offline pass-rate filtering of
the prompts, reference-model refresh, DAPO's soft overlong penalty (the options that change the update
itself: tests/test_grpo_updates.py). Hand-built rewards make the expected
outcome computable by hand; the tiny policy of conftest.py samples (or a stand-in sampler, where only the
grading matters)."""

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAMILIES
from helpers.thread_ranks import ThreadRanks

from r1flow import rewards as R
from r1flow.config import ConfigError, validate_config
from r1flow.data.tasks import generate_tasks
from r1flow.generation import Completions
from r1flow.models import load_policy
from r1flow.rewards.overlong import overlong_penalty
from r1flow.training import grpo as grpo_module
from r1flow.training.engine import LocalEngine
from r1flow.training.grpo import GRPOConfig, GRPOTrainer, NoLearningSignal

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
GRPO_SECTIONS = [("r1_zero", "grpo"), ("r1", "reasoning_rl"), ("r1", "rl_all", "grpo"), ("distillation", "rl_only")]


def marked(completions, golds, **_):
    """A group of a prompt whose answer is "spread" gets 0, 1, 0, 1, ... (a spread, whatever was sampled:
    a group's G outputs are consecutive); any other prompt's group gets 0 for every output (no spread)."""
    return [R.Reward(float(i % 2) if g == "spread" else 0.0, "marked") for i, g in enumerate(golds)]


@pytest.fixture
def marked_reward(monkeypatch):
    monkeypatch.setitem(R.REGISTRY, "t_marked", marked)
    return "t_marked"


def _tasks(n: int, spread) -> pd.DataFrame:
    train = generate_tasks(5, FAMILIES, {"train": n, "validation": 1})["train"].reset_index(drop=True)
    return train.assign(answer=["spread" if spread(i) else "flat" for i in range(n)])


def _trainer(path, state, train, **over):
    policy, tok = load_policy(str(path))
    settings = {"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 8, "steps": 2,
                "eval_every": 0, "save_every": 100, "learning_rate": 1e-3, "warmup_steps": 0, "beta": 0.0,
                "rewards": {"t_marked": 1.0}, **over}
    ref = load_policy(str(path))[0] if settings["beta"] > 0 else None
    return GRPOTrainer(policy, ref, tok, GRPOConfig.from_dict(settings), train, None, state)


def _record_generate(t, monkeypatch):
    """The rendered prompts of every training sampling call."""
    calls, generate = [], t.generator.generate

    def spy(prompts, params, seeds=None):
        calls.append(list(prompts))
        return generate(prompts, params, seeds=seeds)

    monkeypatch.setattr(t.generator, "generate", spy)
    return calls


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# -- dynamic sampling ------------------------------------------------------------------------------------
def test_dynamic_sampling_fills_the_batch_with_groups_that_have_a_spread(tiny_policy, tmp_path, monkeypatch,
                                                                          marked_reward):
    path, _ = tiny_policy
    train = _tasks(12, lambda i: i % 3 == 0)  # 4 of 12 prompts give a spread
    t = _trainer(path, tmp_path / "s", train, dynamic_sampling=True, dynamic_sampling_max_batches=12)
    calls = _record_generate(t, monkeypatch)
    kept, fill = [], t._fill_with_signal

    def spy(*a):
        out = fill(*a)
        kept.append(out[0]["question"].tolist())
        return out

    monkeypatch.setattr(t, "_fill_with_signal", spy)
    m = t.train(progress=False)

    # by hand: walk the batches of 2 prompts in the trainer's order, keep the "spread" ones until 2 are found
    B, G, batch_no, want_kept, want_batches = 2, 2, 0, [], []
    for _ in range(2):
        found, n = [], 0
        while len(found) < B:
            batch_no, n = batch_no + 1, n + 1
            b = t._batch(batch_no)
            found += [q for q, a in zip(b["question"], b["answer"]) if a == "spread"]
        want_kept.append(found[:B])
        want_batches.append(n)
    assert max(want_batches) > 1, "the test must make a step refill its batch"
    assert kept == want_kept
    assert m["prompt_batches_drawn"].tolist() == want_batches
    assert m["samples_drawn"].tolist() == [n * B * G for n in want_batches]
    # every batch was sampled once, in order, the second step going on from where the first stopped
    assert calls == [[t._prompt(q) for q in t._batch(v)["question"]] for v in range(1, batch_no + 1)]
    assert t.batches_drawn == batch_no
    # the trained groups: each a 0/1 spread
    assert (m["groups_with_signal"] == 1.0).all() and (m["reward_mean"] == 0.5).all()


def test_dynamic_sampling_that_cannot_fill_stops_naming_the_setting(tiny_policy, tmp_path, monkeypatch,
                                                                     marked_reward):
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "n", _tasks(12, lambda i: False), dynamic_sampling=True,
                 dynamic_sampling_max_batches=3)
    calls = _record_generate(t, monkeypatch)
    with pytest.raises(NoLearningSignal, match="dynamic_sampling_max_batches = 3"):
        t.train(progress=False)
    assert len(calls) == 3  # the limit counts the first batch


def test_dynamic_sampling_with_signal_everywhere_trains_as_without_it(tiny_policy, tmp_path, marked_reward):
    """A first batch whose groups all have a spread is the batch: the same completions, the same update."""
    path, _ = tiny_policy
    train = _tasks(8, lambda i: True)
    off = _trainer(path, tmp_path / "off", train)
    on = _trainer(path, tmp_path / "on", train, dynamic_sampling=True)
    m_off, m_on = off.train(progress=False), on.train(progress=False)
    assert "samples_drawn" not in m_off and m_on["samples_drawn"].tolist() == [4.0, 4.0]
    cols = ["reward_mean", "reward_std", "completion_length", "loss", "entropy", "groups_with_signal"]
    pd.testing.assert_frame_equal(m_on[cols], m_off[cols])
    assert _same(_params(on.model), _params(off.model))


def test_dynamic_sampling_resumes_where_it_stopped(tiny_policy, tmp_path, marked_reward):
    path, _ = tiny_policy
    train = _tasks(12, lambda i: i % 3 == 0)
    kw = dict(dynamic_sampling=True, dynamic_sampling_max_batches=12, steps=3, save_every=1)
    full = _trainer(path, tmp_path / "a", train, **kw).train(progress=False)
    _trainer(path, tmp_path / "b", train, **kw).train(progress=False, stop_after=2)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state.get("batches_drawn", 2) == full["prompt_batches_drawn"].iloc[:2].sum()
    resumed = _trainer(path, tmp_path / "b", train, **kw).train(progress=False)
    cols = ["reward_mean", "loss", "completion_length", "samples_drawn"]
    pd.testing.assert_frame_equal(resumed[cols], full[cols])


class RankEngine(LocalEngine):
    """One thread rank: gathers across the threads; everything else (sums, the update) stays local, which
    is enough to compare what each rank samples and keeps in a step."""

    def __init__(self, ranks: ThreadRanks, rank: int, model, optimizer, max_grad_norm, master=None):
        super().__init__(model, optimizer, max_grad_norm, master)
        self.ranks, self.rank, self.world_size = ranks, rank, ranks.world_size
        self.loss_scale = float(ranks.world_size)

    def all_gather(self, rows):
        return self.ranks.all_gather(self.rank, rows)


def _spy_fill(t, monkeypatch):
    """What _fill_with_signal returns for the step's batch: (questions, completion texts, totals)."""
    kept, fill = [], t._fill_with_signal

    def spy(*a):
        out = fill(*a)
        kept.append((out[0]["question"].tolist(), out[1].texts, out[2], out[4]))
        return out

    monkeypatch.setattr(t, "_fill_with_signal", spy)
    return kept


def test_dynamic_sampling_on_two_ranks_keeps_the_groups_of_one_process(tiny_policy, tmp_path, monkeypatch,
                                                                       marked_reward):
    path, _ = tiny_policy
    train = _tasks(16, lambda i: i % 2 == 0)
    kw = dict(prompts_per_step=4, dynamic_sampling=True, dynamic_sampling_max_batches=8, steps=1)
    one = _trainer(path, tmp_path / "one", train, **kw)
    want = _spy_fill(one, monkeypatch)
    one.step()
    ranks = ThreadRanks(2)
    trainers, kept, calls = [], [], []
    for r in range(2):
        monkeypatch.setattr(grpo_module, "make_engine", lambda model, opt, norm, ds, master=None, _r=r:
                            RankEngine(ranks, _r, model, opt, norm, master))
        trainers.append(_trainer(path, tmp_path / f"r{r}", train, **kw))
        kept.append(_spy_fill(trainers[-1], monkeypatch))
        calls.append(_record_generate(trainers[-1], monkeypatch))
    ranks.run(lambda r: trainers[r].step())
    (q1, x1, r1, d1), = want
    (q_a, x_a, r_a, d_a), = kept[0]
    (q_b, x_b, r_b, d_b), = kept[1]
    assert d_a == d_b == d1 and d1[1] > 1, "the step must draw more than one batch"
    assert q_a + q_b == q1 and x_a + x_b == x1 and r_a + r_b == r1  # rank 0's half, then rank 1's
    # each rank sampled its half of every batch drawn, and some rank sampled again a group the other drew
    assert [len(c) for c in calls[0][: d1[1]]] == [2] * d1[1]
    assert len(calls[0]) + len(calls[1]) > 2 * d1[1]


# -- pass-rate filtering -----------------------------------------------------------------------------------
class IndexedSampler:
    """A stand-in sampler: the j-th output of every prompt is the text "s<j>" (one token, not truncated)."""

    def __init__(self):
        self.seeds = []

    def generate(self, prompts, params, seeds=None):
        self.seeds.append(seeds)
        n = len(prompts) * params.n
        ones = torch.ones(n, 1, dtype=torch.long)
        return Completions(ones, ones, ones, ones, torch.zeros(n, dtype=torch.bool),
                           [f"s{j}" for _ in prompts for j in range(params.n)])

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.fixture
def graded_by_index(monkeypatch):
    """Output j of a prompt whose answer is "c" is correct when j < c: with k samples its pass rate is c / k."""
    sampler = IndexedSampler()
    monkeypatch.setattr(grpo_module, "make_generator", lambda *a, **k: sampler)
    monkeypatch.setitem(R.REGISTRY, "accuracy", lambda completions, golds, **_: [
        R.Reward(float(int(c[1:]) < int(g)), "t") for c, g in zip(completions, golds)])
    return sampler


def _pass_rate_trainer(path, tmp_path, band, **over):
    train = generate_tasks(5, FAMILIES, {"train": 5, "validation": 1})["train"].reset_index(drop=True)
    train = train.assign(answer=[str(c) for c in range(5)])  # pass rates 0, 1/4, 2/4, 3/4, 1 with k = 4
    train = over.pop("_train", train)
    policy, tok = over.pop("_policy", None) or load_policy(str(path))
    cfg = GRPOConfig.from_dict({"eval_every": 0, "pass_rate_band": band, "pass_rate_samples": 4, "beta": 0.0,
                                **over})
    return GRPOTrainer(policy, None, tok, cfg, train, None, tmp_path / "p"), train


def test_pass_rate_filter_keeps_exactly_the_prompts_in_the_band(tiny_policy, tmp_path, graded_by_index):
    path, _ = tiny_policy
    t, train = _pass_rate_trainer(path, tmp_path, [0.25, 0.75])
    np.testing.assert_array_equal(t.prompt_pass_rates, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert t.train_df["question"].tolist() == train["question"].iloc[1:4].tolist()  # both bounds included
    assert len(graded_by_index.seeds[0]) == 5  # each prompt sampled from its own seed
    t, _ = _pass_rate_trainer(path, tmp_path, [0.0, 0.0])
    assert t.train_df["question"].tolist() == train["question"].iloc[:1].tolist()


def test_pass_rates_on_two_ranks_are_those_of_one_process(tiny_policy, tmp_path, monkeypatch, graded_by_index):
    """Each rank samples its share of the prompts (3 and 2 of 5) and the gathered rates are the whole set's."""
    path, _ = tiny_policy
    ranks = ThreadRanks(2)
    monkeypatch.setattr(grpo_module, "make_engine", lambda model, opt, norm, ds, master=None: RankEngine(
        ranks, int(threading.current_thread().name), model, opt, norm, master))
    # loaded here, not in the threads: transformers' loading context (weights first made on the meta
    # device) is process-wide, so two threads loading at once can get each other's meta tensors
    policies = [load_policy(str(path)) for _ in range(2)]
    trainers = ranks.run(lambda r: _pass_rate_trainer(path, tmp_path / str(r), [0.25, 0.75], _policy=policies[r]))
    for t, train in trainers:
        np.testing.assert_array_equal(t.prompt_pass_rates, [0.0, 0.25, 0.5, 0.75, 1.0])
        assert t.train_df["question"].tolist() == train["question"].iloc[1:4].tolist()
    assert sorted(len(s) for s in graded_by_index.seeds) == [2, 3]


def test_pass_rate_filter_keeps_general_prompts(tiny_policy, tmp_path, graded_by_index):
    path, _ = tiny_policy
    train = generate_tasks(5, FAMILIES, {"train": 3, "validation": 1})["train"].reset_index(drop=True)
    train = train.assign(answer=["0", "4", "2"], kind=["reasoning", "general", "reasoning"])
    t, _ = _pass_rate_trainer(path, tmp_path, [0.5, 1.0], _train=train,
                              rewards={"reasoning": {"accuracy": 1.0}, "general": {"format": 1.0}})
    assert np.isnan(t.prompt_pass_rates[1])
    assert t.train_df["question"].tolist() == train["question"].iloc[1:].tolist()


def test_a_band_that_keeps_no_prompt_is_an_error_naming_it(tiny_policy, tmp_path, graded_by_index):
    path, _ = tiny_policy
    with pytest.raises(ValueError, match=r"pass_rate_band = \[0.3, 0.45\] keeps none of the 5 training prompts"):
        _pass_rate_trainer(path, tmp_path, [0.3, 0.45])


def test_pass_rate_band_must_be_an_ordered_pair():
    for band in ([0.8, 0.2], [0.5], [-0.1, 0.5], [0.5, 1.5]):
        with pytest.raises(ValueError, match="pass_rate_band"):
            GRPOConfig(pass_rate_band=band)


# -- reference refresh ------------------------------------------------------------------------------------
def test_reference_equals_the_policy_right_after_a_refresh(tiny_policy, tmp_path, marked_reward):
    path, _ = tiny_policy
    base = _params(load_policy(str(path))[0])
    t = _trainer(path, tmp_path / "r", _tasks(8, lambda i: True), beta=0.1, learning_rate=1e-2,
                 ref_model_sync_steps=2, steps=4)
    rows = []
    for step in (1, 2, 3):
        rows.append(t.step())
        ref, pol = _params(t.ref_model), _params(t.model)
        if step == 2:
            assert _same(ref, pol) and t.ref_synced_at == 2
        else:
            assert not _same(ref, pol)
            assert _same(ref, base) == (step == 1)
    # KL to the reference: 0 at step 1 (policy = base) and step 3 (policy = refreshed reference), not at 2
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-7) and rows[2]["kl"] == pytest.approx(0, abs=1e-7)
    assert rows[1]["kl"] > 1e-6


def test_no_refresh_by_default(tiny_policy, tmp_path, marked_reward):
    path, _ = tiny_policy
    base = _params(load_policy(str(path))[0])
    t = _trainer(path, tmp_path / "d", _tasks(8, lambda i: True), beta=0.1, learning_rate=1e-2, steps=3)
    t.train(progress=False)
    assert _same(_params(t.ref_model), base) and not _same(_params(t.model), base)


def test_a_refreshed_reference_survives_resumption(tiny_policy, tmp_path, marked_reward):
    path, _ = tiny_policy
    train = _tasks(8, lambda i: True)
    kw = dict(beta=0.1, learning_rate=1e-2, ref_model_sync_steps=2, steps=4, save_every=3)
    full = _trainer(path, tmp_path / "a", train, **kw).train(progress=False)
    killed = _trainer(path, tmp_path / "b", train, **kw)
    killed.train(progress=False, stop_after=3)  # checkpoint at step 3, its reference from step 2
    ref_at_3 = _params(killed.ref_model)
    ck = tmp_path / "b" / "checkpoint"
    assert (ck / "reference").exists() and json.loads((ck / "state.json").read_text())["ref_synced_at"] == 2
    resumed = _trainer(path, tmp_path / "b", train, **kw)
    assert resumed._try_resume()
    assert _same(_params(resumed.ref_model), ref_at_3) and not _same(ref_at_3, _params(resumed.model))
    m = resumed.train(progress=False)
    assert m["kl"].iloc[3] == pytest.approx(full["kl"].iloc[3], rel=1e-6) and full["kl"].iloc[3] > 1e-6


# -- overlong penalty --------------------------------------------------------------------------------------
def test_overlong_penalty_at_the_edges_of_its_band():
    # L_max = 20, L_cache = 5: 0 up to 15 tokens, then -(n - 15) / 5, -1 at 20 and beyond (DAPO eq. 13)
    for n, want in [(0, 0.0), (15, 0.0), (16, -0.2), (18, -0.6), (19, -0.8), (20, -1.0), (21, -1.0), (99, -1.0)]:
        assert overlong_penalty(n, 20, 5) == pytest.approx(want), n
    assert overlong_penalty(0, 20, 20) == 0.0 and overlong_penalty(1, 20, 20) == pytest.approx(-0.05)
    assert overlong_penalty(20, 20, 0) == 0.0


def test_overlong_is_a_reward_of_the_registry_given_lengths():
    opts = {"overlong": {"max_length": 20, "buffer_length": 5}}
    total, per = R.score_batch(["a", "b", "c"], ["x"] * 3, {"overlong": 0.5}, opts, lengths=[15, 16, 21])
    assert total == pytest.approx([0.0, -0.1, -0.5])
    assert [r.reason for r in per["overlong"]] == ["within_budget", "overlong", "overlong"]
    with pytest.raises(ValueError, match="pass lengths= to score_batch"):
        R.score_batch(["a"], ["x"], {"overlong": 1.0}, opts)


def test_overlong_penalty_joins_the_training_reward(tiny_policy, tmp_path, monkeypatch, marked_reward):
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "o", _tasks(8, lambda i: False), steps=1, max_completion_length=8,
                 overlong_buffer_length=4, overlong_penalty_factor=2.0)
    seen, score = [], t._score

    def spy(batch, texts, G, lengths=None):
        total, per = score(batch, texts, G, lengths)
        seen.append((lengths, total, per))
        return total, per

    monkeypatch.setattr(t, "_score", spy)
    row = t.step()
    lengths, total, per = seen[0]
    want = [overlong_penalty(n, 8, 4) for n in lengths]
    assert [r.score for r in per["overlong"]] == pytest.approx(want)
    assert total == pytest.approx([2.0 * w for w in want])  # the marked reward is 0 for every output here
    assert row["reward/overlong_mean"] == pytest.approx(np.mean(want)) and row["reward_mean"] == pytest.approx(
        2 * np.mean(want))
    assert min(want) < 0, "the tiny policy must write some outputs into the buffer for this test to bite"


def test_overlong_settings_are_checked(tiny_policy, tmp_path, marked_reward):
    path, _ = tiny_policy
    with pytest.raises(ValueError, match="overlong_buffer_length must lie in"):
        GRPOConfig(max_completion_length=8, overlong_buffer_length=9)
    with pytest.raises(ValueError, match="not named in `rewards`"):
        _trainer(path, tmp_path / "x", _tasks(4, lambda i: True), rewards={"t_marked": 1.0, "overlong": 1.0})


# -- defaults and the config schema ------------------------------------------------------------------------
def test_defaults_add_nothing_and_old_checkpoints_resume(tiny_policy, tmp_path, marked_reward):
    path, _ = tiny_policy
    train = _tasks(8, lambda i: True)
    t = _trainer(path, tmp_path / "c", train, save_every=1)
    m = t.train(progress=False, stop_after=1)
    assert not {"samples_drawn", "prompt_batches_drawn", "reward/overlong_mean"} & set(m)
    state_file = tmp_path / "c" / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert not {"batches_drawn", "ref_synced_at"} & set(state)
    assert not (tmp_path / "c" / "checkpoint" / "reference").exists()
    # a checkpoint written before these settings existed resumes while they are at their defaults
    for k in GRPOConfig.ADDED_SETTINGS:
        del state["settings"][k]
    state_file.write_text(json.dumps(state))
    assert _trainer(path, tmp_path / "c", train, save_every=1)._try_resume()
    assert not _trainer(path, tmp_path / "c", train, save_every=1, ref_model_sync_steps=5)._try_resume()


@pytest.mark.parametrize("section", GRPO_SECTIONS, ids=".".join)
def test_every_grpo_section_takes_the_settings(section):
    def nest(value):
        d = value
        for key in reversed(section):
            d = {key: d}
        return d

    settings = {"dynamic_sampling": True, "dynamic_sampling_max_batches": 2, "pass_rate_band": [0.1, 0.9],
                "pass_rate_samples": 4, "ref_model_sync_steps": 400, "overlong_buffer_length": 16,
                "overlong_penalty_factor": 0.5, "updates_per_rollout": 4, "entropy_coeff": 0.01,
                "top_entropy_quantile": 0.2}
    config = validate_config(nest(dict(settings)), SCHEMA)
    got = config
    for key in section:
        got = got[key]
    assert {k: got[k] for k in settings} == settings
    defaults = validate_config({}, SCHEMA)
    for key in section:
        defaults = defaults[key]
    assert GRPOConfig.from_dict({k: defaults[k] for k in settings}) == GRPOConfig()
    for bad in ({"pass_rate_band": [0.5]}, {"dynamic_sampling_max_batches": 0}, {"overlong_buffer_length": -1},
                {"ref_model_sync_steps": -1}, {"overlong_penalty_factor": -1}, {"updates_per_rollout": 0},
                {"top_entropy_quantile": 0}, {"top_entropy_quantile": 1.5}):
        with pytest.raises(ConfigError, match=".".join(section) + "." + next(iter(bad))):
            validate_config(nest(bad), SCHEMA)

