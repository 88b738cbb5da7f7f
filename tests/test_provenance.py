"""Provenance records: hashes, SLURM environment, atomic writing, the wrapper script."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1flow import provenance as P

ROOT = Path(__file__).resolve().parent.parent


def test_file_hash_is_sha256_of_contents(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 3_000_000)  # several read chunks
    info = P.hash_path(f)
    assert info == {"type": "file", "sha256": hashlib.sha256(b"x" * 3_000_000).hexdigest(), "bytes": 3_000_000,
                    "method": "full"}


def test_directory_hash_sees_content_names_and_membership(tmp_path):
    def make(root, files):
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return P.hash_path(root)["sha256"]

    base = {"config.json": b"{}", "sub/model.safetensors": b"weights"}
    h = make(tmp_path / "a", base)
    assert make(tmp_path / "b", base) == h  # same tree elsewhere: same hash
    assert make(tmp_path / "c", {**base, "sub/model.safetensors": b"weightz"}) != h
    assert make(tmp_path / "d", {"config.json": b"{}", "sub/other.safetensors": b"weights"}) != h
    assert make(tmp_path / "e", {**base, "extra": b""}) != h
    info = P.hash_path(tmp_path / "a")
    assert info["files"] == 2 and info["bytes"] == 9 and info["type"] == "directory"
    # the definition: sorted "relpath\0sha\n" lines
    lines = "".join(f"{rel}\0{hashlib.sha256(base[rel]).hexdigest()}\n" for rel in sorted(base))
    assert h == hashlib.sha256(lines.encode()).hexdigest()


def test_large_files_are_sampled(tmp_path):
    f = tmp_path / "big"
    data = bytearray(os.urandom(40 << 20))
    f.write_bytes(data)
    h1 = P.hash_path(f, sample_above=1 << 20)
    assert h1["method"] == "sampled"
    data[0] ^= 1  # the head is sampled
    f.write_bytes(data)
    assert P.hash_path(f, sample_above=1 << 20)["sha256"] != h1["sha256"]
    assert P.hash_path(f)["method"] == "full"  # below the default threshold of 1 GiB


def test_missing_input_is_reported_not_hashed(tmp_path):
    assert P.hash_path(tmp_path / "Qwen/Qwen2.5-Math-7B") == {"type": "missing", "sha256": None}


def test_settings_hash_ignores_key_order():
    assert P.sha256_json([{"a": 1, "b": {"c": 2}}, "table1"]) == P.sha256_json([{"b": {"c": 2}, "a": 1}, "table1"])
    assert P.sha256_json([{"a": 1}]) != P.sha256_json([{"a": 2}])


def test_slurm_environment():
    env = {"SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "4", "SLURM_MEM_PER_NODE": "16000",
           "SLURM_JOB_PARTITION": "gpu", "SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"}
    s = P.slurm_environment(env)
    assert (s["job_id"], s["cpus_per_task"], s["mem_per_node_mb"], s["partition"]) == ("42", "4", "16000", "gpu")
    assert s["job_gpus"] == "0,1" and s["cuda_visible_devices"] == "0,1"
    assert all(v is None for v in P.slurm_environment({}).values())


def test_parse_scontrol_job():
    line = ("JobId=3 JobName=x UserId=root(0) Partition=gpu NumNodes=1 NumCPUs=2 NumTasks=1 CPUs/Task=2 "
            "TRES=cpu=2,mem=1500M,node=1,billing=2,gres/gpu=1 MinMemoryNode=1500M TimeLimit=00:10:00 "
            "TresPerNode=gres:gpu:1 NodeList=vm")
    a = P.parse_scontrol_job(line)
    assert a["partition"] == "gpu" and a["num_cpus"] == "2" and a["cpus_per_task"] == "2"
    assert a["tres"] == {"cpu": "2", "mem": "1500M", "node": "1", "billing": "2", "gres/gpu": "1"}
    assert a["min_memory_node"] == "1500M" and a["time_limit"] == "00:10:00" and a["tres_per_node"] == "gres:gpu:1"
    assert P.slurm_allocation(None) is None


def test_git_commit(tmp_path):
    assert P.git_commit(tmp_path) == {"commit": "unknown", "dirty": None}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert P.git_commit(ROOT)["commit"] == head.stdout.strip()


def test_run_and_record_writes_a_complete_record(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    src, out, rec = tmp_path / "in.txt", tmp_path / "out.txt", tmp_path / "prov" / "job.json"
    src.write_text("hello")
    cmd = [sys.executable, "-c", f"open({str(out)!r}, 'w').write('world')"]
    settings = [{"beta": 0.001, "num_generations": 16}, "table1"]
    assert P.run_and_record(cmd, rec, rule="job", settings=settings, inputs=[str(src)],
                            outputs=[str(out), str(rec)], repo=ROOT) == 0
    r = P.read_record(rec)
    assert r["rule"] == "job" and r["command"] == cmd and r["settings"] == settings
    assert r["settings_sha256"] == P.sha256_json(settings)
    assert r["inputs"][str(src)]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert list(r["outputs"]) == [str(out)]  # the record does not hash itself
    assert r["outputs"][str(out)]["sha256"] == hashlib.sha256(b"world").hexdigest()
    assert r["slurm"]["job_id"] == "7" and r["slurm"]["cpus_per_task"] == "2"
    assert r["packages"]["torch"] and r["packages"]["snakemake"] and r["packages"]["r1flow"] == "0.1.0"
    assert r["host"] and r["start"] <= r["end"] and r["duration_s"] >= 0
    assert r["machine"] == P.machine() and r["machine"]["cores"] == os.cpu_count()
    assert r["git"]["commit"] != ""
    assert sorted(os.listdir(rec.parent)) == ["job.json"]  # no temporary file left behind


XEON = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags		: fpu sse2 avx avx2 fma avx512f avx512bw
processor	: 1
model name	: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags		: fpu sse2 avx avx2 fma avx512f avx512bw
"""
SAPPHIRE = XEON.replace("avx512bw", "avx512bw avx512_bf16 amx_bf16 amx_tile")
GRAVITON = """processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes sve bf16
"""


