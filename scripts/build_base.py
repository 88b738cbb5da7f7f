"""Rule `base_model`: build the embedded stand-in for DeepSeek-V3-Base (a tiny Llama, pretrained briefly)."""

import argparse
import logging

import pandas as pd
from _common import add_device, job_device, json_arg, setup

from r1flow.data.artifacts import read_table
from r1flow.data.schemas import TASKS
from r1flow.data.tasks import problem_key
from r1flow.models.tiny import build_base_model

log = logging.getLogger("scripts.build_base")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny", type=json_arg, required=True, help="the config's base_model.tiny section")
    ap.add_argument("--families", type=json_arg, required=True, help="task families of the corpus")
    ap.add_argument("--template", default="table1")
    ap.add_argument("--exclude", nargs="*", default=[], help="task tables whose problems must not be pretrained on")
    ap.add_argument("--out", required=True, help="output model folder (save_pretrained)")
    ap.add_argument("--loss", required=True, help="output CSV of the pretraining loss")
    ap.add_argument("--tokenizer", default=None, help="a model folder whose tokenizer to use instead of training one")
    ap.add_argument("--threads", type=int, default=None)
    add_device(ap)
    a = ap.parse_args()
    setup(a.threads)
    device = job_device(a.device)
    exclude = set()
    for path in a.exclude:
        table = read_table(path, TASKS)
        exclude |= set(map(problem_key, table["task"], table["question"], table["answer"]))
    losses = build_base_model(a.tiny, a.families, a.template, a.out, exclude, device=device,
                              tokenizer_from=a.tokenizer)
    pd.DataFrame(losses).to_csv(a.loss, index=False)
    log.info(f"base model -> {a.out} (final pretraining loss {losses[-1]['loss']:.3f})")


if __name__ == "__main__":
    main()
