"""Rule `rejection_sampling`: several samples per prompt from the reasoning-RL checkpoint; only correct,
readable ones are kept (section 2.3.3): no mixed languages, long paragraphs or code blocks."""

import argparse
import logging

import pandas as pd
from _common import add_device, job_device, json_arg, setup

from r1flow.data import cold_start as C
from r1flow.data.artifacts import read_table, write_table
from r1flow.data.prompts import chat_prompt
from r1flow.data.schemas import SFT_DATA, TASKS
from r1flow.generation import make_generator
from r1flow.models import load_policy
from r1flow.training import sft_data as S

log = logging.getLogger("scripts.rejection_sampling")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="the reasoning-RL checkpoint")
    ap.add_argument("--train", required=True)
    ap.add_argument("--settings", type=json_arg, required=True, help="the config's r1.rejection_sampling section")
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
    out, cut = S.sample_completions(a.model, lambda tok: [chat_prompt(tok, q) for q in tasks["question"]], s,
                                    a.generation, a.dtype, device)
    texts = [t.strip() for t in out]
    ids = [p for p in tasks["prompt_id"] for _ in range(k)]
    qs = [q for q in tasks["question"] for _ in range(k)]
    golds = [g for g in tasks["answer"] for _ in range(k)]
    why = S.drop_truncated(S.readability(texts, golds, max_paragraph_chars=s["max_paragraph_chars"]), cut)
    if s["judge"]["type"] == "model":  # a generative judge for answers the rules called wrong
        judge_model, judge_tok = load_policy(s["judge"]["model"], a.dtype, device)
        wrong = [i for i, w in enumerate(why) if w == "wrong"]
        verdicts = S.model_judge(make_generator(judge_model, judge_tok, None), [qs[i] for i in wrong],
                                 [golds[i] for i in wrong], [texts[i] for i in wrong])
        for i, ok in zip(wrong, verdicts):
            why[i] = "" if ok else "wrong"
    keep = [i for i, w in enumerate(why) if not w]
    rows = C.select(C.sft_rows([ids[i] for i in keep], [qs[i] for i in keep], [texts[i] for i in keep],
                               "rejection_sampling", "stop"), s["target_size"], s["seed"], s["drop_repeats"])
    if rows.empty:  # a real run would stop here; a toy one (the smoke config) goes on with the other SFT data
        log.warning("rejection sampling kept no sample; the SFT stage gets non-reasoning data only")
        rows = pd.DataFrame({"prompt_id": pd.Series(dtype=str), "messages": pd.Series(dtype=object),
                             "source": pd.Series(dtype=str), "stop_reason": pd.Series(dtype=str)})
    write_table(rows, a.out, SFT_DATA)
    log.info(f"rejection sampling: {len(texts)} samples, {len(keep)} correct and readable, kept {len(rows)} "
             f"({'repeats of a prompt sample dropped, ' if s['drop_repeats'] else ''}at most target_size); dropped "
             f"{pd.Series([w for w in why if w]).value_counts().to_dict()}")


if __name__ == "__main__":
    main()
