"""Every model-running job's settings as the job itself would build them, without loading a model.

`planned_jobs` plans the DAG (`snakemake -n -p`) and returns each job's command line; `job_namespace`
parses a job's arguments with the script's own argparse (its main() run until parse_args, which then
stops it); `refusals` builds from them what the script and the trainer build (GRPOConfig and its checks,
DeepSpeedSettings, the SFT and reward-model keyword arguments, the generation backend's settings, the
benchmark spec, dtype and device) and returns what the code refuses, per job."""

from __future__ import annotations

import argparse
import importlib
import inspect
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def _dry_run(workdir, configfiles, extra, print_commands: bool) -> str:
    """What `snakemake -n` (with -p, the shell commands) prints for these config files."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "-n",
           *(["-p"] if print_commands else []), "--configfile", *map(str, configfiles), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode:
        raise RuntimeError(f"snakemake -n failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def planned_commands(workdir, *configfiles, extra=()) -> dict[str, tuple[list[str], list[str]]]:
    """{job name: (provenance wrapper words, words from the launcher on)} of every job `snakemake -n -p`
    plans."""
    jobs = {}
    for line in _dry_run(workdir, configfiles, extra, True).splitlines():
        if "provenance.py --record" not in line:
            continue
        words = shlex.split(line[line.index("/"):].split(" 2>&1 | tee ")[0])
        cut = words.index("--")
        jobs[words[words.index("--rule") + 1]] = (words[:cut], words[cut + 1:])
    return jobs


def planned_jobs(workdir, *configfiles, extra=()) -> dict[str, list[str]]:
    """{job name: words from the launcher on} of every job `snakemake -n -p` plans."""
    return {job: script for job, (_, script) in planned_commands(workdir, *configfiles, extra=extra).items()}


def planned_job_resources(workdir, *configfiles, extra=()) -> dict[str, dict[str, str]]:
    """{job name: {resource: value}} of every job `snakemake -n` plans, as its dry run prints them (the
    resources Snakemake would hand the executor, the profile's defaults merged in)."""
    out = _dry_run(workdir, configfiles, extra, False)
    jobs, name, resources = {}, None, None
    for line in out.splitlines() + ["rule end:"]:
        s = line.strip()
        if s.startswith(("rule ", "localrule ")) and s.endswith(":"):
            if name is not None:
                jobs[name] = resources or {}
            name, resources = None, None
        elif s.startswith("output:") and "provenance/" in s:
            name = s.split("provenance/")[1].split(".json")[0]
        elif s.startswith("resources:"):
            resources = dict(kv.split("=", 1) for kv in s[len("resources:"):].strip().split(", "))
    return jobs


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def job_namespace(words: list[str]) -> tuple[str, argparse.Namespace, int]:
    """(script name, its parsed arguments, ranks it starts with, over all its nodes) of one job's command
    words."""
    i = next(i for i, w in enumerate(words)
             if w.endswith(".py") and Path(w).parent == SCRIPTS and Path(w).name != "launch_nodes.py")
    script, args = Path(words[i]).name, words[i + 1:]
    ranks = int(words[words.index("--nproc_per_node") + 1]) if "--nproc_per_node" in words[:i] else 1
    if "--nproc-per-node" in words[:i]:  # several nodes (scripts/launch_nodes.py): nodes x ranks per node
        ranks = int(words[words.index("--nproc-per-node") + 1]) * int(words[words.index("--nodes") + 1])
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    module = importlib.import_module(script[:-3])
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, ns=None):
        raise _Parsed(real(self, args, ns))

    argv = sys.argv
    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [words[i], *args]
    try:
        module.main()
    except _Parsed as p:
        return script, p.namespace, ranks
    finally:
        argparse.ArgumentParser.parse_args = real
        sys.argv = argv
    raise AssertionError(f"{script}: main() returned without parsing its arguments")


def _generation(a) -> None:
    from r1flow.generation import BACKENDS, VLLMGenerator

    g = getattr(a, "generation", None) or {}
    if g.get("backend", "transformers") not in BACKENDS:
        raise ValueError(f"generation.backend must be one of {BACKENDS}, got {g.get('backend')!r}")
    if g.get("backend") == "vllm":  # the engine's keyword arguments, as make_generator passes them
        inspect.signature(VLLMGenerator.__init__).bind(None, "model", None, seed=0, **g.get("vllm", {}))


def settings_of(script: str, a: argparse.Namespace, ranks: int) -> None:
    """Build what `script` builds from its arguments before its first model loads; raise what it would."""
    from r1flow.models import DTYPES, parse_device

    if hasattr(a, "device"):
        parse_device(a.device)
    if hasattr(a, "dtype"):
        DTYPES[a.dtype]
    _generation(a)
    if script == "grpo.py":
        from r1flow.training.engine import DeepSpeedSettings
        from r1flow.training.grpo import GRPOConfig, check_run

        cfg = GRPOConfig.from_dict({**a.grpo, "template": a.template, "reward_options": a.rewards})
        ds = DeepSpeedSettings.from_dict(a.deepspeed)
        check_run(cfg, a.deepspeed, a.generation, ranks if ds.enabled else 1)
    elif script == "sft.py":
        from r1flow.training.sft import train_sft

        s = a.settings  # the keys scripts/sft.py reads
        kw = {k: s[k] for k in ("epochs", "learning_rate", "batch_size", "micro_batch_size", "max_length",
                                "warmup_steps", "seed")}
        inspect.signature(train_sft).bind(None, None, [], [], **kw)
    elif script == "reward_model.py":
        from r1flow.training.reward_model import train_reward_model

        inspect.signature(train_reward_model).bind("base", None, a.aspect, a.out, dtype=a.dtype, device="cpu",
                                                   **a.settings)
    elif script == "evaluate.py":
        from r1flow.config import require_positive
        from r1flow.evaluation.benchmarks import BenchmarkSpec
        from r1flow.generation import SamplingParams

        e = a.evaluation
        spec = BenchmarkSpec.from_config(a.benchmark, {**a.spec, **({"path": a.data} if a.data else {})})
        spec.check()
        SamplingParams(spec.n, e["temperature"], e["top_p"], spec.max_new_tokens or e["max_new_tokens"])
        require_positive("evaluation.batch_size", e["batch_size"]), e["seed"]
    elif script in ("cold_start.py", "rejection_sampling.py"):
        s = a.settings
        s["samples_per_prompt"], s["temperature"], s["max_new_tokens"], s["seed"]


def refusals(jobs: dict[str, list[str]]) -> dict[str, str]:
    """{job: what the code refuses} over the model-running jobs (those given --dtype or --device)."""
    out = {}
    for job, words in jobs.items():
        if "--dtype" not in words and "--device" not in words:
            continue
        try:
            settings_of(*job_namespace(words))
        except (ValueError, TypeError, KeyError, SystemExit) as e:  # ConfigError is a ValueError; SystemExit: argparse
            out[job] = f"{type(e).__name__}: {e}"
    return out
