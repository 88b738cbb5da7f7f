"""Run untrusted programs (the model's code) against test cases, for the code reward (section 2.2.2:
"for LeetCode problems, a compiler can be used to generate feedback based on predefined test cases").

Each run gets its own temporary folder, namespaces (no network, private /tmp and /proc, a PID namespace
whose init takes every leftover process down with it), its own uid when we are root, CPU-time, memory,
output-size, process and open-file limits, a scrubbed environment, and a wall-clock limit enforced
here. See _sandbox_launch.py for the steps. Where namespaces cannot be created (not root and no
unprivileged user namespaces) runs are refused unless `allow_unisolated` is set; the README says what
is then left unprotected.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAUNCHER = str(Path(__file__).with_name("_sandbox_launch.py"))
SANDBOX_UID_BASE = 61000  # slot i runs as uid 61000 + i: slots cannot see or signal each other


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512
    max_output_bytes: int = 1 << 20
    max_processes: int = 16


@dataclass(frozen=True)
class Language:
    """How to run one source file; `compile` (optional) runs first, in the same sandbox."""

    name: str
    filename: str
    run: tuple
    compile: tuple | None = None


def _reachable_by_others(path: str) -> bool:
    """Whether a user other than us can execute `path` (every folder above it searchable)."""
    p = Path(os.path.realpath(path))
    if not p.exists() or not os.stat(p).st_mode & 0o001:
        return False
    return all(os.stat(d).st_mode & 0o001 for d in p.parents)


def sandbox_python() -> str:
    """An interpreter the sandbox uid may run: ours if others can reach it, else the system's."""
    if os.geteuid() != 0:
        return sys.executable
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if _reachable_by_others(cand):
            return os.path.realpath(cand)
    raise RuntimeError("no Python interpreter that the sandbox user can execute; install /usr/bin/python3")


# Python runs isolated: -I ignores PYTHON* variables and the user site folder.
LANGUAGES = {"python": Language("python", "main.py", ("{python}", "-I", "main.py"))}


@dataclass
class RunResult:
    status: str  # ok | runtime_error | timeout | cpu_limit | memory | output_limit | sandbox_error
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    extra: dict = field(default_factory=dict)


_SLOTS: queue.Queue | None = None


def _slots() -> queue.Queue:
    global _SLOTS
    if _SLOTS is None:
        _SLOTS = queue.Queue()
        for i in range(64):
            _SLOTS.put(i)
    return _SLOTS


def _classify(rc: int, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "ok"
    if rc == 125 and stderr.startswith("sandbox:"):
        return "sandbox_error"
    if rc == 128 + signal.SIGXCPU or rc == 128 + signal.SIGKILL and "cpu" in stderr:
        return "cpu_limit"
    if rc == 128 + signal.SIGXFSZ or "File too large" in stderr:
        return "output_limit"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    return "runtime_error"


def run_program(source: str, stdin: str = "", language: str = "python", limits: Limits = Limits(),
                isolate: bool = True) -> RunResult:
    """Run `source` once with `stdin`; everything it started is dead and its folder gone on return."""
    if language not in LANGUAGES:
        raise ValueError(f"no sandbox runner for language {language!r}; known: {sorted(LANGUAGES)}")
    lang = LANGUAGES[language]
    slot = _slots().get()
    work = tempfile.mkdtemp(prefix="r1flow-sandbox-")  # the program's folder (its /tmp)
    ctl = tempfile.mkdtemp(prefix="r1flow-sandbox-io-")  # ours: stdin, stdout, stderr, out of its reach
    uid = SANDBOX_UID_BASE + slot if os.geteuid() == 0 else None
    try:
        Path(work, lang.filename).write_text(source)
        Path(ctl, "stdin").write_text(stdin)
        if uid is not None:
            os.chown(work, uid, uid)
        subst = {"{python}": sandbox_python()}
        steps = [[subst.get(a, a) for a in cmd] for cmd in ([lang.compile] if lang.compile else []) + [lang.run]]
        t0 = time.monotonic()
        for argv in steps:
            rc, out, err, timed_out = _launch(work, ctl, uid, argv, limits, isolate, t0)
            if rc != 0 or timed_out:
                break
        return RunResult(_classify(rc, err, timed_out), rc, out, err, time.monotonic() - t0)
    finally:
        if uid is not None:
            _kill_uid(uid)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ctl, ignore_errors=True)
        _slots().put(slot)


def _launch(work, ctl, uid, argv, limits: Limits, isolate: bool, t0: float):
    spec = {"workdir": work, "uid": uid, "argv": argv, "limits": asdict(limits), "isolate": isolate}
    # stdout and stderr are files: RLIMIT_FSIZE caps them, so printing gigabytes stops at
    # max_output_bytes instead of filling a pipe or our memory.
    with open(Path(ctl, "stdin"), "rb") as fin, open(Path(ctl, "stdout"), "wb") as fout, \
            open(Path(ctl, "stderr"), "wb") as ferr:
        p = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER, json.dumps(spec)], stdin=fin, stdout=fout,
                             stderr=ferr, start_new_session=True, env={"PATH": "/usr/bin:/bin"}, close_fds=True)
        timed_out = False
        try:
            p.wait(timeout=max(0.0, limits.wall_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
        # Always: kill the launcher's process group; the namespace's init dies with it (PDEATHSIG),
        # and with the init every process left in the PID namespace.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    cap = limits.max_output_bytes
    with open(Path(ctl, "stdout"), "rb") as f:
        out = f.read(cap).decode("utf-8", "replace")
    with open(Path(ctl, "stderr"), "rb") as f:
        err = f.read(cap).decode("utf-8", "replace")
    return p.returncode, out, err, timed_out


def _uid_processes(uid: int) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                pids.append(int(d))
                            break
            except (OSError, ValueError):
                continue
    return pids


def _kill_uid(uid: int, patience_s: float = 5.0):
    """The namespace's processes are killed with its init, but die asynchronously: wait until the slot's
    uid owns nothing, killing stragglers, so the next run of this slot starts clean."""
    deadline = time.monotonic() + patience_s
    while (pids := _uid_processes(uid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def namespaces_available() -> bool:
    """Whether this machine lets us isolate a program (root, or unprivileged user namespaces)."""
    r = run_program("print('ok')", limits=Limits(wall_s=10))
    return r.status == "ok" and r.stdout.strip() == "ok"
