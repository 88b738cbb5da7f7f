"""A GRPO job told to stop (SIGTERM: SLURM's time limit, a preemption) saves a checkpoint at the end of its
step and raises Stopped; resumed, it ends where an uninterrupted run ends. Checkpoints by wall time
(save_every_minutes). The time-limit check of the plan (r1flow.config.check_time_limit)."""

import json
import os
import signal

import pandas as pd
import pytest
from test_base_and_trainer import _trainer

from r1flow.config import ConfigError, check_time_limit
from r1flow.training.grpo import GRPOConfig
from r1flow.training.stopping import Stopped, StopRequest

COLS = ["reward_mean", "accuracy", "completion_length", "loss", "kl"]


def _state_step(folder):
    return json.loads((folder / "checkpoint" / "state.json").read_text())["step"]


def test_sigterm_saves_the_step_then_stops_and_the_rerun_ends_as_an_uninterrupted_run(tiny_policy, tmp_path):
    path, _ = tiny_policy
    full = _trainer(path, tmp_path / "a", save_every=100).train(progress=False)
    t = _trainer(path, tmp_path / "b", save_every=100)  # no checkpoint by steps before the end (6)
    step = t.step

    def step_then_signal():
        row = step()
        if t.step_no == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM does at the time limit, mid-run
        return row

    t.step = step_then_signal
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match="stopped by signal 15 after step 3"):
        t.train(progress=False)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the trainer's only while it trains
    assert _state_step(tmp_path / "b") == 3
    resumed = _trainer(path, tmp_path / "b", save_every=100).train(progress=False)
    assert resumed["step"].tolist() == [1, 2, 3, 4, 5, 6]
    pd.testing.assert_frame_equal(resumed[COLS], full[COLS])


def test_checkpoints_by_wall_time(tiny_policy, tmp_path, monkeypatch):
    """save_every_minutes: a checkpoint once that much time has passed (the clock is faked: 30 s a call)."""
    import r1flow.training.stopping as stopping

    clock = iter(range(0, 10**6, 30))
    monkeypatch.setattr(stopping.time, "monotonic", lambda: float(next(clock)))
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "m", save_every=100, save_every_minutes=1.0, eval_every=0)
    saved = []
    save = t._save_checkpoint
    t._save_checkpoint = lambda: (saved.append(t.step_no), save())
    t.train(progress=False, stop_after=5)
    # the clock is read when training starts and once per step: 30, 60 (due), 90, 120 (due), ...
    assert saved == [2, 4]
    assert _state_step(tmp_path / "m") == 4
    with pytest.raises(ValueError, match="save_every_minutes"):
        GRPOConfig.from_dict({"save_every_minutes": 0})


def test_stop_request_records_the_signal_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert stop.installed and stop.signum is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # recorded, the process goes on
    assert signal.getsignal(signal.SIGTERM) is before and not stop.installed


def test_time_limit_check():
    check_time_limit("r1_zero", "r1_zero.grpo", {"save_every_minutes": 30}, {"runtime": 31})
    check_time_limit("r1_zero", "r1_zero.grpo", {"save_every_minutes": None}, {"runtime": 1})
    check_time_limit("r1_zero", "r1_zero.grpo", {"save_every_minutes": 30}, {})  # no limit: nothing to check
    with pytest.raises(ConfigError, match=r"config key 'r1\.reasoning_rl\.save_every_minutes': 60 minute\(s\) is "
                                          r"not shorter than the job's time limit \(resources\.reasoning_rl\.runtime: "
                                          r"60 minutes\)"):
        check_time_limit("reasoning_rl", "r1.reasoning_rl", {"save_every_minutes": 60}, {"runtime": 60})
