"""The smoke DAG on a real (one-node) SLURM through `--profile profiles/slurm`, with fake GPUs.

Checks from each job's provenance record that the cluster jobs ran as SLURM jobs with the partition,
CPUs, memory and GPUs their config asked for (a GPU through --gres for r1_zero, through --gpus for
evaluate), and that the localrules ran on the submitting host. Skips, saying why, where SLURM cannot be
installed or started (not root, no apt-get, no mknod, a foreign controller already running).
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from helpers.slurm_cluster import LocalSlurm, Unavailable, ensure_packages

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

RESOURCES = {
    "base_model": {"slurm_partition": "cpu", "cpus_per_task": 1, "mem_mb": 1500, "runtime": 10},
    # the GPU rules: one through --gres, one through --gpus
    "r1_zero": {"slurm_partition": "gpu", "gres": "gpu:1", "cpus_per_task": 1, "mem_mb": 1500, "runtime": 10},
    "evaluate": {"slurm_partition": "gpu", "gpu": 1, "cpus_per_task": 1, "mem_mb": 1200, "runtime": 10},
}
# With DeepSpeed installed, r1_zero also trains with ZeRO-2 on 2 CPU ranks (torchrun inside the SLURM job).
WITH_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None and (os.cpu_count() or 1) >= 2
if WITH_DEEPSPEED:
    RESOURCES["r1_zero"]["cpus_per_task"] = 2
CLUSTER_JOBS = {"base_model": "base_model", "r1_zero": "r1_zero", "evaluate_base_held_out": "evaluate",
                "evaluate_r1_zero_held_out": "evaluate"}
LOCAL_JOBS = ("tasks", "r1_zero_report")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (pip install -e '.[test]')")
    try:
        # Installing the packages is a lasting change to the machine (they bring files of their own under
        # /etc/slurm, e.g. plugstack.conf): done before the snapshot, which covers what the cluster writes.
        ensure_packages(print)
    except Unavailable as e:
        pytest.skip(f"no local SLURM: {e}")
    etc = Path("/etc/slurm")
    before = {p: p.read_bytes() for p in etc.glob("*.conf")} if etc.exists() else {}
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Unavailable as e:
        pytest.skip(f"no local SLURM: {e}")
    pids = [int(p.read_text().split()[0]) for p in cluster.pidfiles if p.exists()]
    yield cluster
    cluster.stop()
    # the daemons are gone and /etc/slurm is as it was (a failure here is reported as a teardown error)
    assert len(pids) >= 2
    for pid in pids:
        with pytest.raises(OSError):
            os.kill(pid, 0)
    after = {p: p.read_bytes() for p in etc.glob("*.conf")} if etc.exists() else {}
    assert after == before


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory):
    wd = tmp_path_factory.mktemp("slurm_smoke")
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["resources"] = RESOURCES
    cfg["evaluation"]["models"] = ["base", "r1_zero"]  # the R1-Zero slice of the DAG: every kind of rule
    if WITH_DEEPSPEED:
        cfg["training"] = {"deepspeed": {"enabled": True, "zero_stage": 2, "nproc_per_node": 2, "accelerator": "cpu"}}
    conf = wd / "config.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(wd),
           "--configfile", str(conf), "--profile", str(ROOT / "profiles" / "slurm"),
           # this cluster has no accounting database: job states from squeue, no account on sbatch
           "--slurm-status-command", "squeue", "--slurm-no-account",
           "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--jobs", "4", "r1_zero_report"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    elapsed = time.time() - t0
    if p.returncode != 0:
        logs = ""
        for f in sorted((wd / ".snakemake" / "slurm_logs").rglob("*.log")):
            logs += f"--- {f}\n{f.read_text()[-2000:]}\n"
        raise AssertionError(f"snakemake on SLURM failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}\n{logs}")
    print(f"smoke DAG on SLURM: {elapsed:.0f} s")
    return wd, p.stdout + p.stderr


def _record(wd, job):
    return json.loads((wd / "results" / "provenance" / f"{job}.json").read_text())


def test_dag_completes_on_slurm(slurm_run):
    wd, out = slurm_run
    table = pd.read_csv(wd / "results" / "tables" / "r1_zero.csv")
    assert table["model"].tolist() == ["base", "r1_zero"]
    assert "sbatch" in out or "SLURM" in out


def test_cluster_jobs_ran_as_slurm_jobs_with_the_resources_asked(slurm_run):
    wd, _ = slurm_run
    job_ids = set()
    for job, rule in CLUSTER_JOBS.items():
        s, want = _record(wd, job)["slurm"], RESOURCES[rule]
        assert s["job_id"] is not None, f"{job} did not run under SLURM"
        job_ids.add(s["job_id"])
        assert s["partition"] == want["slurm_partition"], job
        assert s["cpus_per_task"] == str(want["cpus_per_task"]), job
        a = s["allocation"]  # what the controller granted
        assert a["partition"] == want["slurm_partition"] and a["tres"]["cpu"] == str(want["cpus_per_task"]), job
        assert a["tres"]["mem"] == f"{want['mem_mb']}M", job
        assert a["time_limit"] == f"00:{want['runtime']:02d}:00", job
        # asked through --gres (per node) for r1_zero and through --gpus (per job) for evaluate
        assert a.get("tres_per_node") == ("gres:gpu:1" if "gres" in want else None), (job, a)
        assert a.get("tres_per_job") == ("gres:gpu:1" if "gpu" in want else None), (job, a)
    assert len(job_ids) == len(CLUSTER_JOBS)  # one SLURM job per Snakemake job


def test_gpu_rules_got_a_gpu_and_others_none(slurm_run):
    wd, _ = slurm_run
    for job in ("r1_zero", "evaluate_base_held_out", "evaluate_r1_zero_held_out"):
        s = _record(wd, job)["slurm"]
        assert s["cuda_visible_devices"] is not None and len(s["cuda_visible_devices"].split(",")) == 1, (job, s)
        assert s["step_gpus"] == s["cuda_visible_devices"], (job, s)
    assert _record(wd, "base_model")["slurm"]["cuda_visible_devices"] is None


def test_localrules_ran_on_the_submitting_host(slurm_run):
    wd, _ = slurm_run
    for job in LOCAL_JOBS:
        assert _record(wd, job)["slurm"]["job_id"] is None, job


def test_training_ran_under_torchrun_inside_the_job_when_deepspeed_is_installed(slurm_run):
    wd, _ = slurm_run
    rec = _record(wd, "r1_zero")
    launched = "torch.distributed.run" in rec["command"]
    assert launched == WITH_DEEPSPEED
    if WITH_DEEPSPEED:
        assert rec["slurm"]["cpus_per_task"] == "2" and rec["command"][rec["command"].index("--nproc_per_node") + 1] == "2"
        assert pd.read_csv(wd / "results" / "r1_zero" / "metrics.csv")["step"].tolist() == [1, 2, 3, 4]


# -- a job longer than its time limit (issue 25, item 4) ------------------------------------------------
# R1-Zero on the smoke world, long enough to outlive SLURM's shortest time limit (1 minute; the controller
# enforces it within about 30 s more): it is killed (SIGTERM, then SIGKILL KillWait later), Snakemake
# resubmits it (profiles/slurm: retries) and it resumes from its last checkpoint (every 12 s of wall time,
# save_every_minutes, and one on the SIGTERM). LONG_STEPS is sized so that the GRPO run alone takes about
# 2-3 minutes on one thread here.
LONG_STEPS = 1500
LONG_GRPO = {"steps": LONG_STEPS, "eval_every": 0, "save_every": 10**6, "save_every_minutes": 0.2,
             "select_checkpoint": "last"}


@pytest.fixture(scope="module")
def timed_out_run(slurm, tmp_path_factory):
    wd = tmp_path_factory.mktemp("slurm_time_limit")
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["threads"] = 1
    cfg["r1_zero"]["grpo"].update(LONG_GRPO)
    cfg["resources"] = {"base_model": RESOURCES["base_model"],
                        "r1_zero": {"slurm_partition": "cpu", "cpus_per_task": 1, "mem_mb": 1500, "runtime": 1}}
    conf = wd / "config.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    target = "results/r1_zero/metrics.csv"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(wd),
           "--configfile", str(conf), "--profile", str(ROOT / "profiles" / "slurm"),
           "--slurm-status-command", "squeue", "--slurm-no-account",
           "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5", "--jobs", "2",
           "--retries", "10", target]  # more than the profile's 3: a slow machine needs more resubmissions
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    print(f"time-limited R1-Zero on SLURM: {time.time() - t0:.0f} s")
    logs = sorted((wd / ".snakemake" / "slurm_logs").rglob("*.log"))
    if p.returncode != 0:
        text = "".join(f"--- {f}\n{f.read_text()[-2000:]}\n" for f in logs)
        raise AssertionError(f"snakemake on SLURM failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}\n{text}")
    # the same job uninterrupted, outside SLURM, from the same base model and splits
    ref = tmp_path_factory.mktemp("uninterrupted")
    for rel in ("results/models/base", "results/data/tasks"):
        shutil.copytree(wd / rel, ref / rel)
    q = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(ref),
                        target, "--configfile", str(conf), "--cores", "1", "--allowed-rules", "r1_zero",
                        "--rerun-triggers", "mtime"], capture_output=True, text=True, timeout=1800)
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    return wd, ref, p.stdout + p.stderr, [f for f in logs if "r1_zero" in str(f)]


def test_a_job_killed_at_its_time_limit_is_resubmitted_and_ends_as_an_uninterrupted_run(timed_out_run):
    from safetensors.torch import load_file

    wd, ref, out, failed = timed_out_run
    # the plugin keeps the logs of failed jobs only (the successful last attempt's is deleted): the first
    # attempt was ended by its time limit, and the record of the outputs names another SLURM job
    assert failed, f"no failed R1-Zero attempt: it was never killed\n{out[-3000:]}"
    first = failed[0].read_text()
    killed = re.search(r"\*\*\* JOB (\d+) ON \S+ CANCELLED AT \S+ DUE TO TIME LIMIT", first)
    assert killed or "stopped by signal 15" in first, first[-2000:]
    final_job = _record(wd, "r1_zero")["slurm"]["job_id"]
    assert final_job is not None and (killed is None or final_job != killed.group(1)), (final_job, first[-1000:])
    log = (wd / "results" / "logs" / "r1_zero.log").read_text()
    assert "resuming from step" in log, log[-2000:]
    got, want = (pd.read_csv(d / "results" / "r1_zero" / "metrics.csv") for d in (wd, ref))
    assert got["step"].tolist() == list(range(1, LONG_STEPS + 1))
    cols = ["reward_mean", "accuracy", "completion_length", "loss", "kl"]
    pd.testing.assert_frame_equal(got[cols], want[cols])
    a, b = (load_file(str(d / "results" / "models" / "r1_zero" / "model.safetensors")) for d in (wd, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
