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
    """The config as Snakemake builds it: the embedded default with each --configfile merged in turn, key
    by key at every depth (snakemake.utils.update_config), then validated."""
    from snakemake.utils import update_config

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    for name in names:
        update_config(cfg, yaml.safe_load((CLUSTER / name).read_text()))
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
    variant.write_text(yaml.safe_dump({"stages": {"r1_zero": {"generation": {"vllm": {"colocate": False}}}}}))
    refused = refusals(planned_jobs(tmp_path, CLUSTER / "r1_zero_qwen2.5.yaml", variant))
    assert "needs generation.vllm.colocate" in refused.get("r1_zero", ""), refused


# -- the README's cluster command: every job's own settings, GPUs and scale (issue 24) ---------------------
def readme_cluster_command():
    """The config files of the README's cluster command, as the README writes it."""
    line = next(s for s in (ROOT / "README.md").read_text().splitlines()
                if s.startswith("snakemake --profile profiles/slurm --configfile"))
    words = line.split()
    return [ROOT / w for w in words[words.index("--configfile") + 1:]]


GRPO_STAGES = ("r1_zero", "reasoning_rl", "r1", "rl_only")
SAMPLING_STAGES = ("cold_start_data", "rejection_sampling", "evaluate")
SFT_STAGES = ("cold_start_sft", "final_sft", "distill", "reward_model")


def stage_of(job):
    """The rule a planned job belongs to (jobs of evaluate and reward_model carry wildcards in their names)."""
    for rule in GRPO_STAGES + SAMPLING_STAGES + SFT_STAGES:
        if job == rule or (rule in WILDCARD_RULES and job.startswith(rule + "_")):
            return rule
    return None


WILDCARD_RULES = ("evaluate", "reward_model", "distill", "rl_only")  # evaluate_{model}_{benchmark}, ...


@pytest.fixture(scope="module")
def readme_plan(tmp_path_factory):
    """(jobs' command words, jobs' resources) of the README's exact cluster command, through the profile."""
    from helpers.job_settings import planned_job_resources, planned_jobs

    files = readme_cluster_command()
    assert [f.name for f in files] == ["r1_zero_qwen2.5.yaml", "evaluation.yaml"]
    profile = ("--profile", str(ROOT / "profiles" / "slurm"))
    wd = tmp_path_factory.mktemp("readme_plan")
    return planned_jobs(wd, *files, extra=profile), planned_job_resources(wd, *files, extra=profile)


def test_readme_command_gives_each_stage_its_own_generation_settings(readme_plan):
    """evaluation.yaml's whole-GPU vLLM engine (0.9 of the GPU) reaches the evaluation jobs only; every GRPO
    stage keeps its colocated engine (0.35, asleep while training) and the sampling stages a whole GPU,
    not colocated: each job's effective --generation, as its script parses it."""
    from helpers.job_settings import job_namespace

    jobs, _ = readme_plan
    seen = set()
    for job, words in jobs.items():
        rule = stage_of(job)
        if rule is None or rule in SFT_STAGES:
            continue
        _, a, _ = job_namespace(words)
        v = a.generation["vllm"]
        assert a.generation["backend"] == "vllm", job
        got = (v["colocate"], v["sleep_mode"], v["gpu_memory_utilization"], v["max_model_len"])
        if rule in GRPO_STAGES:
            assert got == (True, True, 0.35, 33792), job
            assert v["sleep_level"] == 2
        else:
            assert got == (False, False, 0.9, 33792), job
        seen.add(rule)
    assert seen == set(GRPO_STAGES + SAMPLING_STAGES)


def test_a_global_generation_setting_in_a_later_file_does_not_reach_a_stage_that_sets_its_own(tmp_path):
    """The leak of issue 24: a second config file that sets the top-level generation (as evaluation.yaml
    once did) changes the stages that inherit it, never one whose own section sets the key."""
    from helpers.job_settings import job_namespace, planned_jobs

    late = tmp_path / "late.yaml"
    late.write_text(yaml.safe_dump({"generation": {"vllm": {"gpu_memory_utilization": 0.95}}}))
    jobs = planned_jobs(tmp_path, CLUSTER / "r1_zero_qwen2.5.yaml", CLUSTER / "evaluation.yaml", late)
    util = {}
    for j, w in jobs.items():
        if stage_of(j) in GRPO_STAGES + SAMPLING_STAGES:
            util.setdefault(stage_of(j), set()).add(job_namespace(w)[1].generation["vllm"]["gpu_memory_utilization"])
    assert {s: util[s] for s in GRPO_STAGES} == {s: {0.35} for s in GRPO_STAGES}
    assert util["evaluate"] == {0.9}  # stages.evaluate sets it
    assert util["cold_start_data"] == util["rejection_sampling"] == {0.95}  # they inherit the top level


