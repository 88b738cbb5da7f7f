"""One config tree, validated once against workflow/schemas/config.schema.yaml before any job runs.

Validation fills in the schema's defaults and turns the first violation into a message that names the
key and what was expected, e.g. `config key 'r1_zero.grpo.beta': expected number, got 'high'`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import jsonschema
import yaml


class ConfigError(ValueError):
    pass


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def _out_of_bounds(kind: str, bound, value) -> str:
    return f"expected a value {_BOUNDS[kind]} {bound}, got {value!r}"


def require_positive(key: str, value: float) -> None:
    """The schema's `exclusiveMinimum: 0` check, with its message, for callers of the Python API that
    bypass the config (e.g. a sampling temperature, which log-probs divide by)."""
    if not value > 0:
        raise ConfigError(f"config key '{key}': {_out_of_bounds('exclusiveMinimum', 0, value)}")


def _describe(err: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    v, inst = err.validator, err.instance
    if v == "type":
        what = f"expected {err.validator_value}, got {inst!r}"
    elif v == "enum":
        what = f"expected one of {err.validator_value}, got {inst!r}"
    elif v in _BOUNDS:
        what = _out_of_bounds(v, err.validator_value, inst)
    elif v == "additionalProperties":
        what = f"unknown key(s): {err.message}"
    elif v == "required":
        what = err.message
    else:
        what = err.message
    return f"config key '{key}': {what}"


def validate_config(config: dict, schema_path: str | Path) -> dict:
    """Validate in place (filling defaults) and return the config; raise ConfigError on the first problem."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [_describe(e) for e in errors[:5]]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    return config


# -- per-stage settings (`stages.<rule>`) ----------------------------------------------------------------
# Each stage that samples or trains takes the top-level `generation` and `training.deepspeed` and overrides
# what its own `stages.<rule>` section sets: a colocated GRPO engine (a third of a GPU, asleep while its
# rank trains) and an evaluation engine (a whole GPU) differ in every real run, and a second --configfile
# merges into the one tree, so a global setting made for one would reach the other.
GRPO_STAGES = ("r1_zero", "reasoning_rl", "r1", "rl_only")
SAMPLING_STAGES = ("cold_start_data", "rejection_sampling", "evaluate")
SFT_STAGES = ("cold_start_sft", "final_sft", "distill", "reward_model")
STAGE_KEYS = {"generation": ("generation",), "deepspeed": ("training", "deepspeed")}


