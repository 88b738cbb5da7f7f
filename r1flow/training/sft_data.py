"""The model-facing half of the cold-start (section 2.3.1) and rejection-sampling (section 2.3.3) stages:
completions sampled from a model folder, the readability filter (rule-based rewards) and the model judge.
The text rewriting and table building they feed are in r1flow.data.cold_start."""

from __future__ import annotations

import re

import torch

from r1flow import rewards as R
from r1flow.data.cold_start import judge_prompt, parse_judgement, summary_of
from r1flow.data.formats import READABLE_MARKER
from r1flow.generation import SamplingParams, make_generator
from r1flow.models import load_policy, load_tokenizer
from r1flow.rewards.math_answer import extract_answer


def readability(texts: list[str], golds: list[str], marker: str = READABLE_MARKER, target: str = "en",
                max_paragraph_chars: int = 2000) -> list[str]:
    """Why each readable completion would be dropped ('' = keep): wrong answer, malformed (no summary,
    markers out of place), mixed languages, a paragraph longer than max_paragraph_chars, a code block."""
    fmt = R.get("format_readable")(texts, golds, marker=marker)
    lang = R.get("language_consistency")(texts, golds, target=target, marker=marker)
    acc = R.get("accuracy")(texts, golds)
    out = []
    for t, f, la, a in zip(texts, fmt, lang, acc):
        if a.score < 1:
            out.append("wrong")
        elif f.score < 1:
            out.append("malformed:" + f.reason)
        elif la.reason != "no_words" and la.score < 1:
            out.append("mixed_language")
        elif "```" in t:
            out.append("code_block")
        elif max(len(p) for p in re.split(r"\n\s*\n", t)) > max_paragraph_chars:
            out.append("long_paragraph")
        else:
            out.append("")
    return out


def model_judge(generator, questions, golds, completions) -> list[bool]:
    """Greedy yes/no verdicts from the configured judge model (DeepSeek-V3 in the paper)."""
    preds = [extract_answer(c) or summary_of(c) for c in completions]
    prompts = [judge_prompt(q, g, p) for q, g, p in zip(questions, golds, preds)]
    out = generator.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=4))
    return [parse_judgement(t) for t in out.texts]


def sample_completions(model_path: str, prompts, s: dict, generation: dict | None,
                       dtype: str = "float32", device: str | torch.device = "cpu",
                       gguf_file: str | None = None) -> tuple[list[str], list[bool]]:
    """s["samples_per_prompt"] completions per prompt from a model folder, hub id or GGUF file (loaded in
    `dtype` on `device`), at s["temperature"], and whether each was cut off at s["max_new_tokens"].
    `prompts` is a list of texts, or a function of the model's tokenizer (for chat templates).
    A truncated sample must never become SFT data: SFT appends an end of sequence to every target, so a
    cut-off chain of thought would teach the model to stop mid-thought (see `drop_truncated`)."""
    if (generation or {}).get("backend") == "vllm":  # vLLM loads the weights itself: no HF copy beside it
        model, tok = None, load_tokenizer(model_path, gguf_file=gguf_file)
    else:
        model, tok = load_policy(model_path, dtype, device, gguf_file=gguf_file)
    gen = make_generator(model, tok, generation, model_path=model_path, seed=s["seed"], progress=True)
    texts = prompts(tok) if callable(prompts) else prompts
    with torch.inference_mode():
        out = gen.generate(texts, SamplingParams(s["samples_per_prompt"], s["temperature"], 1.0, s["max_new_tokens"]))
    return list(out.texts), [bool(t) for t in out.truncated.tolist()]


def drop_truncated(why: list[str], truncated: list[bool]) -> list[str]:
    """The filter's reasons with every truncated sample dropped as "truncated" (checked before anything
    else: a cut-off sample may already hold a closed \\boxed{} answer and pass every other filter)."""
    if len(why) != len(truncated):
        raise ValueError(f"{len(why)} filter reasons for {len(truncated)} samples")
    return ["truncated" if t else w for w, t in zip(why, truncated)]
