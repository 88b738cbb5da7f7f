"""DeepSpeed ZeRO on 2 CPU ranks (torchrun, gloo) against one process; SFT loss and engine settings.

Tolerance: fp32 throughout; the distributed step differs from one process only in the order of float
sums (gradients reduced over ranks, losses summed over micro-batches), so losses and updated weights
must agree to 1e-5 absolute, while the step moves the weights by ~1e-3.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r1flow.training.engine import DeepSpeedSettings, LocalEngine, deepspeed_config, shard
from r1flow.training.sft import IGNORE, collate, sft_loss, sft_step

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5


# -- single process ---------------------------------------------------------------------------------
def test_collate_masks_the_prompt_and_padding(tiny_policy):
    from r1flow.models import load_policy

    _, tok = load_policy(str(tiny_policy[0]))
    b = collate(tok, ["Compute 1+2:", "Compute 3+4*2:"], [" 3", " 3+4=7 7*2=14"])
    p0 = tok("Compute 1+2:", add_special_tokens=False)["input_ids"]
    c0 = tok(" 3", add_special_tokens=False)["input_ids"]
    n0 = len(p0) + len(c0) + 1
    assert b.input_ids[0, :n0].tolist() == p0 + c0 + [tok.eos_token_id]
    assert b.labels[0, :n0].tolist() == [IGNORE] * len(p0) + c0 + [tok.eos_token_id]
    assert (b.labels[0, n0:] == IGNORE).all() and (b.attention_mask[0, n0:] == 0).all()
    assert b.num_tokens == int((b.labels != IGNORE).sum())  # no completion token sits at position 0
    t = collate(tok, ["Compute 1+2:"], [" 3"], max_length=3)
    assert t.input_ids.shape == (1, 3)


def test_sft_loss_is_the_mean_completion_nll_and_micro_batches_add_up(tiny_policy):
    from r1flow.models import load_policy

    model, tok = load_policy(str(tiny_policy[0]))
    b = collate(tok, ["Compute 1+2:", "Compute 2+2:", "Compute 5-1:"], [" 3", " 2+2=4 so 4", " 4"])
    loss = sft_loss(model, b)
    logp = torch.log_softmax(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float(), -1)
    nll = [-logp[i, t - 1, b.labels[i, t]] for i in range(len(b)) for t in range(1, b.labels.shape[1])
           if b.labels[i, t] != IGNORE]
    assert loss.item() == pytest.approx(torch.stack(nll).mean().item(), abs=1e-5)
    parts = sum(sft_loss(model, b[i : i + 1], b.num_tokens).item() for i in range(len(b)))
    assert parts == pytest.approx(loss.item(), abs=1e-5)

    # one step over two micro-batches = one step over the whole batch
    import copy

    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    e1 = LocalEngine(m1, torch.optim.AdamW(m1.parameters(), lr=1e-3), 1.0)
    e2 = LocalEngine(m2, torch.optim.AdamW(m2.parameters(), lr=1e-3), 1.0)
    l1, l2 = sft_step(e1, [b]), sft_step(e2, [b[:1], b[1:]])
    assert l1 == pytest.approx(l2, abs=1e-5)
    diff = max((p - q).abs().max().item() for p, q in zip(m1.parameters(), m2.parameters()))
    moved = max((p - q).abs().max().item() for p, q in zip(m1.parameters(), model.parameters()))
    assert diff < ATOL and moved > 1e-4


def test_engine_settings_and_sharding():
    s = DeepSpeedSettings.from_dict({"enabled": True, "zero_stage": 2, "offload_optimizer": True})
    cfg = deepspeed_config(s, max_grad_norm=1.0)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["gradient_clipping"] == 1.0 and cfg["managed_gradient_accumulation"] is False
    with pytest.raises(ValueError, match="zero_stage 3 through DeepSpeed is not supported"):
        DeepSpeedSettings.from_dict({"enabled": True, "zero_stage": 3})
    with pytest.raises(ValueError, match="unknown deepspeed settings"):
        DeepSpeedSettings.from_dict({"stage": 2})
    assert shard(16, 1, 2, unit=4) == slice(8, 16)
    with pytest.raises(ValueError):
        shard(12, 0, 2, unit=4)  # 3 groups of 4 cannot be split between 2 ranks


# -- two ranks ----------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("offload", [False, True], ids=["zero2", "zero2-offload"])
def test_zero2_on_two_cpu_ranks_matches_one_process(tiny_policy, tmp_path, offload):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[distributed]')")
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "helpers" / "ds_worker.py"), "--model", str(tiny_policy[0]), "--out", str(out)]
    if offload:
        cmd.append("--offload-optimizer")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    r = json.loads(out.read_text())
    assert r["world_size"] == 2
    for case in ("sft", "grpo"):
        assert r[case]["loss_abs_diff"] < ATOL, r[case]
        assert r[case]["weights_max_abs_diff"] < ATOL, r[case]
        assert r[case]["weights_moved"] > 1e-4, r[case]  # the step did something to compare
    assert r["grpo"]["kl_abs_diff"] < ATOL
    # killed after 2 steps and resumed from the sharded checkpoint: as 3 uninterrupted steps
    res = r["resume"]
    assert res["steps"] == [1, 2, 3]
    assert res["loss_max_abs_diff"] < ATOL and res["weights_max_abs_diff"] < ATOL and res["weights_moved"] > 1e-4, res
    assert r["grpo"]["rows_dist"]["completion_length"] == r["grpo"]["rows_single"]["completion_length"]


@pytest.mark.distributed
@pytest.mark.e2e
def test_r1_zero_rule_under_torchrun_with_deepspeed(tmp_path):
    """The rule itself: training.deepspeed launches the script under torchrun (2 CPU ranks); rank 0
    writes the outputs; checkpoints go through each rank's ZeRO shard."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[distributed]')")
    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["training"] = {"deepspeed": {"enabled": True, "zero_stage": 2, "nproc_per_node": 2, "accelerator": "cpu"}}
    conf = tmp_path / "ds.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(conf), "--cores", "2", "results/r1_zero/metrics.csv", "results/models/r1_zero"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = tmp_path / "results" / "logs" / "r1_zero.log"
    assert p.returncode == 0, p.stderr[-4000:] + (log.read_text()[-4000:] if log.exists() else "")
    import pandas as pd

    assert pd.read_csv(tmp_path / "results" / "r1_zero" / "metrics.csv")["step"].tolist() == [1, 2, 3, 4]
    assert (tmp_path / "results" / "models" / "r1_zero" / "model.safetensors").exists()
    rec = json.loads((tmp_path / "results" / "provenance" / "r1_zero.json").read_text())
    assert rec["command"][:5] == ["env", "DS_ACCELERATOR=cpu", sys.executable, "-m", "torch.distributed.run"]
    assert any(isinstance(s, dict) and s.get("zero_stage") == 2 and s["enabled"] for s in rec["settings"])
