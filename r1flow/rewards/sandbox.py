"""Run untrusted programs (the model's code) against test cases, for the code reward (section 2.2.2:
"for LeetCode problems, a compiler can be used to generate feedback based on predefined test cases").

Each run gets its own temporary folder, namespaces (no network, private /tmp and /proc, a PID namespace
whose init takes every leftover process down with it), its own uid when we are root, CPU-time, memory,
output-size, process and open-file limits, a scrubbed environment, and a wall-clock limit enforced
here. See _sandbox_launch.py for the steps. Where namespaces cannot be created (not root and no
unprivileged user namespaces) a job that scores code stops at its preflight (`sandbox_preflight`) unless
rewards.code_accuracy.allow_unisolated is set; the error says what is then left unprotected.
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


# Folders the launcher mounts over inside the namespace (the program's own folder on /tmp, small tmpfs
# on the others): nothing of the host under them is visible to the program, an interpreter included.
HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue")


def _hidden(path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == d or real.startswith(d + "/") for d in HIDDEN)


def sandbox_python() -> str:
    """An interpreter the program can be started with inside the sandbox: the real path (a venv's python
    is a link) of ours, else of the base interpreter, else the system's; never one under a folder the
    sandbox hides (a virtualenv in a job's node-local /tmp), and as root one the slot's uid may execute.
    Programs run with `python -I` and the standard library only, so any of these runs them alike."""
    root = os.geteuid() == 0
    for cand in (sys.executable, getattr(sys, "_base_executable", None), "/usr/bin/python3", "/usr/local/bin/python3"):
        if not cand or not os.path.exists(cand) or _hidden(cand):
            continue
        if root and not _reachable_by_others(cand):
            continue
        return os.path.realpath(cand)
    raise RuntimeError(f"no Python interpreter the sandbox can start: {sys.executable} lies under a folder the sandbox "
                       f"hides ({', '.join(HIDDEN)}) or, as root, is not executable by other users; install "
                       "/usr/bin/python3")


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
    spec = {"workdir": work, "uid": uid, "argv": argv, "limits": asdict(limits), "isolate": isolate,
            "tmpfs": [d for d in HIDDEN if d != "/tmp"]}
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


class SandboxUnavailable(RuntimeError):
    """This host cannot run the code reward's programs isolated (section 2.2.2's compiler feedback)."""


# A program that tries what the sandbox must stop: reach a port on this host, see the host's processes.
_HOSTILE = """import os, socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=1)
    print("escaped: reached a port on the host")
except OSError:
    pass
pids = [p for p in os.listdir("/proc") if p.isdigit()]
if len(pids) > 4:
    print(f"escaped: sees {{len(pids)}} processes")
print("contained")
"""


def sandbox_preflight(limits: Limits = Limits(), allow_unisolated: bool = False) -> str:
    """Run a correct and a hostile program before a job that scores code, and stop it with an error
    naming the setting when this host cannot run them isolated: otherwise every sample would score 0
    (a sandbox_error) and the run would look like a model that cannot code. Returns "isolated", or
    "unisolated" when isolation is impossible and rewards.code_accuracy.allow_unisolated is set."""
    import socket

    limits = Limits(min(limits.wall_s, 10.0), limits.cpu_s, max(limits.memory_mb, 128), limits.max_output_bytes,
                    limits.max_processes)
    good = run_program("print(6 * 7)", limits=limits)
    if good.status == "ok" and good.stdout.strip() == "42":
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        try:
            bad = run_program(_HOSTILE.format(port=srv.getsockname()[1]), limits=limits)
        finally:
            srv.close()
        if bad.status != "ok" or bad.stdout.strip().splitlines()[-1:] != ["contained"] or "escaped" in bad.stdout:
            raise SandboxUnavailable(f"the code reward's sandbox did not contain a hostile program on this host "
                                     f"({bad.status}: {(bad.stdout + bad.stderr).strip()[:300]}); no program is run")
        return "isolated"
    why = (good.stderr.strip() or good.stdout.strip() or good.status)[:300]
    if allow_unisolated:
        plain = run_program("print(6 * 7)", limits=limits, isolate=False)
        if plain.status == "ok" and plain.stdout.strip() == "42":
            return "unisolated"
        why += f"; unisolated too: {(plain.stderr.strip() or plain.status)[:200]}"
    raise SandboxUnavailable(
        f"config key 'rewards.code_accuracy': this host cannot run the model's programs isolated ({why}). The "
        "sandbox needs root or unprivileged user namespaces (sysctl user.max_user_namespaces > 0, and "
        "kernel.unprivileged_userns_clone = 1 where that exists). To run them without isolation set "
        "rewards.code_accuracy.allow_unisolated: true: a program then shares this job's network, processes and "
        "files (only the resource limits and its own working folder remain).")
