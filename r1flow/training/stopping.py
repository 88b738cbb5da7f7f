"""Stopping a training job cleanly when it is told to: SLURM sends SIGTERM to every process of a job at its
time limit and on preemption, then SIGKILL KillWait seconds later (30 s by default). A trainer inside
`StopRequest` finishes its step, saves a checkpoint and raises `Stopped`; the job fails, Snakemake resubmits
it (profiles/slurm: retries) and it resumes from that checkpoint. A step longer than KillWait is killed
before it ends: then the last periodic checkpoint (save_every, save_every_minutes) is the one resumed, or
the job asks for its signal ahead of the limit (sbatch --signal=TERM@900, as config/cluster does).
GRPO (r1flow.training.grpo) and SFT (r1flow.training.sft) both save on `CheckpointSchedule`.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from typing import Callable

import torch


class Stopped(RuntimeError):
    """The job was told to stop (a signal) and saved a checkpoint first; a rerun resumes from it."""


class StopRequest:
    """Within the block, SIGTERM is recorded in `signum` instead of ending the process. Signal handlers
    can only be set in the main thread: elsewhere (thread ranks in tests) nothing is installed."""

    SIGNALS = (signal.SIGTERM,)

    def __init__(self):
        self.signum: int | None = None
        self.installed = False
        self._old: dict = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old, self.installed = {}, False


class CheckpointSchedule:
    """When a training loop saves: every `every` steps (None: not by steps), at step `last` (None: not at
    the end), once `minutes` of wall time have passed since the previous save (None: not by time), and when
    `stop` recorded a signal. Every rank must take the same decision (the save is collective): the clock is
    rank 0's and each rank's flags are summed over the ranks (`all_sum`, the engine's)."""

    def __init__(self, every: int | None, minutes: float | None, last: int | None,
                 all_sum: Callable[[list[float]], list[float]], is_main: bool = True):
        self.every, self.minutes, self.last, self.all_sum, self.is_main = every, minutes, last, all_sum, is_main
        self.saved_at = time.monotonic()

    def due(self, step: int, stop: StopRequest) -> bool:
        flags = [float(bool(self.every) and step % self.every == 0 or step == self.last),
                 float(self.minutes is not None and time.monotonic() - self.saved_at >= 60 * self.minutes
                       and self.is_main),
                 float(stop.signum is not None)]
        flags = self.all_sum(flags)
        if flags[2] and stop.signum is None:  # another rank got the signal: this one stops with it
            stop.signum = -1
        if any(flags):
            self.saved_at = time.monotonic()
        return any(flags)


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """A cheap identity of a model's weights: every tensor's name, shape, first and last values and sum."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1).float().cpu()
        h.update(f"{name}{tuple(p.shape)}{float(flat.double().sum()):.10e}".encode())
        h.update(flat[:64].numpy().tobytes() + flat[-64:].numpy().tobytes())
    return h.hexdigest()[:16]
