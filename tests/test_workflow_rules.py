"""Every rule that runs a model is given the model settings (device, dtype, generation backend, DeepSpeed) by
common.smk's job(): the smoke DAG planned with non-default settings, each job's printed command checked."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers.job_settings import planned_commands

ROOT = Path(__file__).resolve().parent.parent

# What each job does with a model (the job's name is its provenance record's): dtype for every model it
# loads, the generation backend where it samples, DeepSpeed (under torchrun) where GRPO, SFT or
# reward-model training trains it.
GRPO = {"device", "dtype", "generation", "deepspeed"}
SAMPLES = {"device", "dtype", "generation"}
TRAINS = {"device", "dtype", "deepspeed"}
PRETRAINS = {"device"}  # the tiny base and tiny students, pretrained from scratch in float32
MODEL_JOBS = {"r1_zero": GRPO, "reasoning_rl": GRPO, "r1": GRPO, "rl_only_student": GRPO,
              "cold_start_data": SAMPLES, "rejection_sampling": SAMPLES,
              "cold_start_sft": TRAINS, "final_sft": TRAINS, "distill_student": TRAINS,
              "reward_model_helpfulness": TRAINS, "reward_model_harmlessness": TRAINS,
              "base_model": PRETRAINS, "student_base_student": PRETRAINS}
EVALUATED = ("base", "r1_zero", "cold_start", "reasoning_rl", "r1_sft", "r1", "distill_student", "rl_only_student")
MODEL_JOBS.update({f"evaluate_{m}_held_out": SAMPLES for m in EVALUATED})
# Jobs that run no model: data, tables and plots.
OTHER_JOBS = {"tasks", "decontamination", "preferences", "non_reasoning_data", "r1_zero_report", "benchmark_table", "stage_curves"}

# "cuda:1" is planned here without a GPU: the device is resolved (and refused) in the job, not at planning
SETTINGS = {"device": "cuda:1", "base_model": {"dtype": "bfloat16"},
            "generation": {"backend": "transformers", "vllm": {"gpu_memory_utilization": 0.5}},
            "training": {"deepspeed": {"enabled": True, "accelerator": "cpu", "nproc_per_node": 2}},
            # a prompt of the user's own (config/smollm2_r1_zero.yaml's kind), and each model's own style
            "template": "Question: {prompt} Answer:", "evaluation": {"benchmarks": {"held_out": {"template": "model"}}}}


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """{job: (provenance options, launcher + script + arguments)} from `snakemake -n -p`."""
    wd = tmp_path_factory.mktemp("plan")
    extra = wd / "settings.yaml"
    extra.write_text(yaml.safe_dump(SETTINGS))
    return planned_commands(wd, ROOT / "config" / "smoke.yaml", extra)


def contains(given, subset):
    """The configured (non-default) values are in what the script got, at any depth."""
    if isinstance(subset, dict):
        return isinstance(given, dict) and all(k in given and contains(given[k], v) for k, v in subset.items())
    return given == subset


def option(words, name):
    return words[words.index(name) + 1] if name in words else None


def test_every_job_is_classified(commands):
    """A new rule must say here whether it runs a model."""
    assert set(commands) == set(MODEL_JOBS) | OTHER_JOBS


@pytest.mark.parametrize("job", sorted(MODEL_JOBS))
def test_model_settings_reach_the_script_and_its_record(commands, job):
    wrapper, script = commands[job]
    recorded = wrapper[wrapper.index("--settings") + 1:wrapper.index("--inputs")]
    assert option(script, "--device") == "cuda:1", job
    assert "cuda:1" in recorded, job
    if "dtype" in MODEL_JOBS[job]:
        assert option(script, "--dtype") == "bfloat16", job
        assert "bfloat16" in recorded, job
    else:
        assert option(script, "--dtype") is None, job
    expected = {"generation": SETTINGS["generation"], "deepspeed": SETTINGS["training"]["deepspeed"]}
    for name, subset in expected.items():
        value = option(script, f"--{name}")
        if name not in MODEL_JOBS[job]:
            assert value is None, (job, name)
            continue
        assert value is not None, (job, name)
        assert contains(json.loads(value), subset), (job, name, value)
        assert value in recorded, (job, name)
    # a trainer under DeepSpeed starts one rank per device through torchrun; nothing else does
    under_torchrun = script[:5] == ["env", "DS_ACCELERATOR=cpu", sys.executable, "-m", "torch.distributed.run"]
    assert under_torchrun == ("deepspeed" in MODEL_JOBS[job]), job


@pytest.mark.parametrize("job", sorted(OTHER_JOBS))
def test_other_jobs_get_no_model_settings(commands, job):
    _, script = commands[job]
    assert not {"--device", "--dtype", "--generation", "--deepspeed"} & set(script), job


def test_tiny_student_reads_the_base_tokenizer(commands):
    """The tiny student is pretrained with the base's tokenizer (the distillation data then tokenizes as
    the teacher's does), so its job takes the base model folder as an input and waits for it."""
    wrapper, script = commands["student_base_student"]
    assert option(script, "--tokenizer").endswith("models/base")
    inputs = wrapper[wrapper.index("--inputs") + 1:wrapper.index("--outputs")]
    assert any(p.endswith("models/base") for p in inputs)
    assert "--tokenizer" not in commands["base_model"][1]


def test_models_before_the_cold_start_are_evaluated_with_the_prompt_r1_zero_trained_on(commands):
    """Template "model": base and R1-Zero get the config's `template` (what R1-Zero's GRPO used), the
    chat models from the cold start on get their own chat template ("plain" question, `--chat`)."""
    template = SETTINGS["template"]
    assert option(commands["r1_zero"][1], "--template") == template
    for job in ("evaluate_base_held_out", "evaluate_r1_zero_held_out"):
        assert json.loads(option(commands[job][1], "--spec"))["template"] == template, job
        assert "--chat" not in commands[job][1], job
    r1 = commands["evaluate_r1_held_out"][1]
    assert json.loads(option(r1, "--spec"))["template"] == "plain" and "--chat" in r1
