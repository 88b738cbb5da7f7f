"""Benchmarks as config entries (section 3.1): where the problems come from, how a prompt is written,
how an answer is graded, how many samples are drawn.

Every loader returns the PROBLEMS table (benchmark, problem_id, question, answer, answer_type); a
benchmark is read from a local jsonl/parquet/csv file or, when online, a `datasets` hub id and split.
Each loader reads one published record layout (its docstring names the dataset and the fields); a record
without those fields stops the load with an error naming the file and the missing fields.
Prompts are zero-shot: the paper found few-shot prompting degrades R1 (section 2.3.4 / 5).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import random
import zlib
from dataclasses import dataclass, field
from datetime import date, datetime
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
    # How the program takes its input belongs to the problem (stdin, or a LeetCode method), so the
    # loader writes it into the question; a stdin problem renders as this template always has.
    "code": "{prompt} Reason step by step, then give the program in one ```python code block.",
}
STDIN_INSTRUCTION = "Write a complete Python program that reads from standard input and writes to standard output."
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
    date_from: str | None = None  # livecodebench: first contest day kept, "YYYY-MM-DD", inclusive
    date_to: str | None = None  # livecodebench: last contest day kept, inclusive

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
        if (self.date_from or self.date_to) and self.loader != "livecodebench":
            raise ValueError(f"benchmark '{self.name}': date_from/date_to select by contest_date, which only the "
                             "livecodebench loader reads")
        lo, hi = self.window
        if lo and hi and lo > hi:
            raise ValueError(f"benchmark '{self.name}': date_from {lo} is after date_to {hi}")

    @property
    def window(self) -> tuple[date | None, date | None]:
        """The contest-date window as dates (None: open on that side)."""
        def day(key):
            v = getattr(self, key)
            if v is None or isinstance(v, date):
                return v.date() if isinstance(v, datetime) else v
            try:
                return datetime.strptime(str(v), "%Y-%m-%d").date()
            except ValueError:
                raise ValueError(f"benchmark '{self.name}': {key} must be a date 'YYYY-MM-DD', got {v!r}") from None

        return day("date_from"), day("date_to")

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
        if p.suffix == ".csv":  # GPQA is published as CSV; cells stay text ("7" is not 7.0, "NA" not NaN)
            return pd.read_csv(p, dtype=str, keep_default_na=False).to_dict("records")
        with open(p) as f:
            return [json.loads(line) for line in f if line.strip()]
    if split is None:
        raise FileNotFoundError(f"benchmark file '{path}' not found (give a local path, or a hub id with a split)")
    from datasets import load_dataset  # only when reading from the hub

    return list(load_dataset(path, split=split))


def _records(spec: BenchmarkSpec, needs) -> list[dict]:
    """The benchmark's records, each holding the fields `needs`: a file of another layout stops here with
    the fields it lacks, not with a bare KeyError later or an empty table."""
    rows = _read_rows(spec.path, spec.split)
    if not rows:
        raise ValueError(f"benchmark '{spec.name}': '{spec.path}' holds no records")
    for i, r in enumerate(rows):
        missing = [k for k in needs if k not in r]
        if missing:
            raise ValueError(f"benchmark '{spec.name}': record {i} of '{spec.path}' lacks {missing}: the "
                             f"'{spec.loader}' loader reads a layout with {list(needs)}; the record has {sorted(r)}")
    return rows


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
    return _table(spec, _records(spec, [q, a] + ([i] if i else [])), lambda r: r[q], lambda r: r[a],
                  lambda r, n: r[i] if i else n)


def load_math500(spec):
    """MATH-500 as published (HuggingFaceH4/MATH-500, test.jsonl): problem, answer, unique_id (the id);
    solution, subject and level are not read."""
    return _table(spec, _records(spec, ["problem", "answer"]), lambda r: r["problem"], lambda r: r["answer"],
                  lambda r, n: r.get("unique_id", n))


def load_aime(spec):
    """AIME 2024 and AMC 2023 as in Qwen2.5-Math's evaluation sets (QwenLM/Qwen2.5-Math,
    evaluation/data/aime24/test.jsonl and amc23/test.jsonl): id, problem, answer, url, and the problem
    again as question; aime24 adds solution. AIME answers are strings ("204"), AMC answers floats (27.0)."""
    def answer(r):
        a = r["answer"]
        return int(a) if isinstance(a, float) and a.is_integer() else a

    return _table(spec, _records(spec, ["problem", "answer"]), lambda r: r["problem"], answer,
                  lambda r, n: r.get("id", n))


def gsm8k_answer(worked: str) -> str:
    """GSM8K's answer is the number after '####', without thousands separators."""
    return worked.split("####")[-1].strip().replace(",", "")


def load_gsm8k(spec):
    """GSM8K's test split (openai/gsm8k, config main): question, answer (the worked solution ending in
    '#### N'); Qwen2.5-Math's copy (evaluation/data/gsm8k/test.jsonl) adds idx, the id when present."""
    return _table(spec, _records(spec, ["question", "answer"]), lambda r: r["question"],
                  lambda r: gsm8k_answer(r["answer"]), lambda r, n: r.get("idx", n))


def load_minerva(spec):
    """Minerva's undergraduate STEM problems as in Qwen2.5-Math's evaluation/data/minerva_math/test.jsonl:
    problem, solution (the answer is its last \\boxed{}), type, idx (the id)."""
    def answer(r):
        boxed = last_boxed(r["solution"])
        if boxed is None:
            raise ValueError(f"Minerva problem {r.get('idx')} has no \\boxed answer in its solution")
        return boxed

    return _table(spec, _records(spec, ["problem", "solution"]), lambda r: r["problem"], answer,
                  lambda r, n: r.get("idx", n))