@pytest.mark.parametrize("files", [("r1_zero_qwen2.5.yaml",), ("r1_zero_qwen2.5.yaml", "evaluation.yaml"),
                                   ("r1_zero_qwen2.5.yaml", "rl_only_qwen2.5-32b.yaml")])
def test_every_job_that_runs_a_model_asks_for_the_gpus_its_launcher_uses(tmp_path, files):
    """Under each cluster config every planned job that runs a model (its command has --device) asks for
    GPUs, at least as many per node as it starts ranks; a stage added later without resources fails here
    (and, under device: cuda, when the workflow plans it: see the next test)."""
    from helpers.job_settings import job_namespace, planned_job_resources, planned_jobs

    from r1flow.config import gpus_per_node

    profile = ("--profile", str(ROOT / "profiles" / "slurm"))
    jobs = planned_jobs(tmp_path, *[CLUSTER / f for f in files], extra=profile)
    resources = planned_job_resources(tmp_path, *[CLUSTER / f for f in files], extra=profile)
    model_jobs = [j for j, w in jobs.items() if "--device" in w]
    assert {stage_of(j) for j in model_jobs} == set(GRPO_STAGES + SAMPLING_STAGES + SFT_STAGES)
    for job in model_jobs:
        words = jobs[job]
        script, a, ranks = job_namespace(words)
        assert a.device == "cuda", job
        tp = a.generation["vllm"]["tensor_parallel_size"] if getattr(a, "generation", None) else 1
        gpus = gpus_per_node(resources[job])
        per_node = ranks // int(resources[job].get("nodes") or 1)  # a multi-node job's ranks on each node
        assert gpus >= max(per_node, tp) >= 1, (job, resources[job])
        if stage_of(job) in GRPO_STAGES:
            assert per_node == 8 and gpus == 8, job


def test_every_stage_runs_at_the_papers_lengths(readme_plan):
    """The stages after R1-Zero are not left at the tiny defaults: every GRPO stage samples 32,768 tokens
    with G = 16 and 32 questions a step, every sampling stage 32,768 new tokens, every SFT stage trains on
    the full length."""
    from helpers.job_settings import job_namespace

    jobs, _ = readme_plan
    for job, words in jobs.items():
        rule = stage_of(job)
        if rule is None:
            continue
        _, a, _ = job_namespace(words)
        if rule in GRPO_STAGES:
            g = a.grpo
            assert (g["max_completion_length"], g["num_generations"], g["prompts_per_step"]) == (32768, 16, 32), job
            assert (g["learning_rate"], g["beta"]) == (3e-6, 0.001), job
        elif rule in ("cold_start_data", "rejection_sampling"):
            assert a.settings["max_new_tokens"] == 32768, job
        elif rule == "evaluate":
            assert a.evaluation["max_new_tokens"] == 32768, job
        elif rule != "reward_model":
            assert a.settings["max_length"] >= 32768 and a.settings["epochs"] == 2, job


def test_a_stage_without_enough_gpus_stops_the_plan_naming_the_setting(tmp_path):
    variant = tmp_path / "variant.yaml"
    variant.write_text(yaml.safe_dump({"resources": {"reasoning_rl": {"gres": "gpu:2"}}}))
    p = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                        "-n", "--configfile", str(CLUSTER / "r1_zero_qwen2.5.yaml"), str(variant)],
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "config key 'resources.reasoning_rl'" in out and "8 rank(s) per node but asks for 2 GPU(s)" in out, out[-2000:]
    assert not (tmp_path / "results").exists()


def test_an_env_without_the_backends_package_stops_the_plan(tmp_path):
    """A copy of the workflow whose vLLM env lost its vllm pin: planning under the vllm backend fails,
    naming generation.backend and the env file, before any job."""
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    for part in ("Snakefile", "workflow", "envs", "scripts", "r1flow", "config"):
        src = ROOT / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / part)
    env = repo / "envs" / "generate-vllm.yaml"
    env.write_text("\n".join(s for s in env.read_text().splitlines() if "vllm==" not in s) + "\n")
    p = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory",
                        str(tmp_path / "wd"), "-n", "--configfile", str(CLUSTER / "r1_zero_qwen2.5.yaml")],
                       capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "config key 'generation.backend'" in out and "generate-vllm.yaml installs no vllm" in out, out[-2000:]


def test_the_profile_keeps_going_and_retries():
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["keep-going"] is True
    assert profile["retries"] >= 1


