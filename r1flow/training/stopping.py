"""Stopping a training job cleanly when it is told to: SLURM sends SIGTERM to every process of a job at its
time limit and on preemption, then SIGKILL KillWait seconds later (30 s by default). A trainer inside
`StopRequest` finishes its step, saves a checkpoint and raises `Stopped`; the job fails, Snakemake resubmits
it (profiles/slurm: retries) and it resumes from that checkpoint. A step longer than KillWait is killed
before it ends: then the last periodic checkpoint (save_every, save_every_minutes) is the one resumed.
"""

from __future__ import annotations

import signal
import threading


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
