"""The conda env files: each one's pip section resolves against the package registry (pip's resolver,
nothing installed, no wheel downloaded), and each rule gets the env its configuration needs (under the vllm
backend, vLLM for every rule that samples and vLLM with DeepSpeed for every GRPO rule)."""

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
ENVS = sorted((ROOT / "envs").glob("*.yaml"))

# The resolver: pip 26.3 with fast-deps reads each wheel's METADATA by HTTP range requests and, under
# --dry-run, downloads no wheel (pip 23.2 downloads every wheel in full, some GB for torch and vLLM's CUDA
# libraries; PyPI as reached here serves no PEP 658 metadata files).
RESOLVER_PIP = "pip==26.3"
# Only wheels, except these, which have no wheel: pip builds their metadata from the sdist (a few seconds,
# no compiler; deepspeed's ops are JIT-built at run time, not at install).
SDIST_ONLY = ("deepspeed", "connection_pool")  # connection_pool: a requirement of snakemake
# More than this downloaded means fast-deps fell back to whole wheels (an index without range requests).
MAX_DOWNLOAD_MB = 50

# Rules by what they run (workflow/rules/*.smk); a rule that samples or runs GRPO must be listed here.
GRPO_RULES = {"r1_zero", "reasoning_rl", "r1", "rl_only"}
GENERATING_RULES = {"cold_start_data", "rejection_sampling", "evaluate"}


def pip_section(env):
    spec = yaml.safe_load(env.read_text())
    return next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))