def plan_variant(tmp_path, settings):
    variant = tmp_path / "variant.yaml"
    variant.write_text(yaml.safe_dump(settings))
    p = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                        "-n", "--configfile", str(CLUSTER / "r1_zero_qwen2.5.yaml"), str(variant)],
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def test_a_job_that_would_run_out_of_gpu_memory_stops_the_plan(tmp_path):
    """Issue 24's example: 16 outputs per micro-batch at 32,768 tokens on a 7B model need about 105 GB for
    the checkpointed layer inputs alone; the memory plan refuses it before any job, naming the key and the
    largest value that fits (the shipped config, at 1, passes: every other test here plans it)."""
    rc, out = plan_variant(tmp_path, {"r1_zero": {"grpo": {"micro_batch_size": 16}}})
    assert rc != 0
    assert "r1_zero: planned peak" in out and "GiB GPU" in out, out[-2000:]
    assert "lower config key 'r1_zero.grpo.micro_batch_size' (largest that fits: 2)" in out, out[-2000:]
    assert not (tmp_path / "results").exists()


def test_a_colocated_engine_that_never_sleeps_is_refused_naming_the_stage_key(tmp_path):
    rc, out = plan_variant(tmp_path, {"stages": {"r1_zero": {"generation": {"vllm": {"sleep_mode": False}}}}})
    assert rc != 0
    assert "config key 'stages.r1_zero.generation.vllm.gpu_memory_utilization'" in out, out[-2000:]
    assert "stages.r1_zero.generation.vllm.sleep_mode: true" in out


def test_a_time_limit_not_longer_than_the_checkpoint_interval_is_refused(tmp_path):
    """save_every_minutes at or above the job's runtime: every resubmission would die before its first
    checkpoint; refused before any job, naming both keys."""
    rc, out = plan_variant(tmp_path, {"r1_zero": {"grpo": {"save_every_minutes": 2880}}})
    assert rc != 0
    assert "config key 'r1_zero.grpo.save_every_minutes': 2880 minute(s) is not shorter than the job's time " \
           "limit (resources.r1_zero.runtime: 2880 minutes)" in out, out[-2000:]
    assert not (tmp_path / "results").exists()
    rc, out = plan_variant(tmp_path, {"r1": {"final_sft": {"save_every_minutes": 3000}}})  # an SFT stage alike
    assert rc != 0
    assert "config key 'r1.final_sft.save_every_minutes': 3000 minute(s) is not shorter than the job's time " \
           "limit (resources.final_sft.runtime: 2880 minutes)" in out, out[-2000:]


def test_nodes_on_a_stage_that_runs_in_one_process_are_refused_naming_the_key(tmp_path):
    """Issue 25's bad input: only DeepSpeed training spans nodes; an evaluation (one vLLM engine) or a GRPO
    stage with its deepspeed settings off asked for 2 nodes is refused before any job starts."""
    rc, out = plan_variant(tmp_path, {"resources": {"evaluate": {"nodes": 2}}})
    assert rc != 0
    assert "config key 'resources.evaluate.nodes': only training under DeepSpeed spans nodes" in out, out[-2000:]
    rc, out = plan_variant(tmp_path, {"resources": {"r1_zero": {"nodes": 2}},
                                      "stages": {"r1_zero": {"deepspeed": {"enabled": False}}}})
    assert rc != 0
    assert "config key 'resources.r1_zero.nodes': 2 nodes, but stage r1_zero trains in one process" in out, out[-2000:]
    assert not (tmp_path / "results").exists()


def test_a_two_node_grpo_job_runs_one_torchrun_per_node(tmp_path):
    from helpers.job_settings import planned_job_resources, planned_jobs

    (tmp_path / "variant.yaml").write_text(yaml.safe_dump({"resources": {"r1_zero": {"nodes": 2}}}))
    jobs = planned_jobs(tmp_path, CLUSTER / "r1_zero_qwen2.5.yaml", tmp_path / "variant.yaml")
    words = jobs["r1_zero"]
    at = next(i for i, w in enumerate(words) if w.endswith("launch_nodes.py"))
    assert words[at + 1:at + 10] == ["--nodes", "2", "--nproc-per-node", "8", "--cpus-per-task", "64",
                                     "--gpus-per-node", "8", "--"], words
    assert words[at + 10].endswith("grpo.py") and "torch.distributed.run" not in words
    res = planned_job_resources(tmp_path, CLUSTER / "r1_zero_qwen2.5.yaml", tmp_path / "variant.yaml")["r1_zero"]
    assert res["nodes"] == "2" and res["tasks"] == "2" and res["mpi"] == "srun", res


# -- section 4.1's RL-only run on Qwen2.5-32B (issue 25 item 3) -------------------------------------------
def config_command(name):
    """(config files, targets) of the command a config file's header gives."""
    line = next(s for s in (CLUSTER / name).read_text().splitlines() if s.startswith("#   snakemake --profile"))
    words = line[1:].split()
    files = words[words.index("--configfile") + 1:words.index("--")]
    return [ROOT / f for f in files], words[words.index("--") + 1:]


