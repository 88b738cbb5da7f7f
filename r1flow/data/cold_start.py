"""Cold-start data (section 2.3.1) and rejection sampling (section 2.3.3): long chains of thought in the
readable pattern |special_token|<reasoning_process>|special_token|<summary>, as SFT data.

Cold-start sources, as the paper lists them (and `annotated`, worked solutions written out for the
synthetic tasks, standing in for the human annotators who post-processed the data):
- `few_shot`: the base model prompted with a long-CoT example; its continuation is rewritten into the
  readable pattern (reasoning, then a summary that states the answer);
- `r1_zero`: R1-Zero outputs (<think> ... </think> <answer> ... </answer>) rewritten the same way.
Only correct samples are kept, then unreadable ones are dropped (mixed languages, no summary,
malformed). Rejection sampling keeps the correct samples of the reasoning-RL checkpoint and drops chains
of thought with mixed languages, long paragraphs or code blocks.

Sampling from models, the readability filter and the model judge are in r1flow.training.sft_data.

Every SFT table has a conversational `messages` column (user, then assistant), which Hugging Face
tooling (TRL's SFTTrainer, datasets) reads directly.
"""

from __future__ import annotations

import random
import re
import zlib

import pandas as pd

from r1flow.data.formats import READABLE_MARKER, split_readable
from r1flow.data.tasks import Task, apply_op, worked_solution

# The few-shot prompt: one worked example in the form the base model has seen, then the question.
FEW_SHOT = "{example}\n{question}:"
WORKED_RE = re.compile(r"^\s*(?P<steps>.*?)\.?\s*So the answer is (?P<answer>[^\s.]+)\.?", re.DOTALL)


def readable(reasoning: str, answer: str, marker: str = READABLE_MARKER) -> str:
    """The readable pattern: the reasoning process, then a summary with the boxed answer. The reasoning
    keeps the wording it was written in ("7+5=12 12*2=24"): the base learnt its arithmetic in that
    wording, and a tiny model does not carry it over to a new one ("First 7+5=12, then ...") from a few
    hundred samples; what the pattern adds for a reader is the delimited reasoning and the summary."""
    return f"{marker} {reasoning.strip().rstrip('.')} {marker} The answer is \\boxed{{{answer}}}."


def rewrite_few_shot(completion: str, marker: str = READABLE_MARKER) -> str | None:
    """A worked continuation ('7+5=12 12*2=24. So the answer is 24.') in the readable pattern."""
    m = WORKED_RE.match(completion)
    if m is None or not m.group("steps").strip():
        return None
    return readable(m.group("steps"), m.group("answer"), marker)


def rewrite_r1_zero(completion: str, marker: str = READABLE_MARKER) -> str | None:
    """An R1-Zero completion in the readable pattern (reasoning kept, answer moved into the summary)."""
    m = re.match(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", completion, re.DOTALL)
    if m is None or not m.group(1).strip() or not m.group(2).strip():
        return None
    return readable(m.group(1), m.group(2).strip(), marker)


CHAIN_RE = re.compile(r"Compute [(\s]*(\d+)((?:[)\s]*[-+*]\s*\d+)+)[)\s]*")


def chain_steps(question: str) -> list[tuple[int, str, int, int]] | None:
    """(value, op, operand, result) for each step of an arithmetic-chain question, left to right, or None."""
    m = CHAIN_RE.fullmatch(question.strip())
    if m is None:
        return None
    value, steps = int(m.group(1)), []
    for op, k in re.findall(r"([-+*])\s*(\d+)", m.group(2)):
        new = apply_op(value, op, int(k))
        steps.append((value, op, int(k), new))
        value = new
    return steps


def annotate_chain(question: str) -> str | None:
    """A worked solution written out for an arithmetic-chain question ("Compute (7+5)*2-3" -> "7+5=12
    12*2=24 24-3=21. So the answer is 21."), the base model's own textbook style. None for other questions."""
    steps = chain_steps(question)
    if steps is None:
        return None
    return " ".join(f"{v}{op}{k}={new}" for v, op, k, new in steps) + f". So the answer is {steps[-1][3]}."


GUESS_RE = re.compile(r"Find x: (?P<expr>[^=]+?) = (?P<target>\d+)")


def annotate_guess(question: str, answer: str) -> str | None:
    """A worked guess-and-check solution for a guess question ("Find x: (x+5)*2 = 18" -> "try 5: 5+5=10
    10*2=20 vs 18 high wait try 4: 4+5=9 9*2=18 vs 18 x=4. So the answer is 4."): the cold start's
    "detailed answers with reflection and verification" (section 2.3.1), in the base's textbook style,
    the first guess drawn as the textbook draws it (seeded by the question, so the data is reproducible).
    None for other questions, or when the answer does not solve the question."""
    m, answer = GUESS_RE.fullmatch(question.strip()), str(answer).strip()
    if m is None or not answer.isdigit():
        return None
    steps = chain_steps("Compute " + m.group("expr").replace("x", answer, 1))
    if steps is None or steps[-1][3] != int(m.group("target")):
        return None
    t = Task("guess", question, answer, len(steps), tuple(steps))
    trace, x = worked_solution(t, random.Random(zlib.crc32(question.encode())))
    return f"{trace}. So the answer is {x}."


CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


def readable_solution(solution: str, answer: str, marker: str = READABLE_MARKER) -> str | None:
    """A real worked solution (GSM8K's rationale, MATH's solution) in the readable pattern: the solution
    is the reasoning process, the final answer the summary. GSM8K's calculator annotations ("<<48/2=24>>")
    are dropped; they are tool calls, not prose a reader (or the model) should see."""
    reasoning = CALCULATOR_RE.sub("", str(solution)).replace(marker, " ").strip()
    answer = str(answer).strip()
    if not reasoning or not answer:
        return None
    return f"{marker} {reasoning} {marker} The answer is \\boxed{{{answer}}}."


def annotate(question: str, solution: str | None, answer: str, marker: str = READABLE_MARKER) -> str | None:
    """The `annotated` cold-start source (section 2.3.1: human annotators designed the readable pattern
    and post-processed the data): a real prompt set's worked solution when it has one, else a synthetic
    arithmetic chain written out step by step, or a synthetic guess task guessed and checked; in the
    readable pattern, or None when there is none of these."""
    if solution is not None and isinstance(solution, str) and solution.strip():
        return readable_solution(solution, answer, marker)
    note = annotate_chain(question) or annotate_guess(question, answer)
    return rewrite_few_shot(note, marker) if note else None


def sft_rows(prompt_ids, questions, completions, source: str, stop_reason: str = "written") -> pd.DataFrame:
    """SFT records: a user turn (the question) and an assistant turn (the completion). `stop_reason` says
    how the completion ended: "stop" for a sample that ended with the end of sequence, "written" for a
    text composed by rule (annotated chains, non-reasoning answers); SFT_DATA admits no other."""
    return pd.DataFrame({
        "prompt_id": list(prompt_ids),
        "messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": c}]
                     for q, c in zip(questions, completions)],
        "source": source,
        "stop_reason": stop_reason,
    })


