"""The whole DAG on the smoke config through the Snakemake CLI: tables, plots, bad input, resumption."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def snakemake(workdir, *args, config="config/smoke.yaml", check=True, **kw):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(ROOT / config) if not os.path.isabs(config) else config, "--cores", "2", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("smoke")
    snakemake(wd)
    return wd


def test_tables_match_the_samples(smoke_run):
    r = smoke_run / "results"
    table = pd.read_csv(r / "tables" / "r1_zero.csv")
    assert table["model"].tolist() == ["base", "r1_zero"]
    assert (table["n"] == 2).all() and (table["num_problems"] == 16).all() and (table["cons_k"] == 2).all()
    assert (table["temperature"] == 0.6).all() and (table["top_p"] == 0.95).all()
    assert (table["max_new_tokens"] == 24).all()
    for _, row in table.iterrows():
        s = pd.read_parquet(r / "eval" / row["model"] / "held_out" / "samples.parquet")
        assert len(s) == 16 * 2
        per_problem = s.groupby("problem_id")["correct"].mean()
        assert row["pass@1"] == pytest.approx(per_problem.mean())
        # unbiased pass@2 from n = 2: a problem counts when either sample is right
        assert row["pass@2"] == pytest.approx((s.groupby("problem_id")["correct"].max()).mean())
        assert row["format_rate"] == pytest.approx(s["format"].mean())
        assert (s.loc[s["truncated"], "correct"] == 0).all()
        assert 0 <= row["cons@k"] <= 1
    md = (r / "tables" / "r1_zero.md").read_text()
    assert ("| Model | held_out pass@1 | held_out cons@2 | held_out pass@2 | held_out format | held_out language |"
            " held_out length |") in md
    assert "| r1_zero |" in md and "n = 2 samples each, temperature 0.6, top-p 0.95, at most 24 new tokens" in md
    assert (r / "tables" / "benchmarks.md").read_text().count("| base |") == 1
    assert (r / "plots" / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # both task families of the smoke config reach every split (guess tasks: the default's)
    for split in ("train", "test"):
        assert set(pd.read_parquet(r / "data" / "tasks" / f"{split}.parquet")["task"]) == {"chain", "guess"}


def test_training_outputs(smoke_run):
    r = smoke_run / "results"
    m = pd.read_csv(r / "r1_zero" / "metrics.csv")
    assert m["step"].tolist() == [1, 2, 3, 4]
    curve = pd.read_csv(r / "r1_zero" / "validation_curve.csv")
    assert curve["step"].tolist() == [0, 2, 4]
    for png in ("r1_zero_accuracy.png", "r1_zero_length.png"):
        assert (r / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (r / "state" / "r1_zero").exists()  # resumable state is cleared after success
    for rule in ("tasks", "base_model", "r1_zero", "evaluate_base_held_out", "evaluate_r1_zero_held_out",
                 "r1_zero_report", "benchmark_table"):
        assert (r / "logs" / f"{rule}.log").exists() and (r / "benchmarks" / f"{rule}.tsv").exists()


def test_every_job_leaves_a_provenance_record(smoke_run):
    import json

    prov = smoke_run / "results" / "provenance"
    jobs = ("tasks", "base_model", "r1_zero", "r1_zero_report", "benchmark_table", "preferences", "non_reasoning_data",
            "cold_start_data", "cold_start_sft", "reasoning_rl", "rejection_sampling", "final_sft",
            "reward_model_helpfulness", "reward_model_harmlessness", "r1", "student_base_student", "distill_student",
            "rl_only_student", "stage_curves", "decontamination", *(f"evaluate_{m}_held_out" for m in MODELS))
    rec = {j: json.loads((prov / f"{j}.json").read_text()) for j in jobs}
    assert sorted(p.name for p in prov.iterdir()) == sorted(f"{j}.json" for j in jobs)
    # the records chain: what a job read is what the job before it wrote
    assert rec["r1_zero"]["inputs"]["results/models/base"] == rec["base_model"]["outputs"]["results/models/base"]
    assert (rec["evaluate_r1_zero_held_out"]["inputs"]["results/models/r1_zero"]["sha256"]
            == rec["r1_zero"]["outputs"]["results/models/r1_zero"]["sha256"])
    grpo = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())["r1_zero"]["grpo"]
    assert rec["r1_zero"]["settings"][0]["num_generations"] == grpo["num_generations"]
    for r in rec.values():
        # local jobs: no SLURM job of their own (the test's, if pytest itself runs inside one)
        assert r["slurm"]["job_id"] == os.environ.get("SLURM_JOB_ID") and r["end"] >= r["start"]


MODELS = ("base", "r1_zero", "cold_start", "reasoning_rl", "r1_sft", "r1", "distill_student", "rl_only_student")


def test_models_load_with_plain_transformers(smoke_run):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for name in (*MODELS, "student_student"):
        path = smoke_run / "results" / "models" / name
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        assert model.config.vocab_size == len(tok)
        # from the cold start on, models are chat models with the readable pattern's marker as one token
        chat = name in ("cold_start", "reasoning_rl", "r1_sft", "r1", "distill_student")
        assert bool(tok.chat_template) == chat, name
        assert (len(tok("|special_token|", add_special_tokens=False)["input_ids"]) == 1) == chat, name
    for aspect in ("helpfulness", "harmlessness"):
        rm = AutoModelForSequenceClassification.from_pretrained(smoke_run / "results" / "models" / f"rm_{aspect}")
        assert rm.config.num_labels == 1


def test_r1_pipeline_artifacts(smoke_run):
    """SFT data in the conversational layout Hugging Face tooling reads; the readable pattern in it."""
    r = smoke_run / "results"
    cold = pd.read_parquet(r / "data" / "sft" / "cold_start.parquet")
    assert len(cold) > 0 and set(cold["source"]) <= {"few_shot", "r1_zero", "annotated"}
    for msgs in cold["messages"]:
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert msgs[1]["content"].count("|special_token|") == 2 and "\\boxed{" in msgs[1]["content"]
    nr = pd.read_parquet(r / "data" / "sft" / "non_reasoning.parquet")
    assert len(nr) == 20 and all(m[-1]["role"] == "assistant" for m in nr["messages"])
    pairs = pd.read_parquet(r / "data" / "preferences.parquet")
    assert {"prompt", "chosen", "rejected"} <= set(pairs.columns)
    sft = pd.read_csv(r / "r1_sft" / "sft_metrics.csv")
    assert len(sft) >= 1 and (sft["loss"] > 0).all()
    m = pd.read_csv(r / "r1" / "metrics.csv")  # RL for all scenarios: reward models scored general prompts
    assert {"reward/helpfulness_mean", "reward/harmlessness_mean", "reward/accuracy_mean"} <= set(m.columns)


def test_changing_one_stage_reruns_it_and_what_follows_only(smoke_run, tmp_path):
    wd = tmp_path / "w"
    shutil.copytree(smoke_run, wd)
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["r1"]["final_sft"]["learning_rate"] = 0.0005
    conf = tmp_path / "changed.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    p = snakemake(wd, "-n", "--quiet", "rules", config=str(conf))
    planned = {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+$", p.stdout, re.MULTILINE)} - {"total"}
    assert {"final_sft", "r1", "evaluate", "benchmark_table"} <= planned
    assert not planned & {"tasks", "base_model", "r1_zero", "cold_start_data", "cold_start_sft", "reasoning_rl",
                          "rejection_sampling", "distill", "rl_only", "reward_model", "preferences"}


def test_invalid_config_fails_before_any_job(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["r1_zero"]["grpo"]["epsilon"] = "wide"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    p = snakemake(tmp_path, config=str(bad), check=False)
    assert p.returncode != 0
    assert "config key 'r1_zero.grpo.epsilon': expected number, got 'wide'" in p.stdout + p.stderr
    assert not (tmp_path / "results").exists()


def test_corrupt_artifact_stops_the_rule(smoke_run, tmp_path):
    wd = tmp_path / "w"
    shutil.copytree(smoke_run, wd, ignore=shutil.ignore_patterns(".snakemake"))
    test = wd / "results" / "data" / "tasks" / "test.parquet"
    df = pd.read_parquet(test)
    df.loc[[0, 3], "difficulty"] = -5
    df.to_parquet(test)
    out = wd / "results" / "eval" / "base" / "held_out" / "summary.csv"
    out.unlink()
    p = snakemake(wd, str(out.relative_to(wd)), "--forcerun", "evaluate", check=False)
    log = p.stdout + p.stderr + (wd / "results" / "logs" / "evaluate_base_held_out.log").read_text()
    assert p.returncode != 0
    assert "test.parquet: does not match schema 'tasks'" in log
    assert "column 'difficulty' failed check 'greater_than_or_equal_to(0)' on 2 row(s)" in log
    assert "row 3:" in log
    assert not out.exists()


def test_killed_training_resumes_on_rerun(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["r1_zero"]["grpo"].update(steps=400, save_every=5, eval_every=0)
    conf = tmp_path / "long.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    target = "results/r1_zero/metrics.csv"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(conf), "--cores", "2", target]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / "results" / "state" / "r1_zero" / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a node failure would
    proc.wait()
    assert not (tmp_path / target).exists()
    snakemake(tmp_path, "--unlock", config=str(conf))  # a killed Snakemake leaves its lock behind
    snakemake(tmp_path, target, "--rerun-incomplete", config=str(conf))
    log = (tmp_path / "results" / "logs" / "r1_zero.log").read_text()
    assert "resuming from step" in log
    m = pd.read_csv(tmp_path / target)
    assert m["step"].tolist() == list(range(1, 401))


def test_one_benchmark_is_rerun_alone(smoke_run, tmp_path):
    """A second benchmark added, then its settings changed: only its jobs run, held_out is untouched."""
    wd = tmp_path / "w"
    shutil.copytree(smoke_run, wd)
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["evaluation"]["benchmarks"]["mini"] = {"loader": "gsm8k", "path": str(ROOT / "tests" / "data" / "gsm8k_mini.jsonl"),
                                              "template": "table1", "n": 2, "max_new_tokens": 8}
    conf = tmp_path / "two.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    held_out = wd / "results" / "eval" / "base" / "held_out" / "samples.parquet"
    before = held_out.stat().st_mtime_ns
    target = "results/eval/base/mini/samples.parquet"
    snakemake(wd, target, config=str(conf))
    s = pd.read_parquet(wd / target)
    assert len(s) == 3 * 2 and sorted(set(s["problem_id"])) == ["0", "1", "2"]
    assert s.groupby("problem_id").size().tolist() == [2, 2, 2]
    cfg["evaluation"]["benchmarks"]["mini"]["n"] = 3
    conf.write_text(yaml.safe_dump(cfg))
    p = snakemake(wd, target, config=str(conf))
    assert len(pd.read_parquet(wd / target)) == 3 * 3
    assert held_out.stat().st_mtime_ns == before
    assert "evaluate_base_held_out" not in p.stdout + p.stderr


def test_k_larger_than_n_is_a_config_error(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["evaluation"]["benchmarks"]["held_out"]["cons_at_k"] = 64
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    p = snakemake(tmp_path, config=str(bad), check=False)
    assert p.returncode != 0
    assert "config key 'evaluation.benchmarks.held_out': " in p.stdout + p.stderr
    assert "k=64 asked but only n=2 samples per problem are generated" in p.stdout + p.stderr
