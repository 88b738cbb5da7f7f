"""Train one Bradley-Terry reward model of section 2.3.4 (helpfulness or harmlessness) from a causal LM."""

import argparse
import logging

import torch
from _common import add_device, add_tracking, job_device, job_settings, json_arg, setup

from r1flow.data.artifacts import read_table, write_table
from r1flow.data.schemas import PREFERENCES, RM_METRICS
from r1flow.training.reward_model import train_reward_model

log = logging.getLogger("scripts.reward_model")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, help="causal LM folder or hub id the reward model starts from")
    ap.add_argument("--gguf-file", default=None, help="a GGUF file inside --base, loaded through transformers")
    ap.add_argument("--pairs", required=True, help="preference pairs parquet (PREFERENCES schema)")
    ap.add_argument("--aspect", required=True, choices=["helpfulness", "harmlessness"])
    ap.add_argument("--out", required=True, help="output reward model folder (save_pretrained)")
    ap.add_argument("--metrics", required=True, help="output CSV of per-step loss and pairwise accuracy")
    ap.add_argument("--settings", type=json_arg, default={},
                    help='JSON: {"steps", "lr", "batch_size", "seed", optional "weight_decay", "warmup_steps", '
                         '"max_grad_norm", "max_length"}')
    ap.add_argument("--dtype", default="float32", help="the dtype the base model is loaded in")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--deepspeed", type=json_arg, default=None,
                    help="the config's training.deepspeed section (run under torchrun when enabled)")
    add_device(ap)
    add_tracking(ap)
    a = ap.parse_args()
    setup(a.threads)
    ds = a.deepspeed or {}
    if ds.get("enabled") and ds.get("accelerator") == "cpu" and a.device == "auto":
        a.device = "cpu"  # DeepSpeed on the CPU (DS_ACCELERATOR=cpu, gloo) even on a host with a GPU
    device = job_device(a.device)  # cuda:LOCAL_RANK under torchrun on GPUs
    pairs = read_table(a.pairs, PREFERENCES)
    # the model folder is written by rank 0 only under DeepSpeed (train_reward_model)
    _, _, metrics = train_reward_model(a.base, pairs, a.aspect, a.out, dtype=a.dtype, device=device,
                                       gguf_file=a.gguf_file, deepspeed=a.deepspeed, tracking=a.tracking,
                                       run_config=job_settings(a), **a.settings)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return  # with DeepSpeed, rank 0 writes the outputs (every rank holds the same weights and rows)
    write_table(metrics, a.metrics, RM_METRICS)
    tail = metrics.tail(10)
    log.info(f"{a.aspect} reward model: {len(metrics)} steps, last-10-step loss {tail['loss'].mean():.3f}, "
             f"batch pairwise accuracy {tail['accuracy'].mean():.3f} -> {a.out}")


if __name__ == "__main__":
    main()