LETTERS = "ABCD"
GPQA_FIELDS = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]


def load_gpqa(spec):
    """GPQA Diamond as published (Idavidrein/gpqa, gpqa_diamond.csv, read as CSV, jsonl or parquet):
    Question, Correct Answer, Incorrect Answer 1..3, Record ID (the id); the other columns are not read.
    The correct answer and the three distractors are shuffled with a fixed seed per problem so that the
    correct letter is not always the same and every run sees the same order."""
    rows = _records(spec, GPQA_FIELDS)
    questions, answers = [], []
    for i, r in enumerate(rows):
        choices = [r[k] for k in GPQA_FIELDS[1:]]
        order = list(range(4))
        random.Random(f"{spec.seed}-{i}").shuffle(order)
        body = "\n".join(f"{LETTERS[j]}) {str(choices[o]).strip()}" for j, o in enumerate(order))
        questions.append(f"{str(r['Question']).strip()}\n\n{body}")
        answers.append(LETTERS[order.index(0)])
    return _table(spec, list(zip(questions, answers, rows)), lambda t: t[0], lambda t: t[1],
                  lambda t, n: t[2].get("Record ID", n))


LCB_FIELDS = ["question_id", "question_content", "contest_date", "starter_code", "metadata",
              "public_test_cases", "private_test_cases"]


class _TextOnly(pickle.Unpickler):
    """LiveCodeBench's private tests are a pickled str; refusing every class keeps a crafted benchmark
    file from running code in the evaluation job."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: expected a pickled string")


def decode_lcb_tests(raw) -> list:
    """A test-case field of LiveCodeBench: a JSON list, or (code_generation_lite's private tests) the same
    JSON, pickled, zlib-compressed and base64-encoded. Base64 has no '[', so the first character tells."""
    if isinstance(raw, list):
        return raw
    text = (raw or "").strip()
    if not text:
        return []
    if not text.startswith("["):
        text = _TextOnly(io.BytesIO(zlib.decompress(base64.b64decode(text.encode("utf-8"))))).load()
    return json.loads(text)


def load_livecodebench(spec):
    """LiveCodeBench code generation as published (livecodebench/code_generation_lite, test.jsonl ..
    test6.jsonl): question_id, question_content, contest_date (ISO, e.g. "2024-08-03T00:00:00"),
    starter_code, metadata (JSON; "func_name" for LeetCode problems), public_test_cases (JSON) and
    private_test_cases (JSON, or base64 of zlib of a pickled JSON string), each test {input, output,
    testtype}. question_title, platform, contest_id and difficulty are not read.

    Both kinds of test become the code grader's gold: stdin tests as {input, output}; functional tests
    (testtype "functional": the input holds the arguments, one JSON value per line, the output the
    returned value) with testtype kept and the method's name as "fn_name". A functional problem's
    question carries the starter code, as LiveCodeBench's own prompt does; a stdin problem's says to read
    standard input. date_from/date_to keep the problems whose contest day lies in the window (the paper
    evaluates 2024-08-01 to 2025-01-31, section 3)."""
    lo, hi = spec.window
    problems = []
    for r in _records(spec, LCB_FIELDS):
        where = f"benchmark '{spec.name}': problem {r['question_id']} of '{spec.path}'"
        try:
            day = datetime.fromisoformat(str(r["contest_date"])).date()
            tests = decode_lcb_tests(r["public_test_cases"]) + decode_lcb_tests(r["private_test_cases"])
            meta = r["metadata"] or "{}"
            meta = json.loads(meta) if isinstance(meta, str) else meta
            if not isinstance(meta, dict):
                raise TypeError(f"metadata is {type(meta).__name__}, not an object")
        except (ValueError, TypeError, EOFError, zlib.error, pickle.UnpicklingError) as e:
            raise ValueError(f"{where}: not LiveCodeBench's layout ({type(e).__name__}: {e})") from None
        if (lo and day < lo) or (hi and day > hi):
            continue
        bad = [t for t in tests if not isinstance(t, dict) or {"input", "output", "testtype"} - set(t)
               or t["testtype"] not in ("stdin", "functional")]
        if bad:
            raise ValueError(f"{where}: a test is not {{input, output, testtype: stdin|functional}}: {str(bad[0])[:200]}")
        # stdin tests keep the gold's original form; functional ones say so and name the method
        gold = {"language": "python", "tests": [{"input": t["input"], "output": t["output"]} if t["testtype"] == "stdin"
                                                else {"input": t["input"], "output": t["output"], "testtype": "functional"}
                                                for t in tests]}
        question = f"{r['question_content']}\n{STDIN_INSTRUCTION}"
        if any(t["testtype"] == "functional" for t in tests):
            if not meta.get("func_name"):
                raise ValueError(f"{where}: functional tests but no func_name in its metadata")
            gold["fn_name"] = meta["func_name"]
            question = (f"{r['question_content']}\n\nYou will use the following starter code to write the solution "
                        f"to the problem.\n```python\n{r['starter_code']}\n```\nThe tests call the method "
                        f"`{meta['func_name']}` of `Solution()` directly; nothing is read from standard input.")
        problems.append((r["question_id"], question, json.dumps(gold)))
    if not problems:
        raise ValueError(f"benchmark '{spec.name}': no problem of '{spec.path}' has a contest date in the window "
                         f"date_from={spec.date_from} .. date_to={spec.date_to}")
    return _table(spec, problems, lambda p: p[1], lambda p: p[2], lambda p, n: p[0])


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

