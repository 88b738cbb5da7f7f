"""FSDP2 (training.deepspeed engine fsdp2, zero_stage 3: parameters, gradients and optimiser state
sharded) for GRPO on 2 CPU ranks (torchrun, gloo) against one process.

Tolerance: fp32 throughout; the sharded step differs from one process only in the order of float sums
(gradients reduce-scattered over ranks, losses summed over micro-batches), so losses and updated weights
must agree to 1e-5 while the step moves the weights by ~1e-3 (as tests/test_deepspeed.py).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from r1flow.training.engine import DeepSpeedSettings

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "helpers" / "fsdp_worker.py"
ATOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *args]


def test_fsdp2_settings_are_checked():
    s = DeepSpeedSettings.from_dict({"enabled": True, "engine": "fsdp2", "zero_stage": 3})
    assert s.shards_parameters
    assert not DeepSpeedSettings.from_dict({"enabled": True, "zero_stage": 2}).shards_parameters
    with pytest.raises(ValueError, match="set zero_stage: 3"):
        DeepSpeedSettings.from_dict({"enabled": True, "engine": "fsdp2", "zero_stage": 2})
    with pytest.raises(ValueError, match="engine: fsdp2"):  # DeepSpeed's own stage 3 points to FSDP2
        DeepSpeedSettings.from_dict({"enabled": True, "zero_stage": 3})
    with pytest.raises(ValueError, match="offload_optimizer"):
        DeepSpeedSettings.from_dict({"engine": "fsdp2", "zero_stage": 3, "offload_optimizer": True})
    with pytest.raises(ValueError, match="deepspeed or fsdp2"):
        DeepSpeedSettings.from_dict({"engine": "fsdp"})


@pytest.mark.distributed
def test_fsdp2_grpo_step_matches_one_process_and_the_sampler_gets_the_new_weights(tiny_policy, tmp_path):
    out = tmp_path / "step.json"
    p = subprocess.run(torchrun("step", "--model", str(tiny_policy[0]), "--out", str(out)),
                       capture_output=True, text=True, env=ENV, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    r = json.loads(out.read_text())
    assert r["local_share"] == pytest.approx(0.5, abs=0.01)  # each rank holds half of every parameter
    assert r["loss_abs_diff"] < ATOL and r["kl_abs_diff"] < ATOL, r
    assert r["weights_max_abs_diff"] < ATOL and r["weights_moved"] > 1e-4, r
    assert r["rows_dist"]["completion_length"] == r["rows_single"]["completion_length"]
    # the sampler's copy holds the gathered updated weights: its log-probs are the sharded policy's,
    # and not those of the weights before the step
    assert r["sampler_weights_max_abs_diff"] < 1e-7
    assert r["sampler_vs_policy_logprob_diff"] < ATOL
    assert r["sampler_vs_start_logprob_diff"] > 1e-3


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its ranks in sessions of their own), from /proc."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _checkpointed_step(state: Path) -> int:
    f = state / "checkpoint" / "state.json"
    try:
        return json.loads(f.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.distributed
@pytest.mark.parametrize("mode,resumed", [("train", "resuming from step"), ("sft", "SFT: resuming from step")])
def test_fsdp2_killed_with_sigkill_resumes_to_the_uninterrupted_run(tiny_policy, tmp_path, mode, resumed):
    """GRPO (6 steps) and SFT (6 updates): the sharded job killed with SIGKILL after its checkpoint at step 2
    or later, then run again, ends with the single-process run's losses and exported weights."""
    model, steps = str(tiny_policy[0]), 6
    single = tmp_path / "single.json"
    p = subprocess.run([sys.executable, str(WORKER), mode, "--single", "--model", model, "--out", str(single),
                        "--state", str(tmp_path / "single_state"), "--steps", str(steps)],
                       capture_output=True, text=True, env=ENV, timeout=900)
    assert p.returncode == 0, p.stderr[-6000:]

    state, out = tmp_path / "state", tmp_path / "dist.json"
    cmd = torchrun(mode, "--model", model, "--out", str(out), "--state", str(state), "--steps", str(steps))
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 600
    while _checkpointed_step(state) < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in [job.pid, *_descendants(job.pid)]:  # the launcher and both ranks, no chance to save
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()
    time.sleep(1)  # the ranks, re-parented, are gone
    killed_at = _checkpointed_step(state)
    assert 2 <= killed_at < steps, killed_at
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    assert f"{resumed} {killed_at}" in p.stderr

    a, b = json.loads(single.read_text()), json.loads(out.read_text())
    assert a["steps"] == b["steps"] == list(range(1, steps + 1))
    assert max(abs(x - y) for x, y in zip(a["loss"], b["loss"])) < ATOL
    wa = load_file(str(tmp_path / "single-model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "dist-model" / "model.safetensors"))
    assert set(wa) == set(wb)
    start = load_file(str(Path(model) / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < ATOL
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 1e-4  # the runs trained


def test_fsdp2_memory_plan_by_hand():
    """FSDP2's per-rank state (r1flow.training.memory_plan.model_state): 16 bytes a parameter over N (float32
    shards, AdamW m and v, float32 gradient shards) plus the whole bf16 copies of two decoder layers and the
    root (embeddings + lm_head + final norm) that a forward holds, here Qwen2.5-32B on 8 ranks."""
    from r1flow.training import memory_plan as M

    q = M.KNOWN_SHAPES["Qwen/Qwen2.5-32B"]
    h, inter, vocab = 5120, 27648, 152064
    layer = h * h + 2 * h * 1024 + h * h + (h + 2 * 1024) + 3 * h * inter + 2 * h  # q, k, v, o (+ biases), MLP, norms
    assert q.layer_params == layer
    P = 64 * layer + h + 2 * vocab * h
    gathered = 2 * (2 * layer + 2 * vocab * h + h)
    s = M.model_state(q, "bfloat16", {"enabled": True, "engine": "fsdp2", "zero_stage": 3, "nproc_per_node": 8,
                                      "bf16": True})
    assert s["weights"] == 4 * P // 8 and s["master weights (fp32)"] == 0
    assert s["optimizer state (AdamW m, v)"] == 8 * P // 8
    assert s["gathered units (FSDP2: 2 layers + root)"] == gathered
    assert s["gradients"] == 4 * P // 8 + gathered
    z2 = M.model_state(q, "bfloat16", {"enabled": True, "zero_stage": 2, "nproc_per_node": 8, "bf16": True})
    assert z2["weights"] == 2 * P  # ZeRO-2: every bf16 weight on every rank, 65 GB of an 80 GB GPU
    assert sum(s.values()) < sum(z2.values()) - 40e9