def merged(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in key by key (nested dicts merged, anything else replaced),
    as Snakemake merges --configfile files."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _subschema(schema: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        schema = schema["properties"][key]
    return schema


def stage_settings(config: dict, stage: str, schema_path: str | Path) -> dict:
    """{"generation": ..., "deepspeed": ...} of one stage: the top-level sections with `stages.<stage>`'s
    overrides merged in, validated (and defaulted) as the top-level sections are; a violation names the
    stage's key, e.g. `config key 'stages.evaluate.generation.vllm.gpu_memory_utilization'`."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    own = (config.get("stages") or {}).get(stage) or {}
    out = {}
    for key, path in STAGE_KEYS.items():
        default = config
        for part in path:
            default = default[part]
        value = merged(default, own.get(key) or {})
        errors = sorted(_Validator(_subschema(schema, path)).iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            lines = [_describe(e).replace("config key '", f"config key 'stages.{stage}.{key}.", 1) for e in errors[:5]]
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
        out[key] = value
    return out


def gpus_per_node(resources: dict) -> int:
    """GPUs a job's resources ask for on each node: `gpu` (sbatch --gpus, per job, spread over `nodes`) or
    a `gres` of gpu[:type]:N (sbatch --gres, per node); 0 when neither asks for one."""
    nodes = int(resources.get("nodes") or 1)
    if resources.get("gpu"):
        return int(resources["gpu"]) // nodes
    parts = str(resources.get("gres") or "").split(":")
    if parts[0] == "gpu":
        return int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return 0


def check_placement(stage: str, resources: dict, ranks: int, device: str, all_resources: dict) -> None:
    """On a config that places jobs on GPUs (`all_resources`, the config's `resources`, asks for a GPU for
    some rule), a job that runs a model on CUDA (`device`) must ask for at least as many GPUs per node as
    it starts ranks (torchrun's nproc_per_node, or vLLM's tensor_parallel_size); otherwise it would queue
    for a node without them and fail there hours later, or start 8 ranks on a CPU node. A config that asks
    for no GPU anywhere runs where Snakemake runs (a GPU workstation, `--cores`): nothing to check."""
    if not device.startswith("cuda") or not any(gpus_per_node(r) for r in all_resources.values()):
        return
    have = gpus_per_node(resources)
    if have < ranks:
        raise ConfigError(f"config key 'resources.{stage}': the job runs a model on {device} with {ranks} rank(s) "
                          f"per node but asks for {have} GPU(s) per node; set resources.{stage}.gpu (or gres: "
                          f"\"gpu:{ranks}\") to at least {ranks}")


def check_time_limit(stage: str, grpo_key: str, grpo: dict, resources: dict) -> None:
    """A GRPO or SFT job with a time limit (`runtime`, minutes) and time-based checkpoints must reach one before
    the limit kills it: otherwise each resubmission (profiles/slurm: retries) starts from the same
    checkpoint and dies at the same place. Steps are not timed before the job runs, so checkpoints by
    steps (save_every) alone cannot be checked here; save_every_minutes can."""
    minutes, runtime = grpo.get("save_every_minutes"), resources.get("runtime")
    if minutes is None or runtime is None:
        return
    if float(runtime) <= float(minutes):
        raise ConfigError(f"config key '{grpo_key}.save_every_minutes': {minutes} minute(s) is not shorter than "
                          f"the job's time limit (resources.{stage}.runtime: {runtime} minutes), so a job killed "
                          f"at its limit would be resubmitted without a new checkpoint, again and again; set "
                          f"{grpo_key}.save_every_minutes below {runtime} (leave room for the job's start) or "
                          f"raise resources.{stage}.runtime")


# -- model sources: checked before any job starts (the workflow's onstart) ----------------------------
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def gguf_metadata(path, key: str):
    """One string field of a GGUF file's header (e.g. general.architecture, tokenizer.chat_template),
    without reading the weights; None when absent or when the gguf package is missing."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    field = GGUFReader(str(path)).fields.get(key)
    return None if field is None or not field.data else bytes(field.parts[field.data[0]]).decode()


def gguf_supported_architectures() -> set[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # pragma: no cover - depends on the transformers version
        return set()
    return set(GGUF_SUPPORTED_ARCHITECTURES)


def _folder_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    cfg = folder / "tokenizer_config.json"
    return cfg.exists() and bool(json.loads(cfg.read_text()).get("chat_template"))


def check_model_source(key: str, path: str, gguf_file: str | None = None, needs_chat_template: bool = False,
                       base_dir: str | Path = ".") -> None:
    """Fail now, naming the config key, when a configured model cannot be loaded later: a hub id that
    is neither in the local Hugging Face cache nor reachable (offline: HF_HUB_OFFLINE=1), a missing GGUF
    file, a GGUF of an architecture transformers cannot load, or no chat template where one is needed."""
    local = Path(base_dir, path) if not Path(path).is_absolute() else Path(path)
    gguf_key = key.rsplit(".", 1)[0] + ".gguf_file" if key.endswith(".path") else key + " (gguf_file)"
    if local.exists():
        if gguf_file:
            f = local / gguf_file
            if not f.exists():
                raise ConfigError(f"config key '{gguf_key}': no GGUF file '{gguf_file}' in {path}")
            arch, supported = gguf_metadata(f, "general.architecture"), gguf_supported_architectures()
            if arch and supported and arch not in supported:
                raise ConfigError(f"config key '{gguf_key}': {f} holds a '{arch}' model, which transformers cannot "
                                  f"load from GGUF (supported: {', '.join(sorted(supported))})")
            has_template = bool(gguf_metadata(f, "tokenizer.chat_template"))
        else:
            if not (local / "config.json").exists():
                raise ConfigError(f"config key '{key}': {path} is not a model folder (no config.json)")
            has_template = _folder_chat_template(local)
        if needs_chat_template and not has_template:
            raise ConfigError(f"config key '{key}': the tokenizer of {path} has no chat template, which this "
                              "stage needs (use a chat model, or set one in its tokenizer_config.json)")
        return
    # a hub id: the files must be in the local cache, or the hub reachable
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return
    wanted = gguf_file or "config.json"
    if isinstance(try_to_load_from_cache(path, wanted), str):
        if needs_chat_template and not gguf_file:
            cfg = try_to_load_from_cache(path, "tokenizer_config.json")
            folder = Path(cfg).parent if isinstance(cfg, str) else None
            if folder is None or not _folder_chat_template(folder):
                raise ConfigError(f"config key '{key}': the tokenizer of '{path}' has no chat template, which "
                                  "this stage needs")
        return
    if _offline():
        raise ConfigError(f"config key '{key}': '{path}' is not a local path and '{wanted}' of it is not in the "
                          "Hugging Face cache, and HF_HUB_OFFLINE is set: download it first "
                          f"(huggingface-cli download {path}) or give a local folder")
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(path, timeout=10)
    except Exception as e:  # no network, a typo, a gated or private repository
        raise ConfigError(f"config key '{key}': '{path}' is not a local path, not in the Hugging Face cache, and "
                          f"the hub cannot be reached for it ({type(e).__name__}: {str(e)[:200]})") from None


def model_sources(config: dict) -> list[tuple[str, str, str | None, bool]]:
    """(config key, path, gguf_file, needs a chat template) of every model the config names from outside
    the workflow (the tiny models the workflow builds are not among them)."""
    out = []
    base = config["base_model"]
    if base["path"] != "tiny":
        out.append(("base_model.path", base["path"], base.get("gguf_file"), config.get("template") == "chat"))
    for name, s in config["distillation"]["students"].items():
        if s["path"] != "tiny":
            out.append((f"distillation.students.{name}.path", s["path"], s.get("gguf_file"), False))
    rm = config["r1"]["reward_models"]
    if (rm.get("base") or {}).get("path"):
        out.append(("r1.reward_models.base.path", rm["base"]["path"], rm["base"].get("gguf_file"), False))
    for aspect in ("helpfulness", "harmlessness"):
        if rm.get(f"{aspect}_path"):
            out.append((f"r1.reward_models.{aspect}_path", rm[f"{aspect}_path"], None, False))
    judge = config["r1"]["rejection_sampling"]["judge"]
    if judge.get("type") == "model" and judge.get("model"):
        out.append(("r1.rejection_sampling.judge.model", judge["model"], None, False))
    for name, m in config["evaluation"]["external_models"].items():
        out.append((f"evaluation.external_models.{name}.path", m["path"], m.get("gguf_file"), bool(m.get("chat"))))
    return out


def check_model_sources(config: dict, base_dir: str | Path = ".") -> None:
    for key, path, gguf_file, chat in model_sources(config):
        check_model_source(key, path, gguf_file, chat, base_dir)
