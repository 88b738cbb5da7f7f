"""The code sandbox as a cluster user runs it: an ordinary (non-root) user, with the job's interpreter
under /tmp (a virtualenv in node-local /tmp), which the sandbox hides by binding its own folder there.
CI runs as root, so the test makes an unprivileged user and runs the sandbox as that user."""

import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from r1flow.rewards import sandbox

USER = "r1flow-sandbox-test"
ROOT = Path(__file__).resolve().parent.parent

DRIVER = r'''
import importlib.util, json, os, socket, sys
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sb = importlib.util.module_from_spec(spec); sys.modules["sandbox"] = sb; spec.loader.exec_module(sb)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
port = srv.getsockname()[1]
lim = sb.Limits(wall_s=3, cpu_s=2, memory_mb=256)
progs = {
    "correct": ("n = int(input())\nprint(n * n)", "12\n"),
    "socket": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('escaped')", ""),
    "see processes": ("import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]))", ""),
    "signal parent": (f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\nprint('sent')", ""),
    "infinite loop": ("while True:\n    pass", ""),
}
out = {"python": sb.sandbox_python(), "uid": os.getuid(), "preflight": sb.sandbox_preflight(lim)}
for name, (src, stdin) in progs.items():
    r = sb.run_program(src, stdin, limits=lim)
    out[name] = [r.status, r.stdout.strip()[:80], r.stderr.strip()[:200]]
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root to create the unprivileged test user")
    if shutil.which("useradd") is None or shutil.which("runuser") is None:
        pytest.skip("useradd/runuser not available")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
    probe = subprocess.run(["runuser", "-u", USER, "--", "unshare", "-Urn", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip("this host has no unprivileged user namespaces: the non-root sandbox cannot be tested here")
    # a copy of the sandbox (standard library only) and an interpreter binary, both under /tmp, readable by USER
    d = Path(tmp_path_factory.mktemp("unpriv"))
    os.chmod(d, 0o755)
    for p in d.parents:
        if str(p).startswith("/tmp/"):
            os.chmod(p, 0o755)
    for f in ("sandbox.py", "_sandbox_launch.py"):
        shutil.copy(ROOT / "r1flow" / "rewards" / f, d / f)
    (d / "driver.py").write_text(DRIVER)
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    system = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else base
    (d / "bin").mkdir()
    python = d / "bin" / "python3"
    shutil.copy(os.path.realpath(system), python)  # a real file under /tmp, as in a --copies venv
    for p in d.rglob("*"):
        os.chmod(p, 0o755)
    return d, python


def test_unprivileged_user_with_interpreter_under_tmp(unprivileged):
    d, python = unprivileged
    p = subprocess.run(["runuser", "-u", USER, "--", str(python), str(d / "driver.py"), str(d / "sandbox.py")],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["uid"] == pwd.getpwnam(USER).pw_uid
    # the interpreter the sandbox starts is one it can see, not the hidden copy under /tmp
    assert not out["python"].startswith("/tmp/"), out["python"]
    assert out["preflight"] == "isolated"
    assert out["correct"][:2] == ["ok", "144"], out["correct"]  # before the fix: sandbox_error, file not found
    assert out["socket"][0] == "runtime_error" and "escaped" not in out["socket"][1]
    assert out["see processes"][0] == "ok" and int(out["see processes"][1]) <= 3  # its own PID namespace
    assert out["signal parent"][0] == "runtime_error"  # the driver's pid does not exist in there
    assert out["infinite loop"][0] in ("timeout", "cpu_limit")


def test_interpreter_under_a_hidden_folder_is_replaced(monkeypatch, tmp_path):
    fake = tmp_path / "python3"  # pytest's tmp_path lies under /tmp, which the sandbox hides
    fake.write_text("")
    monkeypatch.setattr(sandbox.sys, "executable", str(fake))
    monkeypatch.setattr(sandbox.sys, "_base_executable", str(fake), raising=False)
    chosen = sandbox.sandbox_python()
    assert not sandbox._hidden(chosen) and os.path.exists(chosen)


def test_preflight_names_the_setting_when_isolation_fails(monkeypatch):
    real = sandbox.run_program

    def no_namespaces(source, stdin="", language="python", limits=sandbox.Limits(), isolate=True):
        if isolate:
            return sandbox.RunResult("sandbox_error", 125, "", "sandbox: cannot create namespaces (EPERM)", 0.0)
        return real(source, stdin, language, limits, isolate)

    monkeypatch.setattr(sandbox, "run_program", no_namespaces)
    with pytest.raises(sandbox.SandboxUnavailable, match="rewards.code_accuracy.allow_unisolated"):
        sandbox.sandbox_preflight()
    assert sandbox.sandbox_preflight(allow_unisolated=True) == "unisolated"
    assert sandbox.sandbox_preflight.__module__ == "r1flow.rewards.sandbox"


def test_sandbox_errors_carry_the_message_and_are_counted(monkeypatch):
    from r1flow.rewards import code as C

    monkeypatch.setattr(C, "run_program", lambda *a, **k: sandbox.RunResult(
        "sandbox_error", 125, "", "sandbox: cannot start the program (No such file)", 0.0))
    r = C.run_tests("print(1)", json.dumps({"tests": [{"input": "", "output": "1"}]}), sandbox.Limits(), "all")
    assert r.score == 0.0 and r.reason == "sandbox_error:sandbox: cannot start the program (No such file)"
    # GRPO's count over a step's code rewards: one of two, logged; all of them stops the run
    from types import SimpleNamespace

    from r1flow.rewards import Reward
    from r1flow.training.engine import LocalEngine
    from r1flow.training.grpo import GRPOTrainer

    t = SimpleNamespace(engine=LocalEngine.__new__(LocalEngine), step_no=3)
    rewards = [Reward(0.0, r.reason), Reward(1.0, "passed"), None]
    assert GRPOTrainer._count_sandbox_errors(t, rewards) == 1.0
    with pytest.raises(RuntimeError, match="could not run any of the 2 programs"):
        GRPOTrainer._count_sandbox_errors(t, [Reward(0.0, r.reason)] * 2)
