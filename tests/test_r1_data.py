"""Cold-start rewriting and filtering, rejection-sampling filters, the model judge's parsing, and the
non-reasoning and general-prompt tables (sections 2.3.1, 2.3.3, 2.3.4)."""

import re
from types import SimpleNamespace

import pandas as pd
import pytest

from r1flow.data import cold_start as C
from r1flow.data.artifacts import read_table, write_table
from r1flow.data.preferences import make_preferences
from r1flow.data.schemas import SFT_DATA
from r1flow.training import sft_data as S

M = "|special_token|"


def test_rewrites_into_the_readable_pattern():
    assert C.rewrite_few_shot(" 7+5=12 12*2=24 24-3=21. So the answer is 21.") == (
        f"{M} 7+5=12 12*2=24 24-3=21 {M} The answer is \\boxed{{21}}.")
    assert C.rewrite_r1_zero(" <think> 7+5=12 </think> <answer> 12 </answer>") == (
        f"{M} 7+5=12 {M} The answer is \\boxed{{12}}.")
    # malformed R1-Zero outputs are not rewritten: no answer, empty reasoning, text after the answer
    for bad in ("<think> a </think>", "<think> </think><answer>3</answer>", "<think>a</think><answer>3</answer> more"):
        assert C.rewrite_r1_zero(bad) is None
    assert C.rewrite_few_shot("no worked steps here") is None


def test_annotated_chain_solutions_are_right():
    assert C.annotate_chain("Compute (7+5)*2-3") == "7+5=12 12*2=24 24-3=21. So the answer is 21."
    assert C.annotate_chain("Compute ((4+3)*2-5)*3") == "4+3=7 7*2=14 14-5=9 9*3=27. So the answer is 27."
    assert C.annotate_chain("Solve 2x+1=5") is None


def test_annotated_synthetic_chains_in_the_readable_pattern():
    assert C.annotate("Compute (7+5-3)*2+1", None, "19") == f"{M} 7+5=12 12-3=9 9*2=18 18+1=19 {M} The answer is \\boxed{{19}}."
    assert C.annotate("Compute 6*3", None, "18") == f"{M} 6*3=18 {M} The answer is \\boxed{{18}}."
    assert C.annotate("Solve 2x+1=5", None, "2") is None


def test_annotated_guesses_are_checked_and_end_right():
    # "Find x: (x+5)*2 = 18", x = 4: every try is checked by running the chain forwards, a miss says which
    # way and moves one step that way, the last try is x (whichever first guess the question's seed draws)
    note = C.annotate_guess("Find x: (x+5)*2 = 18", "4")
    assert note.endswith("x=4. So the answer is 4.")
    runs = {1: "1+5=6 6*2=12 vs 18 low", 2: "2+5=7 7*2=14 vs 18 low", 3: "3+5=8 8*2=16 vs 18 low",
            4: "4+5=9 9*2=18 vs 18 x=4", 5: "5+5=10 10*2=20 vs 18 high", 6: "6+5=11 11*2=22 vs 18 high"}
    tries = [int(g) for g in re.findall(r"try (\d+):", note)]
    assert tries[-1] == 4 and all(abs(a - b) == 1 for a, b in zip(tries, tries[1:])) and len(tries) <= 3
    assert note == " wait ".join(f"try {g}: {runs[g]}" for g in tries) + ". So the answer is 4."
    assert C.annotate_guess("Find x: (x+5)*2 = 18", "4") == note  # reproducible
    # in the readable pattern through `annotate`, as a chain is
    assert C.annotate("Find x: x*3 = 15", None, "5").endswith(f"x=5 {M} The answer is \\boxed{{5}}.")
    # a gold answer that does not solve the question, or a question that is not a guess task: no note
    for q, a in [("Find x: (x+5)*2 = 18", "5"), ("Find x: (x+5)*2 = 18", "four"), ("Find x: x = 3", "3"),
                 ("Find x: (x+5)*2 = 18; rm -rf /", "4"), ("Find y: (y+5)*2 = 18", "4"), ("Compute 6*3", "18")]:
        assert C.annotate_guess(q, a) is None, q


def test_readable_keeps_the_reasoning_as_written():
    assert C.readable("=13 wait 7+5=12 12*2=24.", "24") == f"{M} =13 wait 7+5=12 12*2=24 {M} The answer is \\boxed{{24}}."


def test_readability_filters():
    good = C.readable("7+5=12 12*2=24", "24")
    texts = [good, C.readable("7+5=12 所以 12*2=24", "24"), f"{M} 7+5=12 {M}", C.readable("7+5=12", "13"),
             C.readable("let me write code ```x=1``` here 7+5=12", "12"), C.readable("one " * 600 + "7+5=12", "12")]
    golds = ["24", "24", "12", "12", "12", "12"]
    assert S.readability(texts, golds, max_paragraph_chars=2000) == [
        "", "mixed_language", "wrong", "wrong", "code_block", "long_paragraph"]


def test_select_dedupes_and_caps():
    rows = C.sft_rows(["a", "a", "b", "c"], ["q1", "q1", "q2", "q3"], ["x", "x", "y", "z"], "src")
    assert len(C.select(rows, 10, 0)) == 3  # the duplicate (a, x) is dropped
    assert len(C.select(rows, 2, 0)) == 2
    assert C.select(rows.iloc[:0], 5, 0).empty
    assert len(C.select(rows, 10, 0, drop_repeats=False)) == 4  # repeats kept: they weight a prompt's answers


