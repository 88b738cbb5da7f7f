"""Rules `r1_zero`, `reasoning_rl`, `r1` and `rl_only`: GRPO (sections 2.2, 2.3.2, 2.3.4, 4.1). Resumes from --state."""

import argparse
import logging
import shutil

import pandas as pd
from _common import add_device, add_tracking, job_device, job_settings, json_arg, setup

from r1flow.data.artifacts import read_table, write_table
from r1flow.data.cold_start import general_prompts
from r1flow.data.schemas import GRPO_METRICS, PREFERENCES, TASKS
from r1flow.models import load_policy
from r1flow.rewards.code import code_preflight
from r1flow.training.grpo import GRPOConfig, GRPOTrainer

log = logging.getLogger("scripts.grpo")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="base model: local folder or hub id")
    ap.add_argument("--gguf-file", default=None, help="a GGUF file inside --model, loaded through transformers")
    ap.add_argument("--train", required=True)
    ap.add_argument("--validation", required=True)
    ap.add_argument("--grpo", type=json_arg, required=True, help="the config's r1_zero.grpo section")
    ap.add_argument("--rewards", type=json_arg, default={}, help="the config's rewards section (options per reward)")
    ap.add_argument("--template", default="table1")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--state", required=True, help="folder for resumable state (outside the outputs)")
    ap.add_argument("--out-model", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--validation-curve", required=True)
    ap.add_argument("--general", default=None,
                    help="preference pairs whose prompts join training as general prompts (section 2.3.4)")
    ap.add_argument("--general-prompts", type=int, default=0, help="how many general prompts to use")
    ap.add_argument("--stage", default="GRPO", help="stage name for the log")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep-state", action="store_true", help="keep the state folder after success")
    ap.add_argument("--generation", type=json_arg, default=None, help="the config's generation section (backend)")
    ap.add_argument("--deepspeed", type=json_arg, default=None,
                    help="the config's training.deepspeed section (run under torchrun when enabled)")
    add_device(ap)
    add_tracking(ap)
    a = ap.parse_args()
    setup(a.threads)
    ds = a.deepspeed or {}
    if ds.get("enabled") and ds.get("accelerator") == "cpu" and a.device == "auto":
        a.device = "cpu"  # DeepSpeed on the CPU (DS_ACCELERATOR=cpu, gloo) even on a host with a GPU
    device = job_device(a.device)
    # reward models (section 2.3.4) score on the job's device and in its dtype (base_model.dtype) too
    rewards = {k: ({**v, "device": str(device), "dtype": a.dtype}
                   if k in ("helpfulness", "harmlessness") and isinstance(v, dict) else v)
               for k, v in a.rewards.items()}

    cfg = GRPOConfig.from_dict({**a.grpo, "template": a.template, "reward_options": rewards})
    code_preflight(cfg.rewards, rewards)  # before any model loads: a host that cannot run programs stops here
    train, validation = read_table(a.train, TASKS), read_table(a.validation, TASKS)
    if a.general and a.general_prompts:
        train = pd.concat([train.assign(kind="reasoning"), general_prompts(read_table(a.general, PREFERENCES),
                                                                            a.general_prompts)], ignore_index=True)
    policy, tok = load_policy(a.model, a.dtype, device, gguf_file=a.gguf_file)
    # pi_ref: the frozen initial policy of eq. 2, loaded afresh so that a resumed run keeps the true base
    ref = load_policy(a.model, a.dtype, device, gguf_file=a.gguf_file)[0] if cfg.beta > 0 else None
    trainer = GRPOTrainer(policy, ref, tok, cfg, train, validation, a.state, deepspeed=a.deepspeed,
                          generation=a.generation, model_path=a.model)
    metrics = trainer.train(tracking=a.tracking, run_config=job_settings(a))
    if not trainer.is_main:  # with DeepSpeed, rank 0 writes the outputs
        return
    write_table(metrics, a.metrics, GRPO_METRICS)
    trainer.validation_curve().to_csv(a.validation_curve, index=False)
    step = trainer.export(a.out_model)
    log.info(f"{a.stage}: {cfg.steps} steps; exported the {cfg.select_checkpoint} checkpoint (step {step}) "
             f"-> {a.out_model}")
    if not a.keep_state:
        shutil.rmtree(a.state, ignore_errors=True)


if __name__ == "__main__":
    main()
