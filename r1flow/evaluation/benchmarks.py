"""Benchmarks as config entries (section 3.1): where the problems come from, how a prompt is written,
how an answer is graded, how many samples are drawn.

Every loader returns the PROBLEMS table (benchmark, problem_id, question, answer, answer_type); a
benchmark is read from a local jsonl/parquet file or, when online, a `datasets` hub id and split.
Prompts are zero-shot: the paper found few-shot prompting degrades R1 (section 2.3.4 / 5).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from r1flow.data.artifacts import read_table
from r1flow.data.prompts import render
from r1flow.data.schemas import TASKS
from r1flow.rewards.math_answer import last_boxed

# Zero-shot templates. "math" is the instruction DeepSeek-R1's evaluation uses for math problems.
TEMPLATES = {
    "math": "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "multiple_choice": "Answer the following multiple choice question. Think step by step, then give the letter "
                       "of the correct choice within \\boxed{}.\n\n{prompt}",
    "code": "{prompt}\nWrite a complete Python program that reads from standard input and writes to standard "
            "output. Reason step by step, then give the program in one ```python code block.",
}
GRADERS = {"math": "accuracy", "multiple_choice": "choice_accuracy", "code": "code_accuracy"}


@dataclass
class BenchmarkSpec:
    name: str
    loader: str  # a key of LOADERS
    path: str | None = None  # local jsonl/parquet, or a hub id when `split` is set
    split: str | None = None
    fields: dict = field(default_factory=dict)  # question/answer/id column names for the generic loader
    answer_type: str = "math"
    template: str = "math"
    grader: str | None = None  # a reward name; default by answer type
    format_reward: str | None = None  # default: Table 1's `format` for the table1 template, else `format_think`
    n: int = 4  # samples generated per problem
    pass_at_k: list = field(default_factory=lambda: [1])
    cons_at_k: int | None = None
    max_new_tokens: int | None = None  # None: the evaluation section's
    limit: int | None = None  # the first `limit` problems only
    seed: int = 0  # shuffling of multiple-choice options

    @classmethod
    def from_config(cls, name: str, d: dict) -> BenchmarkSpec:
        spec = cls(name=name, **d)
        spec.check()
        return spec

    def check(self):
        if self.loader not in LOADERS:
            raise ValueError(f"benchmark '{self.name}': unknown loader '{self.loader}'; known: {sorted(LOADERS)}")
        too_big = [k for k in [*self.pass_at_k, self.cons_at_k or 0] if k > self.n]
        if too_big:  # never a silently smaller k
            raise ValueError(f"benchmark '{self.name}': k={max(too_big)} asked but only n={self.n} samples per "
                             "problem are generated; raise n or lower k")
        if self.answer_type not in GRADERS:
            raise ValueError(f"benchmark '{self.name}': answer_type must be one of {sorted(GRADERS)}")

    @property
    def reward(self) -> str:
        return self.grader or GRADERS[self.answer_type]

    @property
    def format_check(self) -> str:
        return self.format_reward or ("format" if self.template == "table1" else "format_think")


def _read_rows(path: str, split: str | None) -> list[dict]:
    p = Path(path)
    if p.exists():
        if p.suffix == ".parquet":
            return pd.read_parquet(p).to_dict("records")
        with open(p) as f:
            return [json.loads(line) for line in f if line.strip()]
    if split is None:
        raise FileNotFoundError(f"benchmark file '{path}' not found (give a local path, or a hub id with a split)")
    from datasets import load_dataset  # only when reading from the hub

    return list(load_dataset(path, split=split))


def _table(spec: BenchmarkSpec, rows: list[dict], question, answer, pid) -> pd.DataFrame:
    out = []
    for i, r in enumerate(rows):
        out.append({"benchmark": spec.name, "problem_id": str(pid(r, i)), "question": question(r),
                    "answer": str(answer(r)).strip(), "answer_type": spec.answer_type})
    df = pd.DataFrame(out, columns=["benchmark", "problem_id", "question", "answer", "answer_type"])
    return df.head(spec.limit) if spec.limit else df


def _field(spec, key, default):
    return spec.fields.get(key, default)


def load_generic(spec: BenchmarkSpec) -> pd.DataFrame:
    q, a, i = _field(spec, "question", "problem"), _field(spec, "answer", "answer"), _field(spec, "id", None)
    return _table(spec, _read_rows(spec.path, spec.split), lambda r: r[q], lambda r: r[a],
                  lambda r, n: r[i] if i else n)


def load_math500(spec):
    return _table(spec, _read_rows(spec.path, spec.split), lambda r: r["problem"], lambda r: r["answer"],
                  lambda r, n: r.get("unique_id", n))


def load_aime(spec):  # AIME 2024 and AMC 2023 share the fields; AMC answers may be stored as floats
    def answer(r):
        a = r["answer"]
        return int(a) if isinstance(a, float) and a.is_integer() else a

    return _table(spec, _read_rows(spec.path, spec.split), lambda r: r["problem"], answer,
                  lambda r, n: r.get("id", n))


def gsm8k_answer(worked: str) -> str:
    """GSM8K's answer is the number after '####', without thousands separators."""
    return worked.split("####")[-1].strip().replace(",", "")


