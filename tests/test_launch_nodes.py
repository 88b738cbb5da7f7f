"""scripts/launch_nodes.py outside SLURM: the commands it builds, the rendezvous every node computes alike,
and a clear error when it is started without an allocation (tests/test_slurm_nodes.py runs it on two nodes)."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("launch_nodes", ROOT / "scripts" / "launch_nodes.py")
launch_nodes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch_nodes)


def test_each_node_runs_torchrun_with_its_rank_and_the_first_host_as_rendezvous():
    cmd = launch_nodes.torchrun_command(2, 8, 1, "gpu017", 21234, ["scripts/train.py", "--x", "1"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8", "--node_rank", "1",
                       "--master_addr", "gpu017", "--master_port", "21234", "scripts/train.py", "--x", "1"]


def test_the_srun_step_starts_one_task_per_node_and_ends_when_one_fails():
    a = SimpleNamespace(nodes=3, nproc_per_node=4, cpus_per_task=16, gpus_per_node=4)
    cmd = launch_nodes.srun_command(a, ["train.py"])
    assert cmd[:7] == ["srun", "--nodes", "3", "--ntasks", "3", "--ntasks-per-node", "1"]
    assert "--kill-on-bad-exit=1" in cmd and "--gpus-per-node=4" in cmd
    assert cmd[cmd.index("--cpus-per-task") + 1] == "16"
    assert cmd[-4:] == ["4", "--node", "--", "train.py"]


def test_every_node_computes_the_same_host_and_port(monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NODELIST", "r1n[3-4]")
    monkeypatch.setenv("SLURM_JOB_ID", "45017")

    def hostnames(cmd, **kw):
        assert cmd == ["scontrol", "show", "hostnames", "r1n[3-4]"]
        return SimpleNamespace(stdout="r1n3\nr1n4\n")

    monkeypatch.setattr(launch_nodes.subprocess, "run", hostnames)
    assert launch_nodes.rendezvous() == ("r1n3", 20000 + 45017 % 20000)


def test_outside_an_allocation_it_stops_saying_so():
    env = {"PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch_nodes.py"), "--nodes", "2",
                        "--nproc-per-node", "2", "--", "train.py"], capture_output=True, text=True, env=env)
    assert p.returncode != 0
    assert "a job on 2 nodes runs inside a SLURM allocation" in p.stderr and "SLURM_JOB_ID unset" in p.stderr


def test_without_the_script_separator_it_stops():
    with pytest.raises(SystemExit, match="expected '-- SCRIPT ARGS...'"):
        launch_nodes.main(["--nodes", "2", "--nproc-per-node", "2"])
