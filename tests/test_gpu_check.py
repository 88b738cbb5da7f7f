"""benchmarks/gpu_check.py, the one-GPU check, run here the only way a CPU allows: --device cpu --tiny.
Its figures are printed and its exit status is 0; CUDA asked on a host without it is a device error (2)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
FIGURES = ["sampling tokens/s (GRPO)", "sampling tokens/s (evaluation)", "training tokens/s (GRPO)",
           "training tokens/s (SFT)", "MFU sampling (GRPO)", "MFU training (GRPO)", "MFU training (SFT)"]


def test_gpu_check_runs_tiny_on_the_cpu():
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny"], capture_output=True, text=True,
                       timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    for name in FIGURES:
        m = re.search(rf"^{re.escape(name)}: ([0-9.]+)%?$", p.stdout, re.M)
        assert m and float(m.group(1)) >= 0, (name, p.stdout)
        if "tokens/s" in name:
            assert float(m.group(1)) > 0, (name, p.stdout)
    assert len(re.findall(r"^GRPO step \d+:", p.stdout, re.M)) == 5
    assert "SFT: 5 steps" in p.stdout and "evaluation batch:" in p.stdout
    assert "peak GPU memory: GRPO n/a (not a GPU), SFT n/a (not a GPU)" in p.stdout and p.stdout.rstrip().endswith("GPU CHECK OK")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_gpu_check_without_cuda_is_a_device_error():
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--tiny"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "GPU CHECK FAILED (device error)" in p.stdout and "config key 'device'" in p.stdout


def test_gpu_check_item8_checks_run_tiny_on_the_cpu(tmp_path):
    """The checks of issue 24 item 8 at a few tokens on small shapes: in float32 the fast path's log-probs
    and gradients are transformers' (to float rounding); the memory plan's figures are planned only (no
    CUDA here); one AdamW step at lr 3e-6 on bf16 weights moves weights only through float32 master weights
    (Adam's first step moves every weight with a gradient by about lr, under half a bf16 unit of a weight
    of size 0.02)."""
    import json

    out = tmp_path / "figures.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--dtype", "float32", "--checks",
                        "fast_path", "memory_plan", "master_weights", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    f = json.loads(out.read_text())
    for T, r in f["fast_path"].items():
        assert r["max_abs_logprob_diff"] < 1e-4 and r["grad_cosine"] > 0.9999, (T, r)
    plans = f["memory_plan"]
    assert len(plans) == 12 and all(r["planned_gib"] > 0 and "measured_gib" not in r for r in plans)
    assert {r["path"] for r in plans} == {"sft (transformers forward)", "grpo (fast path)"}
    # more rows and tokens plan more memory
    sft = {(r["rows"], r["tokens"]): r["planned_gib"] for r in plans if r["path"].startswith("sft")}
    assert sft[(4, 32)] > sft[(2, 32)] > sft[(1, 32)] > sft[(1, 16)]
    m = f["master_weights"]
    moved = m["float32"]["share_moved"]  # every weight with a gradient (embedding rows of unseen tokens have none)
    assert moved > 0.2
    assert abs(m["bf16 with float32 master weights"]["share_moved"] - moved) < 0.01
    assert m["bf16 without"]["share_moved"] < 0.1 * moved
    assert "memory plan, sft (transformers forward), 4 x 32 tokens" in p.stdout and p.stdout.rstrip().endswith("GPU CHECK OK")