def test_the_32b_rl_only_config_plans_on_four_nodes_and_fits_the_memory_plan(tmp_path):
    """The header's command plans (under device: cuda the workflow's GPU memory plan refuses a job whose peak
    exceeds its 80 GB GPU before anything is submitted), the job runs 4 x 8 ranks through srun under FSDP2
    with one colocated vLLM engine per two ranks, at R1-Zero's paper settings, and its settings build
    without a refusal; on 2 nodes the same job is refused by the plan. Merging it changes no other stage."""
    from helpers.job_settings import job_namespace, planned_jobs, refusals

    from r1flow.training.memory_plan import GiB, across_nodes, model_shape, plan_job

    files, targets = config_command("rl_only_qwen2.5-32b.yaml")
    assert [f.name for f in files] == ["r1_zero_qwen2.5.yaml", "rl_only_qwen2.5-32b.yaml"]
    assert targets == ["results/models/rl_only_qwen32b"]
    extra = ("--profile", str(ROOT / "profiles" / "slurm"), "--", *targets)
    jobs = planned_jobs(tmp_path / "plan", *files, extra=extra)
    assert set(jobs) == {"tasks", "rl_only_qwen32b"}
    words = jobs["rl_only_qwen32b"]
    at = next(i for i, w in enumerate(words) if w.endswith("launch_nodes.py"))
    assert words[at + 1:at + 5] == ["--nodes", "4", "--nproc-per-node", "8"], words
    script, a, ranks = job_namespace(words)
    assert (script, ranks, a.model, a.device, a.dtype) == ("grpo.py", 32, "Qwen/Qwen2.5-32B", "cuda", "bfloat16")
    assert a.deepspeed["engine"] == "fsdp2" and a.deepspeed["zero_stage"] == 3 and a.deepspeed["bf16"]
    v = a.generation["vllm"]
    assert (v["colocate"], v["sleep_mode"], v["sleep_level"], v["tensor_parallel_size"]) == (True, True, 2, 2)
    g = a.grpo
    assert (g["num_generations"], g["prompts_per_step"], g["max_completion_length"]) == (16, 32, 32768)
    assert (g["learning_rate"], g["beta"], g["epsilon"], g["temperature"]) == (3e-6, 0.001, 10.0, 1.0)
    assert g["steps"] > 10000  # section 4.1: "over 10K steps"
    assert refusals(jobs) == {}

    values = {"grpo": a.grpo, "dtype": a.dtype, "generation": a.generation, "deepspeed": a.deepspeed}
    gpu = merged(*[f.name for f in files])["memory_plan"]["gpu_memory_gib"]
    shape = model_shape("Qwen/Qwen2.5-32B")
    four, two = (plan_job("grpo", across_nodes(values, n), shape, gpu) for n in (4, 2))
    assert four.peak_bytes <= gpu * GiB and four.kv_check["fits"], four.summary()
    assert two.peak_bytes > gpu * GiB  # the shards over 16 ranks do not leave vLLM its share
    # FSDP2's state is sharded over all 32 ranks, not one node's 8
    assert four.phases["training"]["optimizer state (AdamW m, v)"] == 8 * shape.n_params // 32

    (tmp_path / "two.yaml").write_text(yaml.safe_dump({"resources": {"rl_only": {"nodes": 2}}}))
    p = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                        str(tmp_path / "two"), "-n", "--configfile", *map(str, files), str(tmp_path / "two.yaml"),
                        "--", *targets], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "rl_only: planned peak" in p.stdout + p.stderr, (p.stdout + p.stderr)[-2000:]

    # the default target with both files: section 4.1's other arm, distillation into the 32B student, is
    # placed the same way, and every job's settings build
    whole = planned_jobs(tmp_path / "whole", *files, extra=extra[:2])
    assert {"rl_only_qwen32b", "distill_qwen32b", "evaluate_rl_only_qwen32b_held_out",
            "evaluate_distill_qwen32b_held_out"} <= set(whole)
    assert refusals(whole) == {}
    script, a, ranks = job_namespace(whole["distill_qwen32b"])
    assert (script, ranks, a.deepspeed["engine"]) == ("sft.py", 32, "fsdp2")

    # YAML aliases in the first file (resources and stages shared by several rules) do not carry the
    # second file's keys to the other stages
    both, alone = merged(*[f.name for f in files]), merged("r1_zero_qwen2.5.yaml")
    for rule in ("r1_zero", "reasoning_rl", "r1", "cold_start_sft"):
        assert both["resources"][rule] == alone["resources"][rule], rule
    for rule in ("r1_zero", "reasoning_rl", "r1"):
        assert both["stages"][rule] == alone["stages"][rule], rule
