"""Provenance records: for each job, what ran, on what, with which inputs and settings, and where.

Every rule runs its script through `scripts/provenance.py`, which calls `run_and_record`: it runs the
command, and only if it succeeds writes `results/provenance/<job>.json` (a declared output of the rule,
so Snakemake deletes it with the other outputs of a failed job). The record holds

- the git commit of the code (with a dirty flag), or "unknown" outside a git checkout;
- the resolved settings the rule passed to its script (the config subtrees as JSON) and their sha256;
- sha256 of every input and output (a folder: of its sorted file list with each file's sha256);
- package versions (python, torch, transformers, snakemake, r1flow, and deepspeed / vllm when present);
- the machine: CPU model, core count and the instruction sets that decide its speed (avx2, avx512,
  avx512_bf16, AMX, Arm bf16), so that a time in a record says what it was measured on;
- the host, the SLURM job id (null outside SLURM) and the resources SLURM granted, as the job sees them
  in its environment (cpus per task, partition, GPUs / CUDA_VISIBLE_DEVICES) and as the controller
  reports them (`scontrol show job`: TRES with cpu, mem and gres/gpu, time limit);
- start and end times (UTC) and the duration.
- with experiment tracking on (config `tracking`), the job's run: its name, folder, backends and project.

It is written atomically (a temporary file in the same folder, then a rename): a reader never sees half
a record.

Hashing is full by default; files above `sample_above_bytes` (1 GiB unless set) are hashed from their
size plus their first and last 16 MiB and marked "sampled", so that records of multi-GB checkpoints stay
cheap. Snakemake's own records (`--summary`, the .snakemake metadata) say which job made a file; this
says with what code, settings, software and hardware, which Snakemake does not keep.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "snakemake", "r1flow", "deepspeed", "vllm",
            "snakemake-executor-plugin-slurm")
# What SLURM granted, as a job sees it (sbatch/srun output environment variables).
SLURM_ENV = {
    "job_id": "SLURM_JOB_ID",
    "job_name": "SLURM_JOB_NAME",
    "step_id": "SLURM_STEP_ID",
    "partition": "SLURM_JOB_PARTITION",
    "nodelist": "SLURM_JOB_NODELIST",
    "num_nodes": "SLURM_JOB_NUM_NODES",
    "ntasks": "SLURM_NTASKS",
    "cpus_per_task": "SLURM_CPUS_PER_TASK",
    "cpus_on_node": "SLURM_CPUS_ON_NODE",
    "mem_per_node_mb": "SLURM_MEM_PER_NODE",
    "mem_per_cpu_mb": "SLURM_MEM_PER_CPU",
    "job_gpus": "SLURM_JOB_GPUS",
    "gpus_on_node": "SLURM_GPUS_ON_NODE",
    "step_gpus": "SLURM_STEP_GPUS",
}
CHUNK = 1 << 20
SAMPLE_BYTES = 16 << 20
DEFAULT_SAMPLE_ABOVE = 1 << 30
# Snakemake marks a finished directory output with this file after the job: not part of the artifact.
IGNORED = {".snakemake_timestamp"}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def sha256_json(obj) -> str:
    """Hash of a JSON value in canonical form (sorted keys, no spaces): equal settings, equal hash."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_file(path: str | os.PathLike, sample_above: int = DEFAULT_SAMPLE_ABOVE) -> tuple[str, str]:
    """(sha256 hex, method): "full", or "sampled" (size + first and last 16 MiB) for files above
    `sample_above` bytes."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= sample_above:
            while chunk := f.read(CHUNK):
                h.update(chunk)
            return h.hexdigest(), "full"
        h.update(f"size={size}\n".encode())
        h.update(f.read(SAMPLE_BYTES))
        f.seek(max(0, size - SAMPLE_BYTES))
        h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest(), "sampled"


def hash_path(path: str | os.PathLike, sample_above: int = DEFAULT_SAMPLE_ABOVE) -> dict:
    """A file: its hash. A folder: the hash of its sorted relative file paths with each file's hash,
    so renaming, adding, removing or changing any file changes it. Missing paths are reported, not
    hashed (an external base model given as a hub id is not a local input)."""
    p = Path(path)
    if p.is_file():
        digest, method = hash_file(p, sample_above)
        return {"type": "file", "sha256": digest, "bytes": p.stat().st_size, "method": method}
    if p.is_dir():
        h, total, n, methods = hashlib.sha256(), 0, 0, set()
        for f in sorted(x for x in p.rglob("*") if x.is_file() and x.name not in IGNORED):
            digest, method = hash_file(f, sample_above)
            rel = f.relative_to(p).as_posix()
            h.update(f"{rel}\0{digest}\n".encode())
            total, n = total + f.stat().st_size, n + 1
            methods.add(method)
        return {"type": "directory", "sha256": h.hexdigest(), "bytes": total, "files": n,
                "method": "sampled" if "sampled" in methods else "full"}
    return {"type": "missing", "sha256": None}


def git_commit(repo: str | os.PathLike) -> dict:
    """{"commit": sha or "unknown", "dirty": bool or None} of the checkout holding `repo`."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=20, check=True).stdout.strip()
        commit = run("rev-parse", "HEAD")
        # tracked files only: results/ and caches are ignored, untracked notes do not change the code
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def package_versions(names=PACKAGES) -> dict:
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def slurm_environment(env=None) -> dict:
    """The job's SLURM allocation as its environment shows it; every value is null outside SLURM."""
    env = os.environ if env is None else env
    out = {key: env.get(var) for key, var in SLURM_ENV.items()}
    out["cuda_visible_devices"] = env.get("CUDA_VISIBLE_DEVICES")
    return out


