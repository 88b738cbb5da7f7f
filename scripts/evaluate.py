"""Rule `evaluate`: one model on one benchmark; per-sample records and a summary row (section 3)."""

import argparse
import logging

import pandas as pd
import torch
from _common import add_device, job_device, json_arg, setup

from r1flow.data.artifacts import write_table
from r1flow.data.schemas import EVAL_SUMMARY, SAMPLES
from r1flow.evaluation.benchmarks import BenchmarkSpec
from r1flow.evaluation.runner import run_benchmark
from r1flow.generation import make_generator
from r1flow.models import load_policy, load_tokenizer
from r1flow.rewards.code import code_preflight

log = logging.getLogger("scripts.evaluate")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="a model folder or hub id")
    ap.add_argument("--gguf-file", default=None, help="a GGUF file inside --model, loaded through transformers")
    ap.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    ap.add_argument("--name", required=True, help="label of the model in the tables")
    ap.add_argument("--benchmark", required=True, help="benchmark name")
    ap.add_argument("--spec", type=json_arg, required=True, help="the benchmark's config entry")
    ap.add_argument("--data", default=None, help="overrides the spec's path (a file built by another rule)")
    ap.add_argument("--evaluation", type=json_arg, required=True, help="the evaluation section's sampling settings")
    ap.add_argument("--rewards", type=json_arg, default={}, help="the config's rewards section")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--samples", required=True)
    ap.add_argument("--summary", required=True)
    ap.add_argument("--generation", type=json_arg, default=None, help="the config's generation section (backend)")
    ap.add_argument("--threads", type=int, default=None)
    add_device(ap)
    a = ap.parse_args()
    setup(a.threads)
    device = job_device(a.device)
    e = a.evaluation
    spec = BenchmarkSpec.from_config(a.benchmark, {**a.spec, **({"path": a.data} if a.data else {})})
    code_preflight({spec.reward: 1.0}, a.rewards)  # before the model loads: a host that cannot run programs stops
    if (a.generation or {}).get("backend") == "vllm":  # vLLM loads the weights itself
        model, tok = None, load_tokenizer(a.model, gguf_file=a.gguf_file)
    else:
        model, tok = load_policy(a.model, a.dtype, device, gguf_file=a.gguf_file)
    gen = make_generator(model, tok, a.generation, model_path=a.model, batch_size=e["batch_size"], seed=e["seed"],
                         progress=True)
    with torch.inference_mode():
        samples, row = run_benchmark(gen, tok, spec, e, a.rewards, chat=a.chat)
    write_table(samples, a.samples, SAMPLES)
    write_table(pd.DataFrame([{"model": a.name, **row}]), a.summary, EVAL_SUMMARY)
    cons = (f"  cons@{row['cons_k']} {row['cons@k']:.3f} [{row['cons@k_lo']:.3f}, {row['cons@k_hi']:.3f}]"
            if row.get("cons@k") is not None else "")
    log.info(f"{a.name} on {spec.name}: pass@1 {row['pass@1']:.3f} ± {row['pass@1_se']:.3f}{cons}  format "
             f"{row['format_rate']:.3f}  truncated {row['truncated_rate']:.3f}  ({row['num_problems']} problems x "
             f"{row['n']} samples)")
    if row["sandbox_errors"]:  # scored as wrong, but the host failed, not the model: say so where it is read
        log.warning(f"{a.name} on {spec.name}: {row['sandbox_errors']} samples could not be run by the sandbox "
                    "(reason sandbox_error in the samples table); their code reward is 0")


if __name__ == "__main__":
    main()
