"""Run by tests/test_sharded_sampling.py under torchrun (2 CPU ranks, DS_ACCELERATOR=cpu): one GRPO step
in a single process (LocalEngine, all groups) and the same step with DeepSpeed ZeRO-2, where each rank
samples only its half of the groups. Rank 0 writes what each rank sampled and the differences to --out."""

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from r1flow import rewards as R  # noqa: E402
from r1flow.models import load_policy  # noqa: E402
from r1flow.training.grpo import GRPOConfig, GRPOTrainer  # noqa: E402


@R.register("digit_share_sharded")
@R.per_sample
def digit_share(completion: str, gold: str) -> R.Reward:
    """A dense test reward (share of digits), so every group has non-zero advantages."""
    return R.Reward(sum(ch.isdigit() for ch in completion) / max(1, len(completion)), "test")


def recorded(trainer):
    """Wrap the trainer's sampler: every call's prompts, seeds and texts are kept."""
    calls, real = [], trainer.generator.generate

    def generate(prompts, params, seeds=None):
        out = real(prompts, params, seeds=seeds)
        calls.append({"prompts": list(prompts), "seeds": seeds, "texts": list(out.texts)})
        return out

    trainer.generator.generate = generate
    return calls


def max_diff(a, b) -> float:
    return max((pa.detach() - pb.detach()).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    questions = [f"Compute {x}+{y}" for x, y in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 5), (6, 3), (4, 4), (9, 1)]]
    train = pd.DataFrame({"question": questions, "answer": [str(x) for x in [3, 7, 11, 8, 7, 9, 8, 10]]})
    # "batch" reward scaling (needs every rank's rewards), DAPO's token-level normaliser (the batch's token
    # count), overlong masking and micro-batches within each rank's share
    cfg = GRPOConfig(prompts_per_step=4, num_generations=4, max_completion_length=10, steps=2, eval_every=0,
                     beta=0.04, micro_batch_size=4, warmup_steps=0, learning_rate=1e-3, seed=5,
                     scale_rewards="batch", loss_type="dapo", mask_truncated_completions=True,
                     rewards={"digit_share_sharded": 1.0})
    tmp = Path(a.out).parent

    def trainer(ds, state):
        policy, tok = load_policy(a.model)
        return GRPOTrainer(policy, load_policy(a.model)[0], tok, cfg, train, None, state, deepspeed=ds)

    single = trainer(None, tmp / f"single{rank}")
    start = copy.deepcopy(single.model)
    calls_single = recorded(single)
    rows_single = [single.step(), single.step()]
    dist = trainer({"enabled": True, "zero_stage": 2}, tmp / f"dist{rank}")
    calls_dist = recorded(dist)
    rows_dist = [dist.step(), dist.step()]

    everyone = [None] * dist.world_size
    torch.distributed.all_gather_object(everyone, calls_dist)
    keys = ("loss", "kl", "clip_fraction", "entropy", "reward_mean", "reward_std", "completion_length",
            "truncated_fraction", "reward/digit_share_sharded_mean")
    out = {
        "world_size": dist.world_size,
        "single": calls_single,
        "dist": everyone,
        "rows_single": [{k: r[k] for k in keys} for r in rows_single],
        "rows_dist": [{k: r[k] for k in keys} for r in rows_dist],
        "weights_max_abs_diff": max_diff(single.model, dist.model),
        "weights_moved": max_diff(single.model, start),
    }
    if rank == 0:
        Path(a.out).write_text(json.dumps(out, indent=2))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
