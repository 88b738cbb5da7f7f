"""Evaluation as in section 3: one model on one benchmark, n samples per problem at temperature 0.6 and
top-p 0.95, graded and summarised by r1flow.rewards.grading. Kept apart from r1flow.evaluation.benchmarks,
which the Snakefile imports at parse time to check benchmark specs without loading torch."""

from __future__ import annotations

import pandas as pd

from r1flow.evaluation.benchmarks import build_prompt, load_benchmark
from r1flow.generation import SamplingParams
from r1flow.rewards.grading import sample_and_grade, summarize


def run_benchmark(generator, tokenizer, spec, sampling: dict, reward_options: dict | None = None,
                  chat: bool = False, problems: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """Evaluate one model on one benchmark: (per-sample records, summary row without the model name).

    sampling: the config's evaluation section (temperature, top_p, max_new_tokens); spec: a BenchmarkSpec.
    """
    spec.check()
    problems = load_benchmark(spec) if problems is None else problems
    built = [build_prompt(q, spec.template, tokenizer, chat) for q in problems["question"]]
    prompts = [p for p, _ in built]
    prefilled = {t for _, t in built}
    if len(prefilled) > 1:
        raise ValueError("the chat template opens <think> for some prompts and not others")
    max_new = spec.max_new_tokens or sampling["max_new_tokens"]
    params = SamplingParams(spec.n, sampling["temperature"], sampling["top_p"], max_new)
    samples = sample_and_grade(generator, problems, prompts, params, spec.reward, reward_options,
                               prefilled_think=prefilled.pop(), format_reward=spec.format_check)
    row = summarize(samples, spec.pass_at_k, spec.cons_at_k, vote=spec.answer_type != "code")
    row.update(benchmark=spec.name, temperature=params.temperature, top_p=params.top_p, max_new_tokens=max_new)
    return samples, row