# Fields of `scontrol show job` that say what was granted (the plugin's inner srun step does not see
# every SLURM_* variable of the allocation, e.g. the memory, so the controller is asked as well).
ALLOCATION_FIELDS = {"Partition": "partition", "NumNodes": "num_nodes", "NumCPUs": "num_cpus",
                     "NumTasks": "num_tasks", "CPUs/Task": "cpus_per_task", "MinMemoryNode": "min_memory_node",
                     "MinMemoryCPU": "min_memory_cpu", "TimeLimit": "time_limit", "TresPerNode": "tres_per_node",
                     "TresPerJob": "tres_per_job", "NodeList": "node_list", "Account": "account", "QOS": "qos"}


def parse_scontrol_job(text: str) -> dict:
    """`scontrol show job -o ID` (one line of Key=Value) -> the granted resources; TRES as a dict,
    e.g. {"cpu": "1", "mem": "1500M", "node": "1", "gres/gpu": "1"}."""
    fields = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    out = {name: fields[key] for key, name in ALLOCATION_FIELDS.items() if key in fields}
    tres = fields.get("AllocTRES") or fields.get("TRES") or ""
    out["tres"] = dict(t.split("=", 1) for t in tres.split(",") if "=" in t)
    return out


def slurm_allocation(job_id: str | None) -> dict | None:
    """What the controller says job `job_id` was granted, or None (no job, no scontrol, no answer)."""
    if not job_id:
        return None
    try:
        p = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                           timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_scontrol_job(p.stdout) if p.returncode == 0 and p.stdout.strip() else None


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, then rename over the target (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# The CPU features that decide how fast (and, through their kernels, how rounded) torch runs here.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16", "sve", "asimd")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of /proc/cpuinfo ("flags" on x86, "Features" on Arm); empty where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags = set()
    for line in cpuinfo.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags |= set(line.split(":", 1)[1].split())
    return flags


def machine(cpuinfo: str | None = None) -> dict:
    """CPU model, cores and the speed-deciding instruction sets present (SPEED_FLAGS)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.split(":")[0].strip() in ("model name", "Model", "cpu model")), None)
    flags = cpu_flags(cpuinfo)
    return {"cpu": model or "unknown", "cores": os.cpu_count(),
            "cpu_flags": [f for f in SPEED_FLAGS if f in flags]}


def describe_machine(m: dict | None = None) -> str:
    """One line for a log or a table: "AMD EPYC, 2 cores, avx2 fma (no avx512_bf16 or AMX)"."""
    m = m or machine()
    flags = m["cpu_flags"]
    native = {"avx512_bf16", "amx_bf16", "bf16"} & set(flags)
    return (f"{m['cpu']}, {m['cores']} cores, {' '.join(flags) or 'no listed vector flags'}"
            + ("" if native else " (no avx512_bf16 or AMX)"))


def build_record(*, rule: str, command: list[str], settings: list, inputs: list[str], outputs: list[str],
                 start: str, end: str, duration_s: float, repo: str | os.PathLike,
                 sample_above: int = DEFAULT_SAMPLE_ABOVE, env=None, tracking: dict | None = None) -> dict:
    slurm = slurm_environment(env)
    slurm["allocation"] = slurm_allocation(slurm["job_id"])
    record = {
        "schema": "r1flow.provenance/1",
        "rule": rule,
        "command": command,
        "git": git_commit(repo),
        "settings": settings,
        "settings_sha256": sha256_json(settings),
        "inputs": {str(p): hash_path(p, sample_above) for p in inputs},
        "outputs": {str(p): hash_path(p, sample_above) for p in outputs},
        "packages": package_versions(),
        "host": socket.gethostname(),
        "machine": machine(),
        "slurm": slurm,
        "start": start,
        "end": end,
        "duration_s": round(duration_s, 3),
    }
    if tracking:  # the experiment-tracking run of the job (r1flow.training.tracking)
        record["tracking"] = {k: tracking.get(k) for k in ("run_name", "dir", "backends", "project")}
    return record


def run_and_record(command: list[str], record: str | os.PathLike, *, rule: str, settings: list,
                   inputs: list[str], outputs: list[str], repo: str | os.PathLike | None = None,
                   sample_above: int = DEFAULT_SAMPLE_ABOVE, tracking: dict | None = None) -> int:
    """Run `command`; on success write the provenance record (the record file itself is never hashed
    among the outputs). Returns the command's exit status; on failure no record is written."""
    repo = Path(__file__).resolve().parent.parent if repo is None else repo
    start, t0 = utc_now(), time.monotonic()
    status = subprocess.run(command).returncode
    if status != 0:
        return status
    end, duration = utc_now(), time.monotonic() - t0
    record = Path(record)
    outs = [o for o in outputs if Path(o).resolve() != record.resolve()]
    write_json_atomic(build_record(rule=rule, command=command, settings=settings, inputs=inputs, outputs=outs,
                                   start=start, end=end, duration_s=duration, repo=repo,
                                   sample_above=sample_above, tracking=tracking), record)
    return 0


def read_record(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