def select(rows: pd.DataFrame, size: int, seed: int, drop_repeats: bool = True) -> pd.DataFrame:
    """At most one sample per (prompt, text) unless `drop_repeats` is off, then at most `size` rows,
    drawn without bias to a source. Kept, repeats weight a prompt's answers by how often the model
    gives them, as sampling many responses per prompt does (section 2.3.3)."""
    if rows.empty:
        return rows.reset_index(drop=True)
    if drop_repeats:
        key = rows["messages"].map(lambda m: m[-1]["content"])
        rows = rows.loc[~pd.DataFrame({"p": rows["prompt_id"].astype(str), "k": key}).duplicated()]
    if len(rows) > size:
        rows = rows.sample(n=size, random_state=seed)
    return rows.reset_index(drop=True)


def summary_of(completion: str, marker: str = READABLE_MARKER) -> str:
    parts = split_readable(completion, marker)
    return completion if parts is None else parts[1]


def judge_prompt(question: str, gold: str, prediction: str) -> str:
    """For prompts without a rule-based check (section 2.3.3): a model compares prediction and truth."""
    return (f"Question: {question}\nReference answer: {gold}\nModel answer: {prediction}\n"
            "Is the model answer equivalent to the reference answer? Reply yes or no.\nReply:")


def parse_judgement(text: str) -> bool:
    m = re.search(r"\b(yes|no)\b", text.lower())
    return bool(m) and m.group(1) == "yes"


def general_prompts(pairs: pd.DataFrame, n: int) -> pd.DataFrame:
    """General (non-reasoning) prompts for RL of all scenarios, from the preference pairs' prompts: no
    rule-based answer, scored by the reward models (section 2.3.4)."""
    qs = list(dict.fromkeys(p[-1]["content"] for p in pairs["prompt"]))[:n]
    return pd.DataFrame({"prompt_id": [f"general-{i}" for i in range(len(qs))], "task": "general", "question": qs,
                         "answer": "-", "difficulty": 0, "kind": "general"})


def non_reasoning_rows(pairs: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """Non-reasoning SFT data (section 2.3.3): the preferred answers of the preference pairs (writing,
    factual QA, self-cognition, translation, refusals), some with a short chain of thought in the
    readable pattern, some without; plus greetings answered directly, as "hello" needs no reasoning."""
    rows = [{"prompt_id": f"nr-{r['pair_id']}", "messages": list(r["prompt"]) + list(r["chosen"]),
             "source": f"non_reasoning:{r['aspect']}", "stop_reason": "written"} for _, r in pairs.iterrows()]
    for i, (q, a) in enumerate([("hello", "Hello! How can I help you today?"), ("hi", "Hi! What can I do for you?"),
                                ("thanks", "You are welcome."), ("good morning", "Good morning! How can I help?")]):
        rows.append({"prompt_id": f"nr-greeting-{i}", "source": "non_reasoning:greeting", "stop_reason": "written",
                     "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    df = pd.DataFrame(rows)
    return df.sample(n=min(size, len(df)), random_state=seed).reset_index(drop=True)


def sample_prompts(tasks: pd.DataFrame, s: dict) -> pd.DataFrame:
    """The training prompts a sampling stage draws from: a seeded shuffle, the first s["prompts"]."""
    return tasks.sample(frac=1.0, random_state=s["seed"]).head(s["prompts"])
