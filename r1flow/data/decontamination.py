"""Decontamination of the training prompts against the benchmarks: n-gram overlap of their question texts.

A training prompt is contaminated by a benchmark when the two share a run of n = 8 words after
normalisation, the check of open-r1's scripts/decontaminate.py. Eight words
are long enough that two unrelated questions rarely share them by chance, and short enough that a copy
with a clause reworded or a sentence added still shares one. They are also long enough for boilerplate to
collide: the evaluation's "Please reason step by step, and put your final answer within \\boxed{}." is
twelve words, so every prompt rendered with it would match every benchmark. The check therefore reads the
`question` column (the text before any template), never a rendered prompt.

Normalisation: NFKC, lowercase, punctuation stripped (replaced by a space), whitespace collapsed. open-r1
only lowercases and collapses whitespace; stripping punctuation as well means a copy with changed
punctuation, or a space added after a comma, still matches. The arithmetic of a question is kept (math
symbols such as + = <, and - * / ^ ( )): they are its content, and stripping them makes "Compute 6+8" and
"Compute 6*8" one text (53 of the default's 2000 synthetic training prompts would then "match" a held-out
test question they do not copy). An expression written without spaces ("x+2-1") stays one word.

Which prompts are checked: the train and validation splits of the `tasks` rule, whether synthetic or from
files. The cold-start and rejection-sampling stages draw their prompts from the train split
(r1flow.data.cold_start.sample_prompts on the `--train` table, in scripts/cold_start.py and
scripts/rejection_sampling.py), so checking train covers them.
"""

from __future__ import annotations

import unicodedata

import pandas as pd

NGRAM = 8
SPLITS = ("train", "validation")
# Kept although Unicode calls them punctuation or symbols: the operators of a question (math symbols, the
# "Sm" category, are kept as well).
ARITHMETIC = set("-*/^()")


def normalize(text: str) -> list[str]:
    """The words of a text after normalisation (see the module docstring)."""
    out = []
    for ch in unicodedata.normalize("NFKC", str(text)).lower():
        cat = unicodedata.category(ch)
        out.append(ch if ch in ARITHMETIC or cat == "Sm" or cat[0] not in "PS" else " ")
    return "".join(out).split()


def keys(text: str, n: int = NGRAM) -> list[str]:
    """What a text is matched on: its word n-grams in order, or, for a text shorter than n words, the
    whole normalised text; an empty one (only punctuation) has nothing to match.

    open-r1 gives a short text no n-grams, so it never matches: every question of the default's synthetic
    tasks (2 or 5 words) would go unchecked. A short text is matched whole instead, as an exact copy after
    normalisation: inside a longer text a span of under n words is not evidence of a copy ("find x" starts
    every synthetic guess task). An n-gram has n words and a short text fewer, so the two never collide."""
    words = normalize(text)
    if not words:
        return []
    if len(words) < n:
        return [" ".join(words)]
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def build_index(problems: pd.DataFrame, n: int = NGRAM) -> dict[str, str]:
    """{key: problem_id of the first benchmark problem that has it} (keys, from each `question`)."""
    index = {}
    for pid, question in zip(problems["problem_id"], problems["question"]):
        for k in keys(question, n):
            index.setdefault(k, str(pid))
    return index


def find_overlaps(prompts: pd.DataFrame, problems: pd.DataFrame, n: int = NGRAM) -> pd.DataFrame:
    """One row per prompt that shares a key with a benchmark problem: prompt_id, question, the first such
    problem (in the prompt's word order) and the shared words (`match`)."""
    index = build_index(problems, n)
    rows = []
    for pid, question in zip(prompts["prompt_id"], prompts["question"]):
        hit = next((k for k in keys(question, n) if k in index), None)
        if hit is not None:
            rows.append({"prompt_id": str(pid), "question": question, "problem_id": index[hit], "match": hit})
    return pd.DataFrame(rows, columns=["prompt_id", "question", "problem_id", "match"])


def check(splits: dict[str, pd.DataFrame], benchmarks: dict[str, pd.DataFrame], n: int = NGRAM):
    """Every training split against every benchmark.

    Returns (summary, matches): summary has one row per (split, benchmark) pair: prompts checked,
    contaminated prompts, their share and an example; matches one row per contaminated (prompt, benchmark)
    (the DECONTAMINATION and DECONTAMINATION_MATCHES schemas)."""
    summary, matches = [], []
    for split, prompts in splits.items():
        for name, problems in benchmarks.items():
            found = find_overlaps(prompts, problems, n)
            example = None
            if len(found):
                first = found.iloc[0]
                example = f"{first['prompt_id']} ~ {first['problem_id']}: \"{first['match']}\""
            summary.append({"split": split, "benchmark": name, "prompts": len(prompts), "contaminated": len(found),
                            "share": len(found) / len(prompts) if len(prompts) else 0.0, "example": example})
            matches.append(found.assign(split=split, benchmark=name))
    cols = ["split", "prompt_id", "benchmark", "problem_id", "match", "question"]
    table = pd.concat(matches, ignore_index=True)[cols] if matches else pd.DataFrame(columns=cols)
    return pd.DataFrame(summary, columns=["split", "benchmark", "prompts", "contaminated", "share", "example"]), table


def drop_contaminated(splits: dict[str, pd.DataFrame], matches: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each split without its prompts that overlap any benchmark (data.decontamination.drop). A split left
    empty stops here: training on no prompts is never what was meant."""
    out = {}
    for split, prompts in splits.items():
        flagged = set(matches.loc[matches["split"] == split, "prompt_id"])
        clean = prompts[~prompts["prompt_id"].astype(str).isin(flagged)].reset_index(drop=True)
        if clean.empty:
            raise ValueError(f"config key 'data.decontamination.drop': every one of the {len(prompts)} {split} "
                             "prompts overlaps a benchmark, none would be left to train on; set drop to false or "
                             "change the prompts or the benchmarks")
        out[split] = clean
    return out


def to_markdown(summary: pd.DataFrame, matches: pd.DataFrame, n: int, dropped: bool) -> str:
    """The summary as a plain markdown table, with per split how many prompts overlap any benchmark."""
    head = ["Training set", "Benchmark", "Prompts", "Contaminated", "Share", "Example"]
    lines = [f"## Decontamination ({n}-gram overlap)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        example = "-" if pd.isna(r["example"]) else str(r["example"]).replace("|", "\\|")
        lines.append(f"| {r['split']} | {r['benchmark']} | {r['prompts']} | {r['contaminated']} | "
                     f"{100 * r['share']:.1f}% | {example} |")
    lines.append("")
    for split in dict.fromkeys(summary["split"]):
        total = int(summary.loc[summary["split"] == split, "prompts"].iloc[0])
        flagged = matches.loc[matches["split"] == split, "prompt_id"].nunique()
        what = "dropped before training" if dropped else "kept (data.decontamination.drop is false)"
        lines.append(f"- {split}: {flagged} of {total} prompts share {n} words with some benchmark question "
                     f"(or are one, normalised, when shorter); {what}.")
    lines.append(f"- Texts are lowercased, punctuation stripped (operators kept) and whitespace collapsed before "
                 f"the {n}-grams are taken; the question text is compared, never the templated prompt.")
    return "\n".join(lines) + "\n"
