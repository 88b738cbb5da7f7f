"""Training across nodes on a real SLURM cluster of two nodes built on this machine (two slurmd, each in its
own network and host-name namespaces with its own address: tests/helpers/slurm_cluster.py).

R1-Zero (GRPO) and the cold-start SFT of the smoke world, each with `resources.<rule>.nodes: 2` and ZeRO-2
on 2 CPU ranks per node (gloo): one torchrun per node through srun (scripts/launch_nodes.py), 4 ranks in
all. The same two jobs then run in one process from the same inputs; metrics and weights agree to 1e-5
(fp32; the ranks differ from one process only in the order of float sums, as in tests/test_deepspeed.py).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers.slurm_cluster import LocalSlurm, Unavailable, ensure_packages

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slurm, pytest.mark.e2e]
NODE = {"slurm_partition": "cpu", "cpus_per_task": 1, "mem_mb": 1500, "runtime": 10}
TWO_NODES = {"slurm_partition": "cpu", "nodes": 2, "cpus_per_task": 2, "mem_mb": 3000, "runtime": 15}
GRPO_COLS = ["reward_mean", "accuracy", "completion_length", "loss", "kl"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for mod in ("snakemake_executor_plugin_slurm", "deepspeed"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    try:
        ensure_packages(print)
        c = LocalSlurm(tmp_path_factory.mktemp("slurm2"), partitions=("cpu",), nodes=2).start()
    except Unavailable as e:
        pytest.skip(f"no two-node local SLURM: {e}")
    yield c
    c.stop()


def _snakemake(wd, conf, target, *extra, timeout=1800, env=None):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(wd), target,
           "--configfile", str(conf), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    wd = tmp_path_factory.mktemp("two_nodes")
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["threads"] = 1
    cfg["training"] = {"deepspeed": {"enabled": True, "zero_stage": 2, "nproc_per_node": 2, "accelerator": "cpu"}}
    cfg["resources"] = {"base_model": NODE, "cold_start_data": NODE, "r1_zero": TWO_NODES, "cold_start_sft": TWO_NODES}
    conf = wd / "config.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    t0 = time.time()
    p = _snakemake(wd, conf, "results/models/cold_start", "--profile", str(ROOT / "profiles" / "slurm"), "--slurm-status-command", "squeue",
                   "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5",
                   "--jobs", "2", "--retries", "0", env=env)
    print(f"R1-Zero and cold-start SFT on 2 nodes x 2 ranks: {time.time() - t0:.0f} s")
    if p.returncode != 0:
        logs = "".join(f"--- {f}\n{f.read_text()[-2500:]}\n" for f in sorted((wd / ".snakemake" / "slurm_logs").rglob("*.log")))
        raise AssertionError(f"snakemake on 2 nodes failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}\n{logs}")
    # one process, from the same base model, splits and cold-start data
    ref = tmp_path_factory.mktemp("one_process")
    for rel in ("results/models/base", "results/data/tasks"):
        shutil.copytree(wd / rel, ref / rel)
    one = {**cfg, "training": {"deepspeed": {"enabled": False}}, "resources": {}}
    ref_conf = ref / "config.yaml"
    ref_conf.write_text(yaml.safe_dump(one))
    q = _snakemake(ref, ref_conf, "results/models/r1_zero", "--cores", "1", "--allowed-rules", "r1_zero",
                   "--rerun-triggers", "mtime")
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    data = "results/data/sft/cold_start.parquet"
    (ref / data).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wd / data, ref / data)  # newer than the R1-Zero model it came from: not rebuilt
    q = _snakemake(ref, ref_conf, "results/models/cold_start", "--cores", "1", "--allowed-rules", "cold_start_sft",
                   "--rerun-triggers", "mtime")
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    return wd, ref


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("job,model,metrics,cols", [
    ("r1_zero", "r1_zero", "r1_zero/metrics.csv", GRPO_COLS),
    ("cold_start_sft", "cold_start", "cold_start/sft_metrics.csv", ["loss"]),
])
def test_two_nodes_of_two_ranks_equal_one_process(runs, job, model, metrics, cols):
    wd, ref = runs
    got, want = (pd.read_csv(d / "results" / metrics) for d in (wd, ref))
    assert len(got) == len(want) > 0
    for c in cols:
        assert got[c].tolist() == pytest.approx(want[c].tolist(), abs=1e-5), c
    a, b = (_weights(d / "results" / "models" / model) for d in (wd, ref))
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff < 1e-5, (job, diff)


@pytest.mark.parametrize("job", ["r1_zero", "cold_start_sft"])
def test_the_job_ran_one_launcher_per_node_and_its_record_names_both_nodes(runs, job):
    wd, _ = runs
    rec = json.loads((wd / "results" / "provenance" / f"{job}.json").read_text())
    alloc = rec["slurm"]["allocation"]
    assert alloc["num_nodes"] == "2" and alloc["node_list"] == "r1n[1-2]", alloc
    launcher = next(w for w in rec["command"] if w.endswith("launch_nodes.py"))
    assert rec["command"][rec["command"].index(launcher) + 1:][:2] == ["--nodes", "2"]
    log = (wd / "results" / "logs" / f"{job}.log").read_text()
    assert "launch_nodes.py: node 0 (r1n1), rendezvous r1n1:" in log, log[-3000:]
    assert "launch_nodes.py: node 1 (r1n2), rendezvous r1n1:" in log, log[-3000:]
    assert "4 ranks (gloo backend): 2 per node on 2 node(s); rank 0 on r1n1" in log, log[-3000:]
