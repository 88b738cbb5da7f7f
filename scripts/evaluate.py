"""Rule `evaluate`: k samples per held-out prompt; pass@1 and cons@k (section 3)."""

import argparse

import pandas as pd
import torch
from _common import json_arg, setup

from r1flow.data.artifacts import read_table, write_table
from r1flow.data.schemas import EVAL_SUMMARY, SAMPLES, TASKS
from r1flow.evaluation import sample_and_score, summarize
from r1flow.generation import SamplingParams, make_generator
from r1flow.models import load_policy, load_tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", required=True, help="label in the tables")
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--evaluation", type=json_arg, required=True, help="the config's evaluation section")
    ap.add_argument("--template", default="table1")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--samples", required=True)
    ap.add_argument("--summary", required=True)
    ap.add_argument("--benchmark-name", default="held-out")
    ap.add_argument("--generation", type=json_arg, default=None, help="the config's generation section (backend)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    setup(a.threads)
    e = a.evaluation
    tasks = read_table(a.tasks, TASKS)
    if (a.generation or {}).get("backend") == "vllm":  # vLLM loads the weights itself
        model, tok = None, load_tokenizer(a.model)
    else:
        model, tok = load_policy(a.model, a.dtype)
    gen = make_generator(model, tok, a.generation, model_path=a.model, batch_size=e["batch_size"], seed=e["seed"])
    params = SamplingParams(e["k"], e["temperature"], e["top_p"], e["max_new_tokens"])
    with torch.inference_mode():
        samples = sample_and_score(gen, tasks, params, a.template)
    write_table(samples, a.samples, SAMPLES)
    s = summarize(samples, e["k"])
    row = {"model": a.name, "benchmark": a.benchmark_name, **s, "temperature": e["temperature"], "top_p": e["top_p"]}
    write_table(pd.DataFrame([row]), a.summary, EVAL_SUMMARY)
    print(f"{a.name}: pass@1 {s['pass@1']:.3f}  cons@{e['k']} {s['cons@k']:.3f}  format {s['format_rate']:.3f}")


if __name__ == "__main__":
    main()
