"""Rule `cold_start_data`: long-CoT data in the readable pattern (section 2.3.1), from few-shot prompting
of the base model and from R1-Zero outputs, rewritten, then filtered for correctness and readability."""

import argparse
import logging

import pandas as pd
from _common import add_device, job_device, json_arg, setup

from r1flow.data import cold_start as C
from r1flow.data.artifacts import read_table, write_table
from r1flow.data.prompts import render
from r1flow.data.schemas import SFT_DATA, TASKS
from r1flow.training import sft_data as S

log = logging.getLogger("scripts.cold_start")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True)
    ap.add_argument("--gguf-file", default=None, help="a GGUF file inside --base, loaded through transformers")
    ap.add_argument("--r1-zero", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--settings", type=json_arg, required=True, help="the config's r1.cold_start section")
    ap.add_argument("--generation", type=json_arg, default=None)
    ap.add_argument("--dtype", default="float32", help="the dtype the models are loaded in")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=None)
    add_device(ap)
    a = ap.parse_args()
    setup(a.threads)
    device = job_device(a.device)
    s = a.settings
    tasks = C.sample_prompts(read_table(a.train, TASKS), s)
    k = s["samples_per_prompt"]
    ids = [p for p in tasks["prompt_id"] for _ in range(k)]
    qs = [q for q in tasks["question"] for _ in range(k)]
    golds = [g for g in tasks["answer"] for _ in range(k)]
    parts, report = [], {}
    if "few_shot" in s["sources"]:
        # one worked example with a long chain of thought in front of each question (few-shot prompting)
        prompts = [C.FEW_SHOT.format(example=s["few_shot_example"], question=q) for q in tasks["question"]]
        texts, cut = S.sample_completions(a.base, prompts, s, a.generation, a.dtype, device, gguf_file=a.gguf_file)
        parts.append(("few_shot", [C.rewrite_few_shot(t) for t in texts], cut))
    if "annotated" in s["sources"]:
        # a real prompt set's worked solutions (GSM8K, MATH) or the synthetic chains, written out
        sols = [x for x in (tasks["solution"] if "solution" in tasks else [None] * len(tasks)) for _ in range(k)]
        parts.append(("annotated", [C.annotate(q, sol, g) for q, sol, g in zip(qs, sols, golds)], None))
    if "r1_zero" in s["sources"]:
        texts, cut = S.sample_completions(a.r1_zero, [render(q, "table1") for q in tasks["question"]], s,
                                          a.generation, a.dtype, device)
        parts.append(("r1_zero", [C.rewrite_r1_zero(t) for t in texts], cut))
    frames = []
    for source, rewritten, cut in parts:  # cut: truncated per sample (None: written by rule, not sampled)
        keep = [i for i, t in enumerate(rewritten) if t is not None]
        why = S.readability([rewritten[i] for i in keep], [golds[i] for i in keep])
        if cut is not None:
            why = S.drop_truncated(why, [cut[i] for i in keep])
        ok = [i for i, w in zip(keep, why) if not w]
        report[source] = {"sampled": len(rewritten), "rewritten": len(keep), "kept": len(ok),
                          "dropped": pd.Series([w for w in why if w]).value_counts().to_dict()}
        frames.append(C.sft_rows([ids[i] for i in ok], [qs[i] for i in ok], [rewritten[i] for i in ok], source,
                                 "written" if cut is None else "stop"))
    data = C.select(pd.concat([f for f in frames if not f.empty] or frames, ignore_index=True), s["size"], s["seed"])
    if data.empty:
        raise RuntimeError(f"no cold-start sample survived the filters: {report}")
    write_table(data, a.out, SFT_DATA)
    log.info(f"cold start: {len(data)} samples ({data['source'].value_counts().to_dict()}); filters: {report}")


if __name__ == "__main__":
    main()
