"""Worker processes with a hard wall-clock limit per check.

Math-Verify's own timeout uses signal.alarm, which works only in a main thread and cannot interrupt a
long computation inside C code (a power tower such as 5^(5^(5^5)) hangs in big-integer arithmetic).
So the parent keeps the clock: each check runs in a worker process, and a worker that overruns its
deadline is killed (SIGKILL) and replaced. Its check scores `timeout`; every other check of the batch
is scored normally.

Work is sent in jobs of (key, [items]) so that a worker parses the shared part of a job (the gold
answer of one prompt) once and then checks each item against it (one parse per prompt, not per sample).
The worker reports after the key and after each item, so the deadline applies to each of them.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

# (key, item) -> (verdict, reason). `prepare(key)` returns the parsed key shared by a job's items.
Prepare = Callable[[str], object]
STARTUP_S = 120.0  # a worker imports sympy and Math-Verify before it reports ready
Check = Callable[[object, str], tuple]


def serve(conn_in, conn_out, prepare: Prepare, check: Check):
    try:  # warm up (imports, caches) before reporting ready, so startup never eats a check's time limit
        prepare("0")
    except Exception:  # noqa: BLE001,S110 - a failing warm-up shows up in the first real check instead
        pass
    conn_out.send("ready")
    while True:
        try:
            msg = conn_in.recv()
        except EOFError:
            return
        if msg is None:
            return
        job_id, key, items = msg
        try:
            parsed = prepare(key)
            conn_out.send((job_id, -1, None, "ok"))
        except Exception as e:  # noqa: BLE001 - a gold that cannot be parsed fails its whole job, nothing else
            conn_out.send((job_id, -1, None, f"error:{type(e).__name__}"))
            continue
        for i, item in enumerate(items):
            try:
                verdict, reason = check(parsed, item)
            except Exception as e:  # noqa: BLE001 - any failure of a check is that check's verdict
                verdict, reason = None, f"error:{type(e).__name__}"
            conn_out.send((job_id, i, verdict, reason))


class _Dead:
    def poll(self):
        return -9


_DEAD = _Dead()  # marks a killed worker until _ensure_workers replaces it


@dataclass
class _Running:
    job_id: int
    key: str
    items: list
    indices: list  # positions in the caller's result list
    done: int  # items answered so far (the key counts as answered once `key_ok` is set)
    key_ok: bool
    deadline: float


class WorkerPool:
    """`run(jobs)` checks every (key, item) pair and returns (verdict, reason) for each, in order.

    verdict is None with reason "timeout" (the worker was killed) or "error:..." (the check raised).
    """

    def __init__(self, prepare: str, check: str, workers: int = 2, timeout_s: float = 5.0):
        """prepare, check: "module:function" references, imported by each worker."""
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.prepare, self.check = prepare, check
        self.n, self.timeout_s = workers, float(timeout_s)
        self.procs: list = [None] * workers
        self.conns: list = [None] * workers
        self.restarts = 0
        atexit.register(self.close)

    def _start(self, w: int):
        # A fresh interpreter, not fork or multiprocessing: nothing inherited from a parent that holds
        # torch threads and locks, and no re-import of the caller's __main__.
        p = subprocess.Popen([sys.executable, "-m", "r1flow.rewards._worker_main", self.prepare, self.check],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self.procs[w] = p
        self.conns[w] = (Connection(os.dup(p.stdin.fileno())), Connection(os.dup(p.stdout.fileno())))
        p.stdin.close()
        p.stdout.close()

    def _await_ready(self, w: int):
        conn = self.conns[w][1]
        if not conn.poll(STARTUP_S) or conn.recv() != "ready":
            self._kill(w)
            raise RuntimeError(f"verifier worker ({self.prepare}) did not start within {STARTUP_S} s")

    def warm(self):
        """Start any missing worker now (otherwise the next run() does)."""
        self._ensure_workers()

    def _ensure_workers(self, busy=()):
        # a busy worker that died is not replaced here: its job's record first reads the EOF and fails
        dead = [w for w in range(self.n)
                if w not in busy and (self.procs[w] is None or self.procs[w].poll() is not None)]
        for w in dead:
            if self.procs[w] is not None:
                self._kill(w)
                self.restarts += 1
            self._start(w)
        for w in dead:  # started together, awaited together
            self._await_ready(w)

    def _kill(self, w: int):
        p, c = self.procs[w], self.conns[w]
        if p is not None and p is not _DEAD:
            p.kill()
            p.wait(timeout=5)
        if c is not None:
            for conn in c:
                conn.close()
        self.procs[w] = self.conns[w] = None

    def run(self, jobs: list[tuple[str, list]]) -> list[tuple]:
        results: list = []
        pending: deque = deque()
        for key, items in jobs:
            idx = list(range(len(results), len(results) + len(items)))
            results.extend([None] * len(items))
            if items:
                pending.append((key, list(items), idx))
        running: dict[int, _Running] = {}
        next_id = 0
        while pending or running:
            if pending:
                self._ensure_workers(running)  # replaces killed workers
            for w in range(self.n):  # hand jobs to idle workers
                if w in running or not pending:
                    continue
                key, items, idx = pending.popleft()
                next_id += 1
                self.conns[w][0].send((next_id, key, items))
                running[w] = _Running(next_id, key, items, idx, 0, False, time.monotonic() + self.timeout_s)
            by_conn = {self.conns[w][1]: w for w in running}
            now = time.monotonic()
            soonest = min(r.deadline for r in running.values())
            ready = wait(list(by_conn), timeout=max(0.0, soonest - now))
            for conn in ready:
                w = by_conn[conn]
                r = running[w]
                try:
                    _, i, verdict, reason = conn.recv()
                except (EOFError, OSError):  # the worker died (for instance, killed by the OOM killer)
                    self._fail_current(w, r, running, pending, "error:worker_died", results)
                    continue
                if i < 0:
                    if reason != "ok":  # the key itself could not be parsed: every item gets its reason
                        for j in r.indices:
                            results[j] = (None, "gold_" + reason)
                        del running[w]
                        continue
                    r.key_ok = True
                else:
                    results[r.indices[i]] = (verdict, reason)
                    r.done = i + 1
                    if r.done == len(r.items):
                        del running[w]
                        continue
                r.deadline = time.monotonic() + self.timeout_s
            now = time.monotonic()
            for w, r in list(running.items()):
                # a reply (or the worker's exit) already waiting is read first, not counted as a timeout
                if now >= r.deadline and not self.conns[w][1].poll(0):
                    self._fail_current(w, r, running, pending, "timeout", results)
        return results

    def _fail_current(self, w, r: _Running, running, pending, reason, results):
        """Kill worker w; the item it was on scores `reason`, the rest of its job goes back in the queue."""
        self._kill(w)  # _ensure_workers starts its replacement (and counts the restart)
        self.procs[w] = _DEAD
        del running[w]
        if not r.key_ok:  # stuck on the gold itself: the whole job fails
            for j in r.indices:
                results[j] = (None, "gold_" + reason)
            return
        results[r.indices[r.done]] = (None, reason)
        rest = r.done + 1
        if rest < len(r.items):
            pending.appendleft((r.key, r.items[rest:], r.indices[rest:]))

    def close(self):
        for w in range(self.n):
            c = self.conns[w]
            if c is not None:
                try:
                    c[0].send(None)
                except (OSError, BrokenPipeError):
                    pass
            self._kill(w)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.poll() is None]


def cpu_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
