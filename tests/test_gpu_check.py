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
