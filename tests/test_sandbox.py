"""The code reward's sandbox against hostile programs (section 2.2.2's compiler feedback).

Every hostile program must end within its limit plus a margin, score 0, leave no process running
and nothing written outside its folder, and leave the other samples of the batch scored normally.
"""

import json
import os
import socket
import time
from pathlib import Path

import pytest

from r1flow import rewards as R
from r1flow.rewards.code import extract_code, same_output
from r1flow.rewards.sandbox import (
    SANDBOX_UID_BASE,
    Limits,
    namespaces_available,
    run_program,
)

LIMITS = {"wall_s": 3.0, "cpu_s": 2, "memory_mb": 256, "max_output_bytes": 1 << 20, "max_processes": 16}
MARGIN = 2.0
OUTSIDE = ["/work/PWNED_r1flow", "/var/tmp/PWNED_r1flow", "/dev/shm/PWNED_r1flow", "/tmp/PWNED_r1flow",
           "/root/PWNED_r1flow", str(Path.cwd() / "PWNED_r1flow")]

pytestmark = pytest.mark.skipif(not namespaces_available(),
                                reason="no root and no unprivileged user namespaces: the sandbox refuses to run")

SQUARE_TESTS = json.dumps({"language": "python", "tests": [{"input": "3\n", "output": "9"},
                                                           {"input": "12\n", "output": "144"}]})
GOOD = "```python\nn = int(input())\nprint(n * n)\n```"


def answer(code: str) -> str:
    return f"<think> write it </think><answer>\n```python\n{code}\n```\n</answer>"


def sandbox_processes() -> list[int]:
    """Processes owned by any sandbox uid, anywhere on the machine."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                uid = int((d / "status").read_text().split("Uid:")[1].split()[0])
            except (OSError, IndexError):
                continue
            if SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + 64:
                pids.append(int(d.name))
    return pids


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    yield srv
    srv.close()


def hostile_programs(port: int) -> dict[str, str]:
    writes = "\n".join(f"try:\n    open({p!r}, 'w').write('x')\nexcept Exception:\n    pass" for p in OUTSIDE)
    return {
        "infinite loop": "while True:\n    pass",
        "sleep forever": "import time\ntime.sleep(3600)",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "memory bomb": "a = []\nwhile True:\n    a.append(bytearray(10**7))",
        "write outside": writes + "\nprint(9)",
        "read parent env": "import os, glob\nfor f in glob.glob('/proc/*/environ'):\n    try:\n        print(open(f).read())\n"
                           "    except Exception:\n        pass\nprint(dict(os.environ))",
        "open socket": f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
                       "s.send(b'leak')\nprint(9)",
        "signal parent": f"import os, signal\nfor p in (os.getppid(), {os.getpid()}, -1):\n    try:\n"
                         "        os.kill(p, signal.SIGKILL)\n    except OSError:\n        pass\nprint(9)",
        "print gigabytes": "import sys\nwhile True:\n    sys.stdout.write('9' * 10**6)",
        "escape session": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(3600)\nprint(9)",
    }


def test_hostile_programs_one_by_one(listener, monkeypatch):
    monkeypatch.setenv("R1FLOW_SECRET", "s3cret-token")
    port = listener.getsockname()[1]
    for name, code in hostile_programs(port).items():
        t0 = time.monotonic()
        r = R.get("code_accuracy")([answer(code)], [SQUARE_TESTS], **LIMITS)[0]
        elapsed = time.monotonic() - t0
        assert r.score == 0.0, (name, r)
        assert elapsed <= LIMITS["wall_s"] * 2 + MARGIN, (name, elapsed)  # at most 2 tests, stops at the first failure
        assert sandbox_processes() == [], name
        assert not any(os.path.exists(p) for p in OUTSIDE), name
    with pytest.raises(socket.timeout):
        listener.accept()  # nothing ever connected


def test_what_hostile_programs_see(listener, monkeypatch):
    monkeypatch.setenv("R1FLOW_SECRET", "s3cret-token")
    progs = hostile_programs(listener.getsockname()[1])
    lim = Limits(**LIMITS)
    env = run_program(progs["read parent env"], limits=lim)
    assert env.status == "ok" and "s3cret-token" not in env.stdout and "PATH" in env.stdout
    assert run_program(progs["infinite loop"], limits=lim).status == "cpu_limit"
    assert run_program(progs["sleep forever"], limits=lim).status == "timeout"
    assert run_program(progs["memory bomb"], limits=lim).status == "memory"
    big = run_program(progs["print gigabytes"], limits=lim)
    assert big.status == "output_limit" and len(big.stdout) <= LIMITS["max_output_bytes"]
    sock = run_program(progs["open socket"], limits=lim)
    assert sock.status == "runtime_error" and "Network is unreachable" in sock.stderr
    assert run_program(progs["signal parent"], limits=lim).stdout.strip() == "9"  # and we are still here
    # its /tmp is its own folder, gone afterwards
    assert run_program("open('/tmp/x', 'w').write('1'); print(open('/tmp/x').read())", limits=lim).stdout == "1\n"


def test_hostile_batch_does_not_disturb_good_samples(listener):
    progs = list(hostile_programs(listener.getsockname()[1]).values())
    completions, golds = [], []
    for p in progs:
        completions += [GOOD, answer(p)]
        golds += [SQUARE_TESTS, SQUARE_TESTS]
    t0 = time.monotonic()
    out = R.get("code_accuracy")(completions, golds, workers=4, **LIMITS)
    assert [r.score for r in out] == [1.0, 0.0] * len(progs)
    assert all(r.reason == "passed" for r in out[::2])
    assert time.monotonic() - t0 < len(progs) * LIMITS["wall_s"]  # ran in parallel
    assert sandbox_processes() == []


def test_scoring_modes_and_reasons():
    half = answer("n = int(input())\nprint(9 if n == 3 else 0)")
    assert R.get("code_accuracy")([half], [SQUARE_TESTS], score="fraction")[0].score == 0.5
    r = R.get("code_accuracy")([half], [SQUARE_TESTS], score="all")[0]
    assert (r.score, r.reason, r.extracted) == (0.0, "wrong_output", "1/2")
    assert R.get("code_accuracy")(["no code here"], [SQUARE_TESTS])[0].reason == "no_code"
    assert R.get("code_accuracy")([GOOD], ["not json"])[0].reason.startswith("bad_tests")
    bare_list = json.dumps([{"input": "2", "output": "4"}])
    assert R.get("code_accuracy")([GOOD], [bare_list])[0].score == 1.0
    with pytest.raises(ValueError, match="no sandbox runner"):
        run_program("x", language="cobol")


def test_extract_code_and_compare_output():
    c = "<think>```python\nprint(1)\n```</think> here:\n```text\nhi\n```\n```py\nprint(2)\n```"
    assert extract_code(c) == "print(2)\n"  # after the reasoning, the python-labelled block
    assert extract_code("<think> ```python\nprint(1)\n``` </think> none after") is None
    assert same_output("9  \n144\n\n", "9\n144")
    assert not same_output("9\n14", "9\n144")
