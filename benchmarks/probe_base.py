"""How well did a base model learn its textbook arithmetic? Greedy worked solutions outside the template.

    python benchmarks/probe_base.py --model RUN/results/models/base --tasks RUN/results/data/tasks/test.parquet

Each task's question is given as the textbook gives it ("Compute (7+5)*2-3:", no Table 1 template) and the
base's greedy continuation is read for "So the answer is N" (or a guess task's "x=N"). Prints the share
right overall and by family and difficulty. On the miniature every later stage inherits this accuracy: a
cold start or an RL stage can select the base's careful reasoning, not fix its arithmetic (issue 26).
"""

import argparse
import re

import pandas as pd
import torch

from r1flow.generation import Generator, SamplingParams
from r1flow.models import load_policy

ANSWER_RE = re.compile(r"So the answer is (-?\d+)|x=(\d+)")


def textbook_accuracy(model, tokenizer, tasks: pd.DataFrame, max_new_tokens: int = 80) -> pd.DataFrame:
    """tasks with an `ok` column: the greedy textbook-style answer equals the task's answer."""
    gen = Generator(model, tokenizer, seed=0)
    out = gen.generate([f"{q}:" for q in tasks["question"]],
                       SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    found = [ANSWER_RE.search(t) for t in out.texts]
    got = [None if m is None else (m.group(1) or m.group(2)) for m in found]
    return tasks.assign(ok=[g is not None and g == str(a) for g, a in zip(got, tasks["answer"])])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a base model folder")
    ap.add_argument("--tasks", required=True, help="a task table (parquet)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_policy(a.model)
    t = textbook_accuracy(model.eval(), tok, pd.read_parquet(a.tasks))
    by = t.groupby(["task", "difficulty"])["ok"].mean()
    print(f"{a.model}: textbook accuracy {100 * t['ok'].mean():.1f}% of {len(t)}; "
          + ", ".join(f"{f} {d}: {100 * v:.0f}%" for (f, d), v in by.items()))


if __name__ == "__main__":
    main()
