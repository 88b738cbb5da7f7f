"""Resumable SFT (issue 25 item 4 for the SFT stages): a job told to stop (SIGTERM: SLURM's time limit, a
preemption) saves its step and stops; rerun on the same state folder it takes only the batches it had not
taken and ends with the rows and weights of an uninterrupted run, exactly. Checkpoints by updates; a
checkpoint of other settings is not resumed."""

import json
import os
import signal

import pytest
import torch

import r1flow.training.sft as sft
from r1flow.data.prompts import R1_CHAT_TEMPLATE
from r1flow.models import load_policy
from r1flow.training.sft import chat_pairs, train_sft
from r1flow.training.stopping import Stopped

CONVERSATIONS = [
    [{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": f"{a}+{b}={a + b}, so {a + b}."}]
    for a in range(1, 4) for b in range(1, 4)
]  # 9 examples: batches of 2 make 5 updates an epoch, the last one short
KW = dict(epochs=2, learning_rate=3e-3, batch_size=2, warmup_steps=2, seed=3)


def _run(path, dtype="float32", **kw):
    model, tok = load_policy(str(path), dtype)
    tok.chat_template = R1_CHAT_TEMPLATE
    prompts, completions = chat_pairs(tok, CONVERSATIONS)
    rows = train_sft(model, tok, prompts, completions, **{**KW, **kw})
    return rows, {k: v.clone() for k, v in model.state_dict().items()}


def _signal_at(monkeypatch, update):
    """SIGTERM to this process right after the given update's step (as SLURM sends it, mid-run)."""
    calls, step = [0], sft.sft_step

    def step_then_signal(*a, **k):
        out = step(*a, **k)
        calls[0] += 1
        if calls[0] == update:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(sft, "sft_step", step_then_signal)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the float32 master weights are saved too
def test_sigterm_saves_then_stops_and_the_rerun_ends_as_an_uninterrupted_run(tiny_policy, tmp_path, monkeypatch,
                                                                             dtype):
    path = tiny_policy[0]
    want_rows, want = _run(path, dtype)
    assert len(want_rows) == 10
    with monkeypatch.context() as m:
        _signal_at(m, 7)  # in the second epoch
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(Stopped, match="SFT stopped by signal 15 after step 7"):
            _run(path, dtype, state_dir=tmp_path)
        assert signal.getsignal(signal.SIGTERM) is before
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 7
    taken = []
    step = sft.sft_step
    monkeypatch.setattr(sft, "sft_step", lambda *a, **k: (taken.append(1), step(*a, **k))[1])
    rows, got = _run(path, dtype, state_dir=tmp_path)
    assert len(taken) == 3  # only updates 8, 9 and 10 ran again
    assert rows == want_rows
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoints_every_few_updates_and_none_at_the_end(tiny_policy, tmp_path, monkeypatch):
    saved = []
    save = sft._save
    monkeypatch.setattr(sft, "_save", lambda *a: (saved.append(a[7]), save(*a)))
    _run(tiny_policy[0], state_dir=tmp_path, save_every=3)
    assert saved == [3, 6, 9]  # the outputs follow the last update: no checkpoint of it
    assert not list(tmp_path.glob("checkpoint.*"))  # each one renamed into place


def test_a_checkpoint_of_other_settings_is_not_resumed(tiny_policy, tmp_path, monkeypatch, caplog):
    path = tiny_policy[0]
    with monkeypatch.context() as m:
        _signal_at(m, 4)
        with pytest.raises(Stopped):
            _run(path, state_dir=tmp_path)
    want_rows, want = _run(path, learning_rate=1e-3)
    with caplog.at_level("WARNING"):
        rows, got = _run(path, state_dir=tmp_path, learning_rate=1e-3)
    assert "was made with another learning_rate; starting over from step 0" in caplog.text
    assert rows == want_rows and all(torch.equal(got[k], want[k]) for k in want)


def test_without_a_state_folder_sigterm_ends_the_process_as_before(tiny_policy, tmp_path):
    """No handler is installed where nothing can be saved (the default: a local run of the miniature)."""
    seen = []
    before = signal.signal(signal.SIGTERM, lambda *a: seen.append(1))
    try:
        _run(tiny_policy[0], epochs=1)
        assert signal.getsignal(signal.SIGTERM) is not None and not seen
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [1]  # our own handler, untouched by the run
    finally:
        signal.signal(signal.SIGTERM, before)