def python_pin(env):
    spec = yaml.safe_load(env.read_text())
    return next(d.split("=", 1)[1] for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python="))


def pinned(env):
    """{canonical name: version} of the env's own pins (`-e ../` left out)."""
    reqs = [Requirement(r) for r in pip_section(env) if not r.startswith("-e")]
    return {canonicalize_name(r.name): str(r.specifier).removeprefix("==") for r in reqs}


def project_requirements():
    """What `-e ../` brings into an env: the project's own requirements (the project is not built)."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def requirements(env):
    return [r for r in pip_section(env) if not r.startswith("-e")] + project_requirements()


# -- the pins against the project's own requirements (offline) -------------------------------------------
@pytest.mark.parametrize("env", ENVS, ids=lambda e: e.stem)
def test_project_requirements_admit_the_env_pins(env):
    """`-e ../` installs r1flow with its requirements: each must admit the env's pin of the same package."""
    pins = pinned(env)
    refused = []
    for r in map(Requirement, project_requirements()):
        pin = pins.get(canonicalize_name(r.name))
        if pin is not None and not r.specifier.contains(pin, prereleases=True):
            refused.append(f"pyproject.toml's {r} excludes {env.name}'s {r.name}=={pin}")
    assert refused == []


# -- the pins against the registry ------------------------------------------------------------------------
def registry_env():
    """pip's environment without this machine's own settings: its config files (a local cap on torch, local
    indexes) and local wheel folders are not the registry; an index set in the environment still applies."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


@pytest.fixture(scope="module")
def resolver(tmp_path_factory):
    """PYTHONPATH of the resolver pip; skips when the registry cannot be reached (fetching it is the probe)."""
    wd = tmp_path_factory.mktemp("resolver")
    probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "20",
                            "-d", str(wd / "wheel"), RESOLVER_PIP], capture_output=True, text=True, env=registry_env(),
                           timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"package registry unreachable (pip download {RESOLVER_PIP} failed): "
                    + " | ".join((probe.stdout + probe.stderr).strip().splitlines()[-2:]))
    wheel = next((wd / "wheel").glob("pip-*.whl"))
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(wd / "pip"),
                        str(wheel)], capture_output=True, text=True, env=registry_env(), timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return str(wd / "pip")


@pytest.fixture(scope="module")
def resolutions(resolver, tmp_path_factory):
    """Every env's resolution, started together (they wait on the network, not on the 2 cores):
    {env stem: (process, report path, log path, start time)}."""
    wd = tmp_path_factory.mktemp("resolve")
    env = {**registry_env(), "PYTHONPATH": resolver}
    started = {}
    for e in ENVS:
        req = wd / f"{e.stem}.txt"
        req.write_text("\n".join(requirements(e)) + "\n")
        report, log = wd / f"{e.stem}.json", wd / f"{e.stem}.log"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--use-feature=fast-deps",
               "--only-binary=:all:", f"--no-binary={','.join(SDIST_ONLY)}", "--report", str(report), "-r", str(req)]
        started[e.stem] = (subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env), report, log,
                           time.monotonic())
    yield started
    for proc, *_ in started.values():
        if proc.poll() is None:
            proc.kill()


def downloaded_mb(log_text):
    sizes = re.findall(r"Downloading \S+ \(([\d.]+) (kB|MB|GB)\)", log_text)
    return sum(float(n) * {"kB": 1e-3, "MB": 1, "GB": 1e3}[u] for n, u in sizes)


@pytest.mark.parametrize("env", ENVS, ids=lambda e: e.stem)
def test_env_resolves_against_the_registry(env, resolutions):
    """pip resolves the env's pins with the project's own requirements; an impossible pin fails here, with
    pip's account of the conflict."""
    want = python_pin(env)
    if f"{sys.version_info.major}.{sys.version_info.minor}" != want:
        pytest.skip(f"{env.name} is for Python {want}; markers would be evaluated for {sys.version.split()[0]}")
    proc, report, log, start = resolutions[env.stem]
    rc = proc.wait(timeout=900)
    text = log.read_text()
    print(f"{env.name}: resolved in {time.monotonic() - start:.0f} s (all envs resolving at once)")
    assert rc == 0, f"{env.name} does not resolve:\n" + "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith(("Collecting", "Obtaining")))[-4000:]
    got = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    assert {k: got.get(k) for k in pinned(env)} == pinned(env)
    assert downloaded_mb(text) < MAX_DOWNLOAD_MB, "whole wheels were downloaded (no HTTP range requests?)"


# -- each rule's env ---------------------------------------------------------------------------------------
RULE_ENVS = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, ResourceSettings
root, workdir, out, *configs = sys.argv[1:]
with SnakemakeApi() as api:
    wf = api.workflow(resource_settings=ResourceSettings(), snakefile=Path(root, "Snakefile"), workdir=Path(workdir),
                      config_settings=ConfigSettings(configfiles=[Path(c) for c in configs]))._workflow
    envs = {r.name: {"env": r.conda_env and str((Path(r.snakefile).parent / r.conda_env).resolve()),
                     "job": r.shellcmd is not None} for r in wf.rules}
Path(out).write_text(json.dumps(envs))
"""


def rule_envs(wd, *settings):
    """{rule: {"env": its conda env file or None, "job": whether it runs a command}} as Snakemake parses the
    workflow under config/smoke.yaml and `settings` (no DAG is run)."""
    files = [str(ROOT / "config" / "smoke.yaml")]
    for i, s in enumerate(settings):
        files.append(str(wd / f"settings{i}.yaml"))
        Path(files[-1]).write_text(yaml.safe_dump(s))
    out = wd / "envs.json"
    p = subprocess.run([sys.executable, "-c", RULE_ENVS, str(ROOT), str(wd), str(out), *files], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


def pip_names(env_file):
    return {canonicalize_name(Requirement(r).name) for r in pip_section(Path(env_file)) if not r.startswith("-e")}


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def backend_envs(request, tmp_path_factory):
    wd = tmp_path_factory.mktemp(f"rules_{request.param}")
    return request.param, rule_envs(wd, {"generation": {"backend": request.param}})


def test_every_rule_with_a_job_has_an_env_file(backend_envs):
    _, envs = backend_envs
    assert GRPO_RULES | GENERATING_RULES <= set(envs)
    missing = {r: e["env"] for r, e in envs.items() if e["job"] and not (e["env"] and Path(e["env"]).is_file())}
    assert missing == {}
    assert {Path(e["env"]).parent for e in envs.values() if e["env"]} == {ROOT / "envs"}


def test_each_rule_gets_its_backends_env(backend_envs):
    backend, envs = backend_envs
    env_of = {r: Path(e["env"]).name for r, e in envs.items() if e["env"]}
    vllm = backend == "vllm"
    assert {env_of[r] for r in GRPO_RULES} == {"train-vllm.yaml" if vllm else "train.yaml"}
    assert {env_of[r] for r in GENERATING_RULES} == {"generate-vllm.yaml" if vllm else "generate.yaml"}
    others = {env_of[r] for r in env_of if r not in GRPO_RULES | GENERATING_RULES}
    assert others <= {"train.yaml", "eval.yaml"}  # data, pretraining, SFT, reward models, tables: no vLLM
    if vllm:
        assert all("vllm" in pip_names(envs[r]["env"]) for r in GENERATING_RULES)
        assert all({"vllm", "deepspeed"} <= pip_names(envs[r]["env"]) for r in GRPO_RULES)


def test_vllm_envs_agree_and_cpu_envs_keep_their_torch():
    """Both vLLM envs pin the same vLLM, torch and transformers (a checkpoint moves between them); the
    resolution above checks them against vLLM's own requirements. The CPU envs keep torch 2.13.0."""
    trainv, genv = pinned(ROOT / "envs" / "train-vllm.yaml"), pinned(ROOT / "envs" / "generate-vllm.yaml")
    for key in ("vllm", "torch", "transformers", "tokenizers", "numpy"):
        assert trainv[key] == genv[key], key
    assert "deepspeed" in trainv and "deepspeed" not in genv
    assert {pinned(ROOT / "envs" / f"{n}.yaml")["torch"] for n in ("train", "generate", "eval")} == {"2.13.0"}
