"""Run by tests/test_deepspeed.py under torchrun (2 CPU ranks, DS_ACCELERATOR=cpu): one SFT step and one
GRPO step with DeepSpeed ZeRO, each compared on every rank with the same step in a single process
(LocalEngine, whole batch). Rank 0 writes the largest differences to --out as JSON."""

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for r1flow

from r1flow import rewards as R  # noqa: E402
from r1flow.models import load_policy  # noqa: E402
from r1flow.training.engine import LocalEngine, make_engine, shard  # noqa: E402
from r1flow.training.grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from r1flow.training.sft import collate, sft_step  # noqa: E402


def max_diff(a, b) -> float:
    return max((pa.detach() - pb.detach()).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def sft_case(model0, tok, ds_settings, rank, world):
    prompts = [f"Compute {a}+{b}:" for a, b in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (9, 0), (4, 4), (8, 1)]]
    completions = [f" {a}+{b}={a + b}. So the answer is {a + b}." for a, b in
                   [(1, 2), (3, 4), (5, 6), (7, 1), (2, 2), (9, 0), (4, 4), (8, 1)]]
    batch = collate(tok, prompts, completions)

    single = copy.deepcopy(model0)
    opt = torch.optim.AdamW(single.parameters(), lr=1e-3, betas=(0.9, 0.99))
    loss_single = sft_step(LocalEngine(single, opt, 1.0), [batch])

    dist = copy.deepcopy(model0)
    opt = torch.optim.AdamW(dist.parameters(), lr=1e-3, betas=(0.9, 0.99))
    engine = make_engine(dist, opt, 1.0, ds_settings)
    mine = batch[shard(len(batch), rank, world)]
    half = len(mine) // 2  # two micro-batches per rank: accumulation as well as sharding
    loss_dist = sft_step(engine, [mine[:half], mine[half:]])
    return {"loss_single": loss_single, "loss_dist": loss_dist, "loss_abs_diff": abs(loss_single - loss_dist),
            "weights_max_abs_diff": max_diff(single, dist), "weights_moved": max_diff(single, model0)}


@R.register("digit_share")
@R.per_sample
def digit_share(completion: str, gold: str) -> R.Reward:
    """A dense test reward (share of digits), so that every group has non-zero advantages even for a
    barely trained model: the step then really moves the weights."""
    return R.Reward(sum(ch.isdigit() for ch in completion) / max(1, len(completion)), "test")


def grpo_case(path, ds_settings, tmp, rank):
    questions = [f"Compute {a}+{b}" for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]
    train = pd.DataFrame({"question": questions, "answer": ["3", "7", "11", "8"]})
    cfg = GRPOConfig(prompts_per_step=4, num_generations=4, max_completion_length=16, steps=1, eval_every=0,
                     beta=0.04, micro_batch_size=4, warmup_steps=0, learning_rate=1e-3, seed=0,
                     num_iterations=2, rewards={"digit_share": 1.0})

    def trainer(ds, state):
        policy, tok = load_policy(path)
        ref = load_policy(path)[0]
        return GRPOTrainer(policy, ref, tok, cfg, train, None, state, deepspeed=ds)

    single = trainer(None, tmp / f"single{rank}")
    start = copy.deepcopy(single.model)
    row_single = single.step()
    dist = trainer(ds_settings, tmp / f"dist{rank}")
    row_dist = dist.step()
    keys = ("loss", "kl", "clip_fraction", "entropy", "reward_mean", "completion_length")
    return {"rows_single": {k: row_single[k] for k in keys}, "rows_dist": {k: row_dist[k] for k in keys},
            "loss_abs_diff": abs(row_single["loss"] - row_dist["loss"]),
            "kl_abs_diff": abs(row_single["kl"] - row_dist["kl"]),
            "weights_max_abs_diff": max_diff(single.model, dist.model),
            "weights_moved": max_diff(single.model, start)}


def resume_case(path, ds_settings, tmp, rank):
    """Three steps in one process vs. two DeepSpeed steps, a checkpoint (each rank's ZeRO shard), and a
    third step in a fresh DeepSpeed trainer resumed from it."""
    questions = [f"Compute {a}+{b}" for a, b in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 5), (6, 3)]]
    train = pd.DataFrame({"question": questions, "answer": ["3", "7", "11", "8", "7", "9"]})
    cfg = GRPOConfig(prompts_per_step=2, num_generations=4, max_completion_length=12, steps=3, eval_every=0,
                     beta=0.0, warmup_steps=0, learning_rate=1e-3, seed=1, save_every=1,
                     rewards={"digit_share": 1.0})

    def trainer(ds, state):
        policy, tok = load_policy(path)
        return GRPOTrainer(policy, None, tok, cfg, train, None, state, deepspeed=ds)

    single = trainer(None, tmp / f"resume_single{rank}")
    m_single = single.train(progress=False)
    state = tmp / "resume_dist"  # shared by the ranks, as on a cluster's file system
    first = trainer(ds_settings, state)
    first.train(progress=False, stop_after=2)
    second = trainer(ds_settings, state)
    m_dist = second.train(progress=False)
    return {"steps": m_dist["step"].tolist(),
            "loss_max_abs_diff": float((m_single["loss"] - m_dist["loss"]).abs().max()),
            "weights_max_abs_diff": max_diff(single.model, second.model),
            "weights_moved": max_diff(single.model, load_policy(path)[0])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--offload-optimizer", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = {"enabled": True, "zero_stage": a.zero_stage, "offload_optimizer": a.offload_optimizer}
    model0, tok = load_policy(a.model)
    # the engine initialises the process group; the rank is needed before, for sharding
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = {"world_size": world, "deepspeed": ds, "sft": sft_case(model0, tok, ds, rank, world)}
    out["grpo"] = grpo_case(a.model, ds, Path(a.out).parent, rank)
    out["resume"] = resume_case(a.model, ds, Path(a.out).parent, rank)
    # every rank must hold the same updated weights (ZeRO-2 all-gathers them after the step)
    if rank == 0:
        Path(a.out).write_text(json.dumps(out, indent=2))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
