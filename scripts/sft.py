"""Rules `cold_start_sft`, `final_sft` and `distill`: supervised fine-tuning on conversational SFT data
(sections 2.3.1, 2.3.3, 2.4). The model folder written is a chat model: it carries the R1 chat template
and the readable pattern's marker as a token."""

import argparse
import logging
import shutil

import pandas as pd
import torch
from _common import add_device, add_tracking, job_device, job_settings, json_arg, setup

from r1flow.data.artifacts import read_table, write_table
from r1flow.data.formats import READABLE_MARKER
from r1flow.data.prompts import R1_CHAT_TEMPLATE
from r1flow.data.schemas import SFT_DATA, SFT_METRICS
from r1flow.models import add_tokens, load_policy, save_policy, sharded_root
from r1flow.models.lora import add_lora
from r1flow.training.sft import chat_pairs, train_sft

log = logging.getLogger("scripts.sft")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="the model to fine-tune (folder or hub id)")
    ap.add_argument("--gguf-file", default=None, help="a GGUF file inside --model, loaded through transformers")
    ap.add_argument("--data", nargs="+", required=True, help="SFT_DATA parquet files, concatenated")
    ap.add_argument("--settings", type=json_arg, required=True, help="an SFT section of the config")
    ap.add_argument("--stage", default="SFT")
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--state", default=None, help="folder for resumable state (outside the outputs)")
    ap.add_argument("--dtype", default="float32")
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
    s = a.settings
    data = pd.concat([read_table(p, SFT_DATA) for p in a.data], ignore_index=True)
    model, tok = load_policy(a.model, a.dtype, device, gguf_file=a.gguf_file)
    if not getattr(tok, "chat_template", None):  # the tiny base has none; real instruct models keep theirs
        tok.chat_template = R1_CHAT_TEMPLATE
    # one token for the marker, as a real special token would be, starting at the mean embedding
    add_tokens(model, tok, [READABLE_MARKER])
    # LoRA adapters (the stage's `lora` section; off by default): the base, the embeddings included, frozen
    model = add_lora(model, s.get("lora"), f"{a.stage}.lora")
    prompts, completions = chat_pairs(tok, data["messages"])
    rows = train_sft(model, tok, prompts, completions, epochs=s["epochs"], learning_rate=s["learning_rate"],
                     batch_size=s["batch_size"], micro_batch_size=s["micro_batch_size"], max_length=s["max_length"],
                     warmup_steps=s["warmup_steps"], seed=s["seed"],
                     gradient_checkpointing=s.get("gradient_checkpointing", False), deepspeed=a.deepspeed,
                     tracking=a.tracking, run_config=job_settings(a), state_dir=a.state,
                     save_every=s.get("save_every"), save_every_minutes=s.get("save_every_minutes"))
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if main or sharded_root(model) is not None:  # FSDP2: every rank gathers, rank 0 writes
        save_policy(model, tok, a.out, merged=True)  # a plain folder, adapters (if any) merged in
    if not main:
        return  # with DeepSpeed, rank 0 writes the outputs (every rank holds the same weights and rows)
    write_table(pd.DataFrame(rows), a.metrics, SFT_METRICS)
    if a.state:
        shutil.rmtree(a.state, ignore_errors=True)  # the outputs are written: nothing left to resume
    log.info(f"{a.stage}: {len(data)} examples x {s['epochs']} epochs, {len(rows)} updates, "
             f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} -> {a.out}")


if __name__ == "__main__":
    main()