def test_judge_prompt_and_parsing():
    assert C.parse_judgement(" Yes, they match") and not C.parse_judgement("no") and not C.parse_judgement("maybe")
    gen = SimpleNamespace(generate=lambda prompts, params: SimpleNamespace(
        texts=[" yes" if "Model answer: 0.5" in p else " no" for p in prompts]))
    out = S.model_judge(gen, ["q", "q"], ["1/2", "1/2"], [f"{M} r {M} \\boxed{{0.5}}", f"{M} r {M} \\boxed{{3}}"])
    assert out == [True, False]


def test_non_reasoning_and_general_prompts(tmp_path):
    pairs = make_preferences(10, 10, seed=0)
    nr = C.non_reasoning_rows(pairs, 12, 0)
    assert len(nr) == 12 and all(m[-1]["role"] == "assistant" for m in nr["messages"])
    write_table(nr, tmp_path / "nr.parquet", SFT_DATA)
    back = read_table(tmp_path / "nr.parquet", SFT_DATA)
    assert back["messages"].tolist() == nr["messages"].tolist()
    g = C.general_prompts(pairs, 5)
    assert len(g) == 5 and set(g["kind"]) == {"general"} and g["question"].is_unique


@pytest.mark.parametrize("bad", [[{"role": "user", "content": "q"}], []])
def test_sft_schema_needs_an_assistant_turn(bad, tmp_path):
    df = pd.DataFrame({"prompt_id": ["p"], "messages": [bad], "source": ["s"], "stop_reason": ["stop"]})
    with pytest.raises(Exception, match="sft_data"):
        write_table(df, tmp_path / "x.parquet", SFT_DATA)


def test_sft_schema_refuses_a_truncated_sample(tmp_path):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    ok = pd.DataFrame({"prompt_id": ["p", "q"], "messages": [msgs, msgs], "source": "s", "stop_reason": ["stop", "written"]})
    write_table(ok, tmp_path / "ok.parquet", SFT_DATA)
    with pytest.raises(Exception, match="sft_data"):
        write_table(ok.assign(stop_reason=["stop", "length"]), tmp_path / "x.parquet", SFT_DATA)


class _TruncatingGenerator:
    """Every odd sample is cut off at the length limit; every sample holds the right, boxed answer (a
    cut-off sample whose summary already closed its answer passes every readability filter)."""

    def __init__(self, text):
        self.text, self.calls = text, 0

    def generate(self, prompts, params):
        import torch

        self.calls += 1
        n = len(prompts) * params.n
        return SimpleNamespace(texts=[self.text(p) for p in prompts for _ in range(params.n)],
                               truncated=torch.tensor([i % 2 == 1 for i in range(n)]))


def _run_script(name, argv, monkeypatch, generator):
    import importlib
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    monkeypatch.setattr(S, "load_policy", lambda *a, **k: (None, None))
    monkeypatch.setattr(S, "make_generator", lambda *a, **k: generator)
    mod = importlib.import_module(name)
    monkeypatch.setattr(mod.C, "sample_prompts", lambda tasks, s: tasks)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    mod.main()


def _tasks(tmp_path):
    from r1flow.data.schemas import TASKS

    tasks = pd.DataFrame({"prompt_id": ["p0", "p1"], "task": "chain", "question": ["Compute 7+5", "Compute 2*3"],
                          "answer": ["12", "6"], "difficulty": 1, "kind": "chain"})
    write_table(tasks, tmp_path / "train.parquet", TASKS)
    return tmp_path / "train.parquet"


def test_no_truncated_sample_reaches_rejection_sampling_data(tmp_path, monkeypatch):
    import importlib
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))

    answers = {"7+5": "12", "2*3": "6"}
    gen = _TruncatingGenerator(lambda p: C.readable("x", next(v for k, v in answers.items() if k in p)))
    settings = {"prompts": 2, "samples_per_prompt": 4, "target_size": 100, "max_new_tokens": 8, "temperature": 1.0,
                "seed": 0, "drop_repeats": False, "max_paragraph_chars": 2000, "judge": {"type": "rule"}}
    monkeypatch.setattr(importlib.import_module("rejection_sampling"), "chat_prompt", lambda tok, q: q)
    _run_script("rejection_sampling", ["--model", "m", "--train", str(_tasks(tmp_path)), "--settings",
                                       json.dumps(settings), "--out", str(tmp_path / "rs.parquet")], monkeypatch, gen)
    rows = read_table(tmp_path / "rs.parquet", SFT_DATA)
    # 2 prompts x 4 samples, all right and readable, the odd ones truncated: exactly the 4 finished ones stay
    assert len(rows) == 4 and set(rows["stop_reason"]) == {"stop"}
    assert sorted(rows["prompt_id"]) == ["p0", "p0", "p1", "p1"]


def test_no_truncated_sample_reaches_cold_start_data(tmp_path, monkeypatch):
    import json

    gen = _TruncatingGenerator(lambda p: "<think> 5+7=12 </think> <answer> 12 </answer>" if "7+5" in p
                               else "<think> 3*2=6 </think> <answer> 6 </answer>")
    settings = {"sources": ["r1_zero", "annotated"], "size": 100, "prompts": 2, "samples_per_prompt": 2,
                "max_new_tokens": 8, "temperature": 1.0, "seed": 0, "few_shot_example": ""}
    _run_script("cold_start", ["--base", "b", "--r1-zero", "z", "--train", str(_tasks(tmp_path)), "--settings",
                               json.dumps(settings), "--out", str(tmp_path / "cs.parquet")], monkeypatch, gen)
    rows = read_table(tmp_path / "cs.parquet", SFT_DATA)
    sampled = rows[rows["source"] == "r1_zero"]
    # 2 prompts x 2 samples from R1-Zero, the second of each truncated: one finished sample per prompt
    assert sorted(sampled["prompt_id"]) == ["p0", "p1"] and set(sampled["stop_reason"]) == {"stop"}
    assert set(rows.loc[rows["source"] == "annotated", "stop_reason"]) == {"written"}
