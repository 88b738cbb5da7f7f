"""Decontamination of the training prompts against the benchmarks (r1flow.data.decontamination, the
`decontamination` rule): planted overlaps found exactly, the rest left alone; drop; the script; the DAG."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from r1flow.data import decontamination as D
from r1flow.data.artifacts import read_table, write_table
from r1flow.data.schemas import DECONTAMINATION, DECONTAMINATION_MATCHES, TASKS

ROOT = Path(__file__).resolve().parent.parent

LONG = "A train leaves the station at noon traveling sixty miles per hour toward the city"
BENCH = pd.DataFrame({
    "problem_id": ["b_long", "b_span", "b_seven", "b_short", "b_mul"],
    "question": [
        LONG,
        "Find the number of ordered pairs of positive integers whose product equals one hundred",
        "Let the red box hold exactly twelve apples today and more later",
        "Compute 9+4",
        "Compute 6*8",
    ],
})
TRAIN = pd.DataFrame({
    "prompt_id": [f"t{i}" for i in range(8)],
    "task": "chain",
    "question": [
        LONG,  # t0: an exact copy
        "  a TRAIN leaves the station, at noon; traveling Sixty miles per hour -- toward the CITY!  ",  # t1
        # t2: 8 words of b_span ("the number of ordered pairs of positive integers") inside a longer text
        "Our puzzle asks: determine the number of ordered pairs of positive integers satisfying x < y.",
        # t3: only 7 words shared with b_seven ("the red box hold exactly twelve apples")
        "Suppose the red box hold exactly twelve apples and then compute the total",
        "compute 9 + 4",  # t4: a short text, the same as b_short once normalised ("compute 9 + 4" -> 3 words)
        "Compute 6+8",  # t5: not b_mul ("Compute 6*8"): the operator is kept
        "Compute 9+4.",  # t6: b_short whole, punctuation aside
        "Find x such that x + 3 = 10",  # t7: clean
    ],
    "answer": ["1", "1", "1", "1", "13", "14", "13", "7"],
    "difficulty": 1,
})
VALIDATION = pd.DataFrame({"prompt_id": ["v0", "v1"], "task": "chain", "question": ["COMPUTE 6*8", "Compute 2*3"],
                           "answer": ["48", "6"], "difficulty": 1})


def test_normalisation_keeps_operators_and_drops_punctuation():
    assert D.normalize("  Hello,   WORLD!! ") == ["hello", "world"]
    assert D.normalize("Compute 6+8") != D.normalize("Compute 6*8")
    assert D.keys("Compute 9+4") == ["compute 9+4"]  # short: matched whole
    assert D.keys("...") == []
    assert len(D.keys(LONG)) == len(LONG.split()) - 8 + 1


def test_check_flags_exactly_the_planted_overlaps():
    summary, matches = D.check({"train": TRAIN, "validation": VALIDATION}, {"bench": BENCH})
    DECONTAMINATION.validate(summary)
    DECONTAMINATION_MATCHES.validate(matches)
    flagged = dict(zip(matches.loc[matches["split"] == "train", "prompt_id"],
                       matches.loc[matches["split"] == "train", "problem_id"]))
    assert flagged == {"t0": "b_long", "t1": "b_long", "t2": "b_span", "t6": "b_short"}
    assert "t3" not in flagged  # 7 shared words are not a copy
    assert "t5" not in flagged  # "Compute 6+8" is not "Compute 6*8"
    # "compute 9 + 4" is three words, "Compute 9+4" one expression: not the same text
    assert "t4" not in flagged
    assert matches.loc[matches["prompt_id"] == "t2", "match"].item() == "the number of ordered pairs of positive integers"
    assert list(matches.loc[matches["split"] == "validation", "prompt_id"]) == ["v0"]
    row = summary.set_index("split").loc["train"]
    assert (row["benchmark"], row["prompts"], row["contaminated"]) == ("bench", 8, 4)
    assert row["share"] == pytest.approx(0.5)
    assert row["example"] == 't0 ~ b_long: "a train leaves the station at noon traveling"'
    val = summary.set_index("split").loc["validation"]
    assert (val["prompts"], val["contaminated"], val["share"]) == (2, 1, 0.5)


def test_check_counts_each_split_benchmark_pair():
    other = pd.DataFrame({"problem_id": ["o1"], "question": ["Compute 2*3"]})
    summary, matches = D.check({"train": TRAIN, "validation": VALIDATION}, {"bench": BENCH, "other": other})
    counts = {(r["split"], r["benchmark"]): r["contaminated"] for _, r in summary.iterrows()}
    assert counts == {("train", "bench"): 4, ("train", "other"): 0, ("validation", "bench"): 1,
                      ("validation", "other"): 1}
    assert summary.loc[(summary["split"] == "train") & (summary["benchmark"] == "other"), "example"].isna().all()
    md = D.to_markdown(summary, matches, 8, dropped=False)
    assert "| train | bench | 8 | 4 | 50.0% |" in md
    assert "- validation: 2 of 2 prompts" in md  # v0 and v1, each against a different benchmark


def test_ngram_setting_changes_what_counts():
    _, matches = D.check({"train": TRAIN}, {"bench": BENCH}, n=7)
    assert "t3" in set(matches["prompt_id"])


def test_drop_contaminated_leaves_exactly_the_clean_prompts():
    splits = {"train": TRAIN, "validation": VALIDATION}
    _, matches = D.check(splits, {"bench": BENCH})
    clean = D.drop_contaminated(splits, matches)
    assert list(clean["train"]["prompt_id"]) == ["t3", "t4", "t5", "t7"]
    assert list(clean["validation"]["prompt_id"]) == ["v1"]
    everything = pd.concat([BENCH, pd.DataFrame({"problem_id": ["b_v1"], "question": ["Compute 2*3"]})])
    _, matches = D.check(splits, {"bench": everything})
    with pytest.raises(ValueError, match=r"data\.decontamination\.drop"):
        D.drop_contaminated(splits, matches)


def _run_script(argv, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    mod = importlib.import_module("decontaminate")
    monkeypatch.setattr(sys, "argv", ["decontaminate.py", *argv])
    mod.main()


@pytest.mark.parametrize("drop", [False, True])
def test_script_writes_the_tables(tmp_path, monkeypatch, drop):
    write_table(TRAIN, tmp_path / "train.parquet", TASKS)
    write_table(VALIDATION, tmp_path / "validation.parquet", TASKS)
    test = pd.DataFrame({"prompt_id": list(BENCH["problem_id"]), "task": "chain", "question": list(BENCH["question"]),
                         "answer": "1", "difficulty": 1})
    write_table(test, tmp_path / "test.parquet", TASKS)
    outs = ["--train-out", str(tmp_path / "train_clean.parquet"), "--validation-out",
            str(tmp_path / "validation_clean.parquet")]
    _run_script(["--settings", json.dumps({"ngram": 8, "drop": drop}),
                 "--benchmarks", json.dumps({"held_out": {"loader": "tasks", "n": 1}}),
                 "--data", f"held_out={tmp_path / 'test.parquet'}",
                 "--train", str(tmp_path / "train.parquet"), "--validation", str(tmp_path / "validation.parquet"),
                 "--table-csv", str(tmp_path / "d.csv"), "--table-md", str(tmp_path / "d.md"),
                 "--matches", str(tmp_path / "m.csv"), *(outs if drop else [])], monkeypatch)
    summary = read_table(tmp_path / "d.csv", DECONTAMINATION)
    assert dict(zip(summary["split"], summary["contaminated"])) == {"train": 4, "validation": 1}
    matches = read_table(tmp_path / "m.csv", DECONTAMINATION_MATCHES)
    assert sorted(matches["prompt_id"]) == ["t0", "t1", "t2", "t6", "v0"]
    md = (tmp_path / "d.md").read_text()
    assert "| train | held_out | 8 | 4 | 50.0% |" in md
    if drop:
        assert "dropped before training" in md
        assert list(read_table(tmp_path / "train_clean.parquet", TASKS)["prompt_id"]) == ["t3", "t4", "t5", "t7"]
        assert list(read_table(tmp_path / "validation_clean.parquet", TASKS)["prompt_id"]) == ["v1"]
    else:
        assert "kept (data.decontamination.drop is false)" in md
        assert not (tmp_path / "train_clean.parquet").exists()


@pytest.mark.parametrize("drop", [False, True])
def test_workflow_trains_on_the_decontaminated_split_only_with_drop(tmp_path, drop):
    from helpers.job_settings import planned_jobs

    cfg = tmp_path / "decontamination.yaml"
    cfg.write_text(f"data:\n  decontamination:\n    drop: {str(drop).lower()}\n")
    jobs = planned_jobs(tmp_path / "wd", cfg)
    assert "decontamination" in jobs
    words = jobs["decontamination"]
    assert words[words.index("--data") + 1] == "held_out=results/data/tasks/test.parquet"
    assert ("--train-out" in words) == drop
    prefix = "results/data/tasks/decontaminated" if drop else "results/data/tasks"
    for name in ("r1_zero", "reasoning_rl", "r1"):
        w = jobs[name]
        assert w[w.index("--train") + 1] == f"{prefix}/train.parquet", name
        assert w[w.index("--validation") + 1] == f"{prefix}/validation.parquet", name
    for name in ("cold_start_data", "rejection_sampling"):
        w = jobs[name]
        assert w[w.index("--train") + 1] == f"{prefix}/train.parquet", name
