"""The cluster configurations plan the DAG they should (`snakemake -n` through the SLURM profile), carry
the paper's settings, and the conda env files are pinned. Nothing here runs a job."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from r1flow.config import validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "config" / "cluster"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def merged(*names):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for name in names:
        for key, value in yaml.safe_load((CLUSTER / name).read_text()).items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(cfg, SCHEMA)


def dry_run(tmp_path, *configfiles, profile=True):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "-n",
           "--configfile", *[str(CLUSTER / c) for c in configfiles]]
    if profile:
        cmd += ["--profile", str(ROOT / "profiles" / "slurm")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("files", [("r1_zero_qwen2.5.yaml",), ("r1_zero_qwen2.5.yaml", "evaluation.yaml")])
def test_cluster_configs_plan_the_r1_zero_dag(tmp_path, files):
    p = dry_run(tmp_path, *files)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout + p.stderr
    for rule in ("tasks", "r1_zero", "evaluate", "r1_zero_report"):
        assert rule in out
    assert "base_model " not in out  # a hub base model is used as is, not built
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_r1_zero_config_has_the_paper_settings():
    g = merged("r1_zero_qwen2.5.yaml")["r1_zero"]["grpo"]
    assert (g["num_generations"], g["learning_rate"], g["beta"], g["epsilon"]) == (16, 3e-6, 0.001, 10.0)
    assert (g["max_completion_length"], g["temperature"], g["prompts_per_step"], g["steps"]) == (32768, 1.0, 32, 10400)


def test_evaluation_config_has_the_paper_protocol():
    e = merged("r1_zero_qwen2.5.yaml", "evaluation.yaml")["evaluation"]
    assert (e["max_new_tokens"], e["temperature"], e["top_p"]) == (32768, 0.6, 0.95)
    aime = e["benchmarks"]["aime24"]
    assert (aime["n"], aime["cons_at_k"]) == (64, 64)  # cons@64 on AIME 2024, as in Table 2


def test_conda_envs_are_pinned():
    for env in sorted((ROOT / "envs").glob("*.yaml")):
        spec = yaml.safe_load(env.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
        for req in pip:
            if not req.startswith("-e"):
                assert "==" in req, f"{env.name}: {req} is not pinned"


# -- every job's settings built as the job builds them ----------------------------------------------------
@pytest.fixture(scope="module")
def cluster_jobs(tmp_path_factory):
    from helpers.job_settings import planned_jobs

    files = [CLUSTER / "r1_zero_qwen2.5.yaml", CLUSTER / "evaluation.yaml"]
    return planned_jobs(tmp_path_factory.mktemp("plan"), *files)


def test_every_cluster_job_parses_and_builds_its_settings(cluster_jobs):
    """Each model-running job's command line, parsed by its script's argparse, builds GRPOConfig,
    DeepSpeedSettings, the generation backend's and the benchmarks' settings without a refusal (vLLM on
    8 ZeRO-2 ranks included: colocated, one engine per rank)."""
    from helpers.job_settings import refusals

    assert {"r1_zero", "evaluate_r1_zero_aime24"} <= set(cluster_jobs)
    assert refusals(cluster_jobs) == {}


def test_cluster_job_settings_that_the_code_refuses_fail(tmp_path):
    """A variant the schema accepts but the trainer refuses (vLLM on 8 DeepSpeed ranks without colocated
    engines: each rank samples its own groups and needs its own engine) is caught here, not on the cluster."""
    from helpers.job_settings import planned_jobs, refusals

    variant = tmp_path / "variant.yaml"
    variant.write_text(yaml.safe_dump({"generation": {"vllm": {"colocate": False}}}))
    refused = refusals(planned_jobs(tmp_path, CLUSTER / "r1_zero_qwen2.5.yaml", variant))
    assert "needs generation.vllm.colocate" in refused.get("r1_zero", ""), refused
