"""Resident memory of this process (and its children), read from /proc on Linux, and a way to hand the
C allocator's free memory back to the system.

Used by the GRPO trainer (a per-step `rss_mb` metric, and trimming between steps) and by
benchmarks/bench_grpo_memory.py. Off Linux the readings are NaN and trimming does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys


def _status_kb(pid: int | str, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def rss_mb(pid: int | str = "self") -> float:
    """Current resident set size (VmRSS) in MB (2**20 bytes); NaN where /proc cannot tell."""
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (getrusage's ru_maxrss, KB on Linux) in MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS reports bytes


def reset_peak_rss() -> bool:
    """Set this process's high-water mark (VmHWM, and with it getrusage's ru_maxrss) back to its current
    RSS (Linux: "5" to /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """The peak resident memory of each phase of a step (sampling, training, update), and of the run.

    Reading the high-water mark at the end of a phase and resetting it (`reset_peak_rss`) gives that
    phase's own peak. The reset also lowers ru_maxrss, of this process and, once it exits, the one its
    parent reads (RUSAGE_CHILDREN): so it is opt-in (`enabled`), and the run's peak is kept here.
    Disabled, or where the reset is not allowed, phases read NaN and the run's peak is ru_maxrss."""

    def __init__(self, enabled: bool = True):
        self.run_peak = peak_rss_mb()
        self.can_reset = enabled and reset_peak_rss()

    def end(self) -> float:
        """The peak since the last reset (MB), then a new reset; NaN where resets do not work. Free heap
        memory is handed back before the reset, so that the next phase's peak starts from what is live
        rather than from what the allocator kept of the phase before."""
        if not self.can_reset:
            self.run_peak = max(self.run_peak, peak_rss_mb())
            trim_allocator()  # the same memory behaviour whether the phases are read or not
            return float("nan")
        peak = _status_kb("self", "VmHWM") / 1024
        self.run_peak = max(self.run_peak, peak)
        trim_allocator()
        reset_peak_rss()
        return peak


def child_pids(pid: int | None = None) -> list[int]:
    """Every live descendant of `pid` (this process by default), from /proc's children lists."""
    pid = os.getpid() if pid is None else pid
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def children_rss_mb() -> tuple[float, float]:
    """(current RSS summed over the live descendants, the largest peak RSS (VmHWM) among them), in MB."""
    cur, peak = 0.0, 0.0
    for p in child_pids():
        r, h = rss_mb(p), _status_kb(p, "VmHWM") / 1024
        if r == r:  # not NaN (the child may have gone)
            cur += r
        if h == h:
            peak = max(peak, h)
    return cur, peak


_libc = None


def trim_allocator() -> bool:
    """Return the C heap's free pages to the system (glibc malloc_trim(0)); False where unavailable.

    Freed CPU tensor buffers of varying sizes (every GRPO step has other completion lengths) stay in
    glibc's arenas as free but fragmented memory, which the process keeps resident; trimming after a step
    releases them."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(_libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