def test_machine_names_the_cpu_and_the_instruction_sets_that_decide_its_speed():
    m = P.machine(XEON)
    assert m["cpu"] == "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz"
    assert m["cpu_flags"] == ["avx2", "fma", "avx512f"]  # avx512bw is not a speed flag listed
    assert P.describe_machine(m).endswith("avx2 fma avx512f (no avx512_bf16 or AMX)")
    assert P.machine(SAPPHIRE)["cpu_flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    assert "(no avx512_bf16" not in P.describe_machine(P.machine(SAPPHIRE))
    g = P.machine(GRAVITON)
    assert g["cpu"] == "unknown" and g["cpu_flags"] == ["bf16", "sve", "asimd"]
    assert P.machine("")["cpu_flags"] == [] and P.cpu_flags("") == set()


def test_failed_command_writes_no_record(tmp_path):
    rec = tmp_path / "job.json"
    status = P.run_and_record([sys.executable, "-c", "raise SystemExit(3)"], rec, rule="job", settings=[],
                              inputs=[], outputs=[], repo=ROOT)
    assert status == 3 and not rec.exists()


def test_atomic_write_keeps_the_old_record_on_failure(tmp_path):
    rec = tmp_path / "r.json"
    P.write_json_atomic({"a": 1}, rec)
    with pytest.raises(TypeError):
        P.write_json_atomic({"a": object()}, rec)  # not serialisable: fails half-way through
    assert json.loads(rec.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_wrapper_script(tmp_path):
    out, rec = tmp_path / "o.txt", tmp_path / "o.provenance.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "provenance.py"), "--record", str(rec), "--rule", "evaluate_base",
         "--settings", '{"k": 8}', "table1", "--inputs", "--outputs", str(out), str(rec), "--",
         sys.executable, "-c", f"open({str(out)!r}, 'w').write('x'); print('ran')"],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert p.returncode == 0, p.stderr
    assert "ran" in p.stdout
    r = P.read_record(rec)
    assert r["settings"] == [{"k": 8}, "table1"] and r["inputs"] == {} and r["slurm"]["job_id"] is None
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "provenance.py"), "--record", str(rec),
                        "--rule", "x", "--", sys.executable, "-c", "raise SystemExit(5)"])
    assert p.returncode == 5
