# Helpers shared by the rules: config validation, result paths, settings passed to scripts, resources.
import json
import shlex
import sys

sys.path.insert(0, str(Path(workflow.basedir)))  # the r1flow package, when not pip-installed
from r1flow.config import ConfigError, validate_config
from r1flow.evaluation.benchmarks import BenchmarkSpec

# Fails here, before any job runs, naming the key and what was expected.
validate_config(config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml")
# --configfile merges over the embedded default; `name: null` is how a config drops an inherited benchmark
config["evaluation"]["benchmarks"] = {k: v for k, v in config["evaluation"]["benchmarks"].items() if v is not None}
if not config["evaluation"]["benchmarks"]:
    raise ConfigError("config key 'evaluation.benchmarks': no benchmark left to evaluate")
for _name, _spec in config["evaluation"]["benchmarks"].items():
    try:  # e.g. cons@64 asked with n = 16 samples: an error now, not a silently smaller k later
        BenchmarkSpec.from_config(_name, _spec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config key 'evaluation.benchmarks.{_name}': {e}") from None

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


def settings(*keys):
    """A config subtree as a shell-quoted JSON argument; as a param it also triggers reruns on change."""
    node = config
    for k in keys:
        node = node[k]
    return shlex.quote(json.dumps(node, sort_keys=True))


def provenance(job):
    """Where a job's provenance record goes: results/provenance/<job>.json, a declared output."""
    return res("provenance", f"{job}.json")


def job_resources(rule_name, **defaults):
    """A rule's resources: its defaults, overridden by config `resources.<rule>` (except `threads`).
    Keys pass straight to Snakemake and its executor; the SLURM plugin maps slurm_partition, runtime,
    mem_mb, cpus_per_task, gpu / gpu_model (--gpus), gres (--gres), nodes, tasks, constraint, qos and
    slurm_extra to sbatch options."""
    own = {k: v for k, v in config["resources"].get(rule_name, {}).items() if k != "threads"}
    return {**defaults, **own}


def launcher():
    """How a training script starts: the plain interpreter, or torchrun with one rank per device when
    training.deepspeed is enabled (each rank then builds the DeepSpeed engine; see r1flow.training.engine)."""
    ds = config["training"]["deepspeed"]
    if not ds["enabled"]:
        return PYTHON
    env = "env DS_ACCELERATOR=cpu " if ds["accelerator"] == "cpu" else ""
    return f"{env}{PYTHON} -m torch.distributed.run --standalone --nproc_per_node {ds['nproc_per_node']}"


def job_threads(rule_name):
    return config["resources"].get(rule_name, {}).get("threads", config["threads"])


def base_is_tiny():
    return config["base_model"]["path"] == "tiny"


def model_input(name):
    """A trained model is a folder produced by a rule; an external base model is a hub id or a path."""
    if name == "base" and not base_is_tiny():
        return []
    return res("models", name)


def model_arg(name):
    if name == "base" and not base_is_tiny():
        return config["base_model"]["path"]
    return res("models", name)
