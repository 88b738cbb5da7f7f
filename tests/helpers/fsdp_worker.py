"""Run by tests/test_fsdp.py under torchrun (2 CPU ranks, gloo): GRPO with FSDP2 (training.deepspeed
engine fsdp2, zero_stage 3) against one process. Modes:

  step    one GRPO step (reference model, mu = 2, two micro-batches per rank) on both; the sampler's
          log-probs after the step; rank 0 writes the differences to --out as JSON
  train   GRPO for --steps steps with a checkpoint every step in --state (the test kills it with
          SIGKILL part-way, then runs it again to resume); rank 0 writes the metrics and weights
  sft     SFT for --steps updates with a checkpoint after every update in --state, each update slowed
          by 0.3 s so that the test can kill it between two (SIGKILL), then again to resume; the model
          is saved as a plain folder (collective under FSDP2) and rank 0 writes the loss rows
"""

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for r1flow
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ds_worker  # noqa: E402,F401  (registers the dense digit_share test reward)
from r1flow.models import full_state_dict, load_policy  # noqa: E402
from r1flow.models.logprobs import completion_logprobs  # noqa: E402
from r1flow.training.grpo import GRPOConfig, GRPOTrainer  # noqa: E402

FSDP = {"enabled": True, "engine": "fsdp2", "zero_stage": 3}


def diff(state: dict, model) -> float:
    """Largest difference between gathered weights and a plain model's."""
    own = dict(model.named_parameters())
    return max((state[n] - own[n].detach()).abs().max().item() for n in state)


def step_case(path, tmp, rank):
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
    dist = trainer(FSDP, tmp / f"dist{rank}")
    local_numel = sum(p.to_local().numel() for p in dist.model.parameters())
    total_numel = sum(p.numel() for p in dist.model.parameters())
    row_dist = dist.step()
    state = full_state_dict(dist.model)  # collective: every rank gathers
    # the sampler's next samples: its own copy, synced after the update; log-probs of the step's first
    # completions under it and under the sharded policy (a collective forward on every rank)
    sampler = dist.generator.model
    out = dist.generator.generate([dist._prompt(questions[0])], dist_params(cfg), seeds=[123])
    args = (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask, cfg.num_generations)
    with torch.no_grad():
        lp_sampler = completion_logprobs(sampler, *args)[0]
        lp_policy = completion_logprobs(dist.model, *args)[0]
        lp_start = completion_logprobs(start, *args)[0]
    m = out.completion_mask.bool()
    keys = ("loss", "kl", "clip_fraction", "entropy", "reward_mean", "completion_length")
    return {"rows_single": {k: row_single[k] for k in keys}, "rows_dist": {k: row_dist[k] for k in keys},
            "loss_abs_diff": abs(row_single["loss"] - row_dist["loss"]),
            "kl_abs_diff": abs(row_single["kl"] - row_dist["kl"]),
            "weights_max_abs_diff": diff(state, single.model), "weights_moved": diff(state, start),
            "sampler_weights_max_abs_diff": diff(state, sampler),
            "local_share": local_numel / total_numel,
            "sampler_vs_policy_logprob_diff": float((lp_sampler - lp_policy)[m].abs().max()),
            "sampler_vs_start_logprob_diff": float((lp_sampler - lp_start)[m].abs().max())}


def dist_params(cfg):
    from r1flow.generation import SamplingParams

    return SamplingParams(cfg.num_generations, cfg.temperature, cfg.top_p, cfg.max_completion_length)


def train_cfg(steps):
    return GRPOConfig(prompts_per_step=2, num_generations=4, max_completion_length=12, steps=steps, eval_every=0,
                      beta=0.04, warmup_steps=0, learning_rate=1e-3, seed=1, save_every=1,
                      rewards={"digit_share": 1.0})


def train_data():
    questions = [f"Compute {a}+{b}" for a, b in [(1, 2), (3, 4), (5, 6), (7, 1), (2, 5), (6, 3)]]
    return pd.DataFrame({"question": questions, "answer": ["3", "7", "11", "8", "7", "9"]})


def train_case(path, state, steps, sharded, out_model):
    policy, tok = load_policy(path)
    ref = load_policy(path)[0]
    t = GRPOTrainer(policy, ref, tok, train_cfg(steps), train_data(), None, state,
                    deepspeed=FSDP if sharded else None)
    m = t.train(progress=False)
    if t.is_main:
        t.export(out_model)
    return {"steps": m["step"].tolist(), "loss": m["loss"].tolist()}


def sft_case(path, state, steps, sharded, out_model):
    import time

    import r1flow.training.sft as S
    from r1flow.models import save_policy

    model, tok = load_policy(path)
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)][: 2 * steps]
    prompts = [f"Compute {a}+{b}:" for a, b in pairs]
    completions = [f" {a}+{b}={a + b}. So the answer is {a + b}." for a, b in pairs]
    step = S.sft_step

    def slow(*a, **k):  # time for the test to kill the job between two checkpoints
        time.sleep(0.3)
        return step(*a, **k)

    S.sft_step = slow
    rows = S.train_sft(model, tok, prompts, completions, epochs=1, learning_rate=1e-3, batch_size=2,
                       micro_batch_size=1, max_length=64, warmup_steps=0, seed=0, deepspeed=FSDP if sharded else None,
                       state_dir=state, save_every=1)
    save_policy(model, tok, out_model)  # every rank under FSDP2: gathered, written by rank 0
    return {"steps": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["step", "train", "sft"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--state")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--single", action="store_true", help="train in one process (no torchrun)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)  # the trainer's "resuming from step N"
    torch.set_num_threads(1)
    out = Path(a.out)
    if a.mode == "step":
        rank = int(os.environ["RANK"])
        r = step_case(a.model, out.parent, rank)
    elif a.mode == "train":
        r = train_case(a.model, a.state, a.steps, not a.single, str(out.with_suffix("")) + "-model")
    else:
        r = sft_case(a.model, a.state, a.steps, not a.single, str(out.with_suffix("")) + "-model")
    if int(os.environ.get("RANK", 0)) == 0:
        out.write_text(json.dumps(r, indent=2))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
