"""benchmarks/probe_base.py: a textbook answer counts only when the number it ends on is the task's answer."""

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import probe_base as PB  # noqa: E402


class _Texts:
    def __init__(self, texts):
        self.texts = texts


def test_textbook_accuracy_reads_the_stated_answer(monkeypatch):
    outputs = [
        " 7+5=12 12*2=24 24-3=21. So the answer is 21.",  # right
        " 7+5=12 12*2=24. So the answer is 24.",  # stops a step early: wrong
        " try 5: 5+5=10 10*2=20 vs 18 high wait try 4: 4+5=9 9*2=18 vs 18 x=4",  # right, no summary line
        " try 5: 5+5=10 10*2=20 vs 18 high wait",  # truncated before an answer: wrong
        " 21 is close. So the answer is 210.",  # the right digits inside a longer number: wrong
    ]
    monkeypatch.setattr(PB.Generator, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(PB.Generator, "generate", lambda self, prompts, params: _Texts(outputs[: len(prompts)]))
    tasks = pd.DataFrame({"question": ["Compute (7+5)*2-3", "Compute (7+5)*2-3", "Find x: (x+5)*2 = 18",
                                       "Find x: (x+5)*2 = 18", "Compute (7+5)*2-3"],
                          "answer": ["21", "21", "4", "4", "21"]})
    out = PB.textbook_accuracy(None, None, tasks)
    assert out["ok"].tolist() == [True, False, True, False, False]
