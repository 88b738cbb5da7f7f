# Helpers of the rules, and the only functions of the workflow: config validation, result paths, the job
# command of every rule (job) and the settings it passes, resources, models and benchmarks.
import json
import os
import re
import shlex
import sys

sys.path.insert(0, str(Path(workflow.basedir)))  # the r1flow package, when not pip-installed
from r1flow.config import (ConfigError, check_model_sources, check_placement, check_time_limit, gpus_per_node,
                           stage_settings, validate_config)
from r1flow.evaluation.benchmarks import BenchmarkSpec

# Fails here, before any job runs, naming the key and what was expected.
SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
validate_config(config, SCHEMA)
# --configfile merges over the embedded default; `name: null` is how a config drops an inherited benchmark
config["evaluation"]["benchmarks"] = {k: v for k, v in config["evaluation"]["benchmarks"].items() if v is not None}
if not config["evaluation"]["benchmarks"]:
    raise ConfigError("config key 'evaluation.benchmarks': no benchmark left to evaluate")
for _name, _spec in config["evaluation"]["benchmarks"].items():
    try:  # e.g. cons@64 asked with n = 16 samples: an error now, not a silently smaller k later
        BenchmarkSpec.from_config(_name, _spec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config key 'evaluation.benchmarks.{_name}': {e}") from None

# Every model named from outside the DAG (a folder, a GGUF file in one, a hub id) must be loadable: a hub id
# neither cached nor reachable (offline), a missing or unsupported GGUF, or a tokenizer without the chat
# template a stage needs stops the run here, naming the config key, before any job starts. Not on a dry
# run, which plans (e.g. a cluster run) on a machine that may not hold the models.
onstart:
    check_model_sources(config)

RESULTS = config["results"]
SCRIPTS = str(Path(workflow.basedir) / "scripts")
# Jobs run with Snakemake's own interpreter, unless conda envs are deployed (then the env's python).
_sdm = {str(m).lower() for m in getattr(workflow.deployment_settings, "deployment_method", ())}
PYTHON = "python" if any("conda" in m for m in _sdm) else sys.executable
# Every job's command runs under this wrapper, which writes its provenance record (r1flow.provenance:
# code version, settings, input hashes, software, host and SLURM allocation) when the command succeeds.
PROVENANCE = f"{PYTHON} {SCRIPTS}/provenance.py"


def res(*parts):
    return str(Path(RESULTS, *parts))


def provenance(job):
    """Where a job's provenance record goes: results/provenance/<job>.json, a declared output."""
    return res("provenance", f"{job}.json")


def job_resources(rule_name, **defaults):
    """A rule's resources: its defaults, overridden by config `resources.<rule>` (except `threads`).
    Keys pass straight to Snakemake and its executor; the SLURM plugin maps slurm_partition, runtime,
    mem_mb, cpus_per_task, gpu / gpu_model (--gpus), gres (--gres), nodes, tasks, constraint, qos and
    slurm_extra to sbatch options."""
    own = {k: v for k, v in config["resources"].get(rule_name, {}).items() if k != "threads"}
    nodes = int(own.get("nodes") or 1)
    if nodes > 1:
        # one launcher per node from the batch step (scripts/launch_nodes.py): the executor's MPI path runs
        # the rule there, with one task per node (and no --ntasks-per-gpu, which `tasks` means on GPU jobs)
        own = {"mpi": "srun", "tasks": nodes, "tasks_per_gpu": 0, **own}
    return {**defaults, **own}


_STAGES = {}


def stage(name):
    """A stage's own generation and deepspeed settings: the top-level sections with `stages.<name>`
    merged over them (r1flow.config.stage_settings), computed and validated once per stage."""
    if name not in _STAGES:
        _STAGES[name] = stage_settings(config, name, SCHEMA)
    return _STAGES[name]


def launcher(name):
    """How stage `name`'s training script starts: the plain interpreter, or torchrun with one rank per
    device when its deepspeed settings are enabled (each rank then builds the DeepSpeed engine; see
    r1flow.training.engine)."""
    ds = stage(name)["deepspeed"]
    r = job_resources(name)
    nodes = int(r.get("nodes") or 1)
    if not ds["enabled"]:
        if nodes > 1:
            raise ConfigError(f"config key 'resources.{name}.nodes': {nodes} nodes, but stage {name} trains in one "
                              f"process (its deepspeed settings are off); enable training.deepspeed (or "
                              f"stages.{name}.deepspeed) or set resources.{name}.nodes to 1")
        return PYTHON
    env = "env DS_ACCELERATOR=cpu " if ds["accelerator"] == "cpu" else ""
    if nodes > 1:  # one torchrun per node through srun, rendezvous on the allocation's first node
        opts = f"--nodes {nodes} --nproc-per-node {ds['nproc_per_node']}"
        if r.get("cpus_per_task"):
            opts += f" --cpus-per-task {r['cpus_per_task']}"
        if gpus_per_node(r):
            opts += f" --gpus-per-node {gpus_per_node(r)}"
        return f"{env}{PYTHON} {SCRIPTS}/launch_nodes.py {opts} --"
    return f"{env}{PYTHON} -m torch.distributed.run --standalone --nproc_per_node {ds['nproc_per_node']}"


# The conda env file of every job, by what it runs ("train": data, pretraining, SFT and reward models;
# "grpo"; "generate": sampling without training; "eval": tables and plots) and, for "grpo" and "generate",
# by its stage's generation backend.
def conda_env(kind, name=None):
    """The env file (relative to workflow/rules) of a kind of job. Only the stage's generation.backend
    chooses, as vLLM pins its own torch; under vllm GRPO gets train-vllm.yaml (vLLM and DeepSpeed on that
    torch) and sampling generate-vllm.yaml. deepspeed does not choose, as train.yaml carries DeepSpeed too
    (train.post-deploy.sh)."""
    vllm = kind in ("grpo", "generate") and stage(name)["generation"]["backend"] == "vllm"
    env = {"train": "train", "eval": "eval", "grpo": "train-vllm" if vllm else "train",
           "generate": "generate-vllm" if vllm else "generate"}[kind]
    path = Path(workflow.basedir) / "envs" / f"{env}.yaml"
    if vllm and "vllm==" not in path.read_text():
        raise ConfigError(f"config key 'generation.backend' of stage {name}: vllm, but {path.name} installs no vllm")
    return f"../../envs/{env}.yaml"


def model_settings(uses, name):
    """What stage `name`, which runs a model, is given, in this one place so that no stage drops one:
    every such stage runs on the config's `device` (resolved in the job: r1flow.models.resolve_device);
    every model it loads is in base_model.dtype, except the tiny base's pretraining from scratch
    ("pretrain", float32); a stage that samples ("generate") gets its own generation settings; one that
    trains through r1flow.training.engine ("train": GRPO, SFT, reward models) its own deepspeed settings
    (stage()) and starts under launcher(), and with config `tracking` on, its tracking run (job() puts the
    job's name in)."""
    out = {"device": config["device"]}
    if "pretrain" in uses:
        return out
    out["dtype"] = config["base_model"]["dtype"]
    if "generate" in uses:
        out["generation"] = stage(name)["generation"]
    if "train" in uses:
        out["deepspeed"] = stage(name)["deepspeed"]
        if config["tracking"]["backends"]:  # only then, so that the default's commands have no tracking
            out["tracking"] = tracking_settings()
    return out


# The job's name in its tracking settings, filled in by job() once the job (its wildcards) is known.
JOB_NAME = "{job}"


def tracking_settings():
    """A training job's tracking settings (r1flow.training.tracking): the run <results folder name>/<job>
    in results/tracking/<job>."""
    t = config["tracking"]
    return {"backends": t["backends"], "project": t["project"], "run_name": f"{Path(RESULTS).name}/{JOB_NAME}",
            "dir": res("tracking", JOB_NAME)}


def job_tracking(tracking, name):
    """Tracking settings with job `name` in place of JOB_NAME."""
    return {k: v.replace(JOB_NAME, name) if isinstance(v, str) else v for k, v in tracking.items()}


# -- the GPU memory plan (memory_plan; r1flow.training.memory_plan) -------------------------------------
# What each stage is to the plan, and the config section its settings come from (named in a refusal).
PLAN_KINDS = {"r1_zero": ("grpo", "r1_zero.grpo"), "reasoning_rl": ("grpo", "r1.reasoning_rl"),
              "r1": ("grpo", "r1.rl_all.grpo"), "rl_only": ("grpo", "distillation.rl_only"),
              "cold_start_sft": ("sft", "r1.sft"), "final_sft": ("sft", "r1.final_sft"),
              "distill": ("sft", "distillation.sft"), "reward_model": ("reward_model", "r1.reward_models.train"),
              "evaluate": ("evaluation", "evaluation"), "cold_start_data": ("sampling", "r1.cold_start"),
              "rejection_sampling": ("sampling", "r1.rejection_sampling")}


def memory_plan_applies():
    enabled = config["memory_plan"]["enabled"]
    return config["device"].startswith("cuda") if enabled is None else enabled


def origin_model(path):
    """The model outside the DAG (hub id or folder) whose shape a model of the DAG has: a student's
    stages that of the student, every other stage that of the base model (fine-tuning keeps the shape)."""
    models = res("models") + os.sep
    if not str(path).startswith(models):
        return str(path)
    name = str(path)[len(models):]
    for s, spec in config["distillation"]["students"].items():
        if name in (f"student_{s}", f"distill_{s}", f"rl_only_{s}"):
            return spec["path"]
    return config["base_model"]["path"]


def check_memory_plan(name, values):
    """Refuse a job whose planned peak GPU memory exceeds its GPU (memory_plan.gpu_memory_gib), naming
    the setting to change and the largest value that fits; a model of unknown shape is not planned."""
    from r1flow.training.memory_plan import model_shape, require_fits

    kind, prefix = PLAN_KINDS[name]
    model = values.get("base") if name == "reward_model" else values.get("model")
    reward_shapes = None
    if name == "r1":  # the reward models score on every rank beside the policy (section 2.3.4)
        rm = config["r1"]["reward_models"]
        base = rm["base"]["path"] or config["base_model"]["path"]
        reward_shapes = {a: model_shape(origin_model(rm[f"{a}_path"] or base)) for a in ("helpfulness", "harmlessness")}
    try:
        require_fits(name, kind, values, model_shape(origin_model(model)), config["memory_plan"]["gpu_memory_gib"],
                     prefix, reward_shapes=reward_shapes, nodes=int(job_resources(name).get("nodes") or 1))
    except ConfigError as e:
        # generation settings are the stage's own: name the key where this stage's override goes
        raise ConfigError(re.sub(r"(?<![\w.])generation\.vllm\.", f"stages.{name}.generation.vllm.", str(e))) from None


def _arg(value):
    """A setting on the command line: a string as is, anything else (a config subtree) as JSON."""
    return shlex.quote(value if isinstance(value, str) else json.dumps(value, sort_keys=True))


# Every rule's shell: the command its `command` param builds (see job), its output also in the log.
JOB = "{params.command} 2>&1 | tee {log}"


def job(script, settings=None, files="", model=None, stage=None):
    """A rule's params (`command`, and `settings` to rerun the job when one changes), the one place that
    writes a job's command line: the provenance wrapper (its record named after output.provenance, with
    every setting), the launcher, scripts/<script>, each
    setting as --key VALUE, then `files`, a template of {input.x}, {output.x}, {wildcards.x}, {threads},
    {job} (the job's name) and {state} (its resumable state, outside the declared outputs).
    A setting may be a function of the wildcards; True is a bare flag, None leaves the option out.
    `model`, for a script that runs a model, says how (model_settings) and `stage` whose settings it takes
    (the rule's name); "train" starts it under launcher(stage)."""
    if model is not None and stage is None:
        raise ValueError(f"job({script!r}): a job that runs a model names its stage (its rule)")
    own = {**(settings or {}), **(model_settings(model, stage) if model is not None else {})}
    launch = launcher(stage) if model and "train" in model else PYTHON

    def placed():
        """Checked when the job is planned (Snakemake evaluates params then, before submitting anything)."""
        if model is None:
            return
        ranks = 1
        if "train" in model and own["deepspeed"]["enabled"]:
            ranks = own["deepspeed"]["nproc_per_node"]
        if "generate" in model and own["generation"]["backend"] == "vllm":
            ranks = max(ranks, own["generation"]["vllm"]["tensor_parallel_size"])
        if int(job_resources(stage).get("nodes") or 1) > 1 and not ("train" in model and own["deepspeed"]["enabled"]):
            raise ConfigError(f"config key 'resources.{stage}.nodes': only training under DeepSpeed spans nodes "
                              f"(one torchrun per node); stage {stage} runs in one process: set it to 1")
        check_placement(stage, job_resources(stage), ranks, config["device"], config["resources"])
        # a GRPO or SFT job with a time limit reaches a checkpoint before it (save_every_minutes)
        if PLAN_KINDS.get(stage, (None,))[0] in ("grpo", "sft"):
            check_time_limit(stage, PLAN_KINDS[stage][1], own.get("grpo") or own["settings"], job_resources(stage))

    def planned(values):
        """The job's GPU memory plan against its GPU, when it runs on CUDA (memory_plan)."""
        if model is None or "pretrain" in model or not memory_plan_applies():
            return
        check_memory_plan(stage, values)

    def resolved(wildcards):
        values = {k: v(wildcards) if callable(v) else v for k, v in own.items()}
        return {k: v for k, v in values.items() if v is not None}

    def recorded_settings(wildcards):
        return " ".join(_arg(v) for v in resolved(wildcards).values() if v is not True)

    def command(wildcards, input, output, threads):
        placed()
        values = resolved(wildcards)
        planned(values)
        recorded = recorded_settings(wildcards)
        name = Path(output.provenance).stem
        record = f"--record {output.provenance} --rule {name} --settings {recorded} --inputs {input} --outputs {output}"
        if "tracking" in values:  # the job's run (config `tracking`), named in its provenance record too
            values["tracking"] = job_tracking(values["tracking"], name)
            record += f" --tracking {_arg(values['tracking'])}"
        args = " ".join(f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {_arg(v)}"
                        for k, v in values.items())
        paths = files.format(input=input, output=output, wildcards=wildcards, threads=threads, job=name,
                             state=res("state", name))
        return " ".join(p for p in (PROVENANCE, record, "--", launch, str(Path(SCRIPTS, script)), args, paths) if p)

    # Snakemake's params rerun trigger skips params computed from input or output: `settings` carries them
    return {"command": command, "settings": recorded_settings}


# The file arguments of the training scripts, the same for every GRPO stage and every SFT stage.
GRPO_FILES = ("--train {input.train} --validation {input.validation} --state {state} --out-model {output.model}"
              " --metrics {output.metrics} --validation-curve {output.validation_curve} --stage {job} --threads {threads}")
SFT_FILES = ("--data {input.data} --state {state} --out {output.model} --metrics {output.metrics} --stage {job}"
             " --threads {threads}")


def job_threads(rule_name):
    return config["resources"].get(rule_name, {}).get("threads", config["threads"])


def base_is_tiny():
    return config["base_model"]["path"] == "tiny"


def outside_model(name):
    """(path, gguf_file) of a model of the DAG that comes from outside it (a real base model, a real
    student), or None for a model the DAG builds."""
    if name == "base" and not base_is_tiny():
        return config["base_model"]["path"], config["base_model"]["gguf_file"]
    if name.startswith("student_"):
        s = config["distillation"]["students"].get(name[len("student_"):])
        if s is not None and s["path"] != "tiny":
            return s["path"], s["gguf_file"]
    return None


def model_input(name):
    """A trained model is a folder produced by a rule; an outside one is a hub id or a path (a local
    one is an input, so a changed model reruns its stages)."""
    ext = outside_model(name)
    if ext is not None:
        return ext[0] if os.path.exists(ext[0]) else []
    return res("models", name)


def model_arg(name):
    ext = outside_model(name)
    return res("models", name) if ext is None else ext[0]


def gguf_arg(name):
    """The GGUF file inside model_arg(name), for its --gguf-file setting (None: the option is left out)."""
    ext = outside_model(name)
    return None if ext is None else ext[1]


def base_model_settings(key="model"):
    """The settings that name the base model to a script: its path under `key`, and its GGUF file."""
    return {key: model_arg("base"), "gguf_file": gguf_arg("base")}


def assistant_name():
    """Who the self-cognition data says the model is (section 2.3.3)."""
    if config["assistant_name"]:
        return config["assistant_name"]
    return "r1flow-tiny" if base_is_tiny() else f"r1flow-{Path(config['base_model']['path'].rstrip('/')).name}"


def preference_settings():
    return {**config["r1"]["reward_models"]["pairs"], "assistant_name": assistant_name()}


def reward_model_base_settings():
    """The causal LM the reward models start from: r1.reward_models.base, else the base model."""
    b = config["r1"]["reward_models"]["base"]
    if b["path"]:
        return {"base": b["path"], "gguf_file": b["gguf_file"]}
    return base_model_settings("base")


def reward_model_base_input():
    b = config["r1"]["reward_models"]["base"]
    if b["path"]:
        return b["path"] if os.path.exists(b["path"]) else []
    return model_input("base")


# -- R1 (section 2.3) and distillation (section 2.4) ---------------------------------------------------
STUDENTS = list(config["distillation"]["students"])


def rewards_with_models():
    """The rewards section with the reward models' folders filled in (trained here unless configured)."""
    opts = json.loads(json.dumps(config["rewards"]))
    for aspect in ("helpfulness", "harmlessness"):
        opts[aspect]["path"] = config["r1"]["reward_models"][f"{aspect}_path"] or res("models", f"rm_{aspect}")
    return opts


def reward_model_inputs(wildcards):
    return [res("models", f"rm_{a}") for a in ("helpfulness", "harmlessness")
            if not config["r1"]["reward_models"][f"{a}_path"]]


def tiny_student_allowed(wildcards):
    """An input function of student_base (so it runs only when a tiny student is needed): under
    data.source "files" a tiny student would be pretrained on the synthetic corpus, unrelated to the
    prompts, so the student must then be a real model."""
    if config["data"]["source"] == "files":
        raise ConfigError(f"config key 'distillation.students.{wildcards.student}.path': \"tiny\" pretrains on the "
                          "synthetic corpus, but data.source is \"files\": give a real model (hub id, folder or GGUF)")
    return []


def tiny_student_tokenizer():
    """A tiny student reads the tiny base's tokenizer (the distillation data then tokenizes as the
    teacher's does); with a real base it trains its own, as the embedded base does."""
    return res("models", "base") if base_is_tiny() else None


def tiny_student_tokenizer_input(wildcards):
    return tiny_student_tokenizer() or []


def student_tiny(wildcards):
    """A tiny student is built like the embedded base, with the student's own sizes."""
    return {**config["base_model"]["tiny"], **config["distillation"]["students"][wildcards.student]["tiny"]}


def student_model(wildcards):
    return model_arg(f"student_{wildcards.student}")


def student_gguf(wildcards):
    return gguf_arg(f"student_{wildcards.student}")


def student_input(wildcards):
    """A tiny student is built by a rule (student_base); a real one is a hub id or a path, never pretrained."""
    return model_input(f"student_{wildcards.student}")


# -- evaluation (section 3) ----------------------------------------------------------------------------
EVAL_MODELS = list(config["evaluation"]["models"]) + list(config["evaluation"]["external_models"])
BENCHMARKS = list(config["evaluation"]["benchmarks"])
# Models before the cold start answer in the config's `template` (Table 1); from the cold start on they
# are chat models answering in the readable pattern (section 2.3.1). A benchmark whose template is "model" uses each
# model's own style, so base, R1-Zero, R1 and the students can share one held-out table.
CHAT_STAGES = ("cold_start", "reasoning_rl", "r1_sft", "r1")


def external_model(name):
    return config["evaluation"]["external_models"].get(name)


def eval_model_input(wildcards):
    ext = external_model(wildcards.model)
    if ext is not None:
        return ext["path"] if os.path.exists(ext["path"]) else []  # a local model is an input; a hub id is not
    return model_input(wildcards.model)


def is_chat_model(name):
    ext = external_model(name)
    if ext is not None:
        return bool(ext.get("chat"))
    return name in CHAT_STAGES or name.startswith("distill_")


def eval_model(wildcards):
    ext = external_model(wildcards.model)
    return model_arg(wildcards.model) if ext is None else ext["path"]


def eval_gguf_file(wildcards):
    ext = external_model(wildcards.model)
    return gguf_arg(wildcards.model) if ext is None else ext.get("gguf_file") or None


def eval_chat(wildcards):
    return is_chat_model(wildcards.model) or None


def benchmark_spec(wildcards):
    spec = dict(config["evaluation"]["benchmarks"][wildcards.benchmark])
    if spec.get("template") == "model":
        if external_model(wildcards.model) is not None:
            spec["template"] = "math"
        elif is_chat_model(wildcards.model):
            spec["template"] = "plain"
            spec["format_reward"] = spec.get("format_reward") or "format_readable"
        else:
            spec["template"] = config["template"]  # the prompt R1-Zero was trained with (Table 1 by default)
    return spec


def sampling_settings():
    """The evaluation settings every benchmark shares, without the lists of models and benchmarks: a
    job's params then change only when something it uses changes, so adding or editing one benchmark
    reruns that benchmark alone."""
    return {k: v for k, v in config["evaluation"].items() if k not in ("models", "external_models", "benchmarks")}


def benchmark_data(wildcards):
    """The held-out test split (loader "tasks", synthetic or files) is built by the `tasks` rule; a local
    benchmark file is an input."""
    spec = config["evaluation"]["benchmarks"][wildcards.benchmark]
    if spec["loader"] in ("tasks", "synthetic"):
        return rules.tasks.output.test
    path = spec.get("path")
    return path if path and os.path.exists(path) else []


def benchmark_data_arg(wildcards):
    return benchmark_data(wildcards) or None


def named_paths(paths):
    """{name: path} as `name=path ...`, how stage_curves.py takes its curves."""
    return " ".join(f"{k}={v}" for k, v in paths.items())


# -- decontamination (data.decontamination) ------------------------------------------------------------
def benchmark_files():
    """{benchmark: its data file} of every benchmark read from a file: the held-out test split of the
    `tasks` rule or a local file (benchmark_data); a hub benchmark has none and is read by the job. Called
    when the decontamination rule is defined, after the tasks rule."""
    from types import SimpleNamespace

    files = {name: benchmark_data(SimpleNamespace(benchmark=name)) for name in BENCHMARKS}
    return {name: str(path) for name, path in files.items() if path}


def decontamination_drops():
    return config["data"]["decontamination"]["drop"]


def train_prompts():
    """The train split the RL and sampling stages read: the tasks rule's, or, with data.decontamination.drop,
    the decontamination rule's copy without the prompts that overlap a benchmark. Called at rule definition
    time, by rules included after data.smk and decontamination.smk. Not used by base_model and student_base
    (base.smk, distill.smk), which read the validation and test splits only to hold them out of the
    pretraining corpus, nor by evaluate (eval.smk), which reads the benchmarks themselves."""
    return rules.decontamination.output.train if decontamination_drops() else rules.tasks.output.train


def validation_prompts():
    """The validation split, as train_prompts."""
    return rules.decontamination.output.validation if decontamination_drops() else rules.tasks.output.validation