def load_gsm8k(spec):
    return _table(spec, _read_rows(spec.path, spec.split), lambda r: r["question"],
                  lambda r: gsm8k_answer(r["answer"]), lambda r, n: r.get("idx", n))


def load_minerva(spec):
    def answer(r):
        boxed = last_boxed(r["solution"])
        if boxed is None:
            raise ValueError(f"Minerva problem {r.get('idx')} has no \\boxed answer in its solution")
        return boxed

    return _table(spec, _read_rows(spec.path, spec.split), lambda r: r["problem"], answer,
                  lambda r, n: r.get("idx", n))


LETTERS = "ABCD"


def load_gpqa(spec):
    """GPQA Diamond: the correct answer and three distractors, shuffled with a fixed seed per problem so
    that the correct letter is not always the same and every run sees the same order."""
    rows = _read_rows(spec.path, spec.split)
    questions, answers = [], []
    for i, r in enumerate(rows):
        choices = [r["Correct Answer"], r["Incorrect Answer 1"], r["Incorrect Answer 2"], r["Incorrect Answer 3"]]
        order = list(range(4))
        random.Random(f"{spec.seed}-{i}").shuffle(order)
        body = "\n".join(f"{LETTERS[j]}) {str(choices[o]).strip()}" for j, o in enumerate(order))
        questions.append(f"{str(r['Question']).strip()}\n\n{body}")
        answers.append(LETTERS[order.index(0)])
    return _table(spec, list(zip(questions, answers, rows)), lambda t: t[0], lambda t: t[1],
                  lambda t, n: t[2].get("Record ID", n))


def load_livecodebench(spec):
    """LiveCodeBench code generation: stdin/stdout tests become the code grader's JSON gold."""
    def tests(r):
        cases = []
        for key in ("public_test_cases", "private_test_cases"):
            raw = r.get(key) or "[]"
            items = json.loads(raw) if isinstance(raw, str) else raw
            cases += [{"input": t["input"], "output": t["output"]} for t in items if t.get("testtype", "stdin") == "stdin"]
        return json.dumps({"language": "python", "tests": cases})

    return _table(spec, _read_rows(spec.path, spec.split), lambda r: r["question_content"], tests,
                  lambda r, n: r.get("question_id", n))


def load_tasks(spec):
    """The held-out test split of the `tasks` rule (a TASKS parquet: synthetic tasks or real files)."""
    df = read_table(spec.path, TASKS)
    return _table(spec, df.to_dict("records"), lambda r: r["question"], lambda r: r["answer"],
                  lambda r, n: r["prompt_id"])


LOADERS = {
    "generic": load_generic, "math500": load_math500, "aime24": load_aime, "amc23": load_aime,
    "gsm8k": load_gsm8k, "minerva": load_minerva, "gpqa_diamond": load_gpqa, "livecodebench": load_livecodebench,
    "tasks": load_tasks,
    "synthetic": load_tasks,  # the old name, from when the split was always synthetic
}


def load_benchmark(spec: BenchmarkSpec) -> pd.DataFrame:
    return LOADERS[spec.loader](spec)


# -- prompts ------------------------------------------------------------------------------------------
THINK_OPEN = "<think>"


def build_prompt(question: str, template: str, tokenizer=None, chat: bool = False) -> tuple[str, bool]:
    """The text the model continues, and whether it already opens the reasoning with <think>.

    With chat=True the zero-shot prompt is the user turn of the tokenizer's chat template. Some
    templates (DeepSeek-R1's distilled models) end the prompt with "<think>\\n"; the completion then
    starts inside the reasoning, and graders must see that opening tag (see `graded_text`).
    """
    text = render(question, TEMPLATES.get(template, template))
    if chat:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text, text.rstrip().endswith(THINK_OPEN)

