"""benchmarks/bench_findings.py: a finding counts as shown only when it holds on all runs but one and its
mean margin over the seeds is at least twice its standard error; margins read back from a results folder."""

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_findings as BF  # noqa: E402
from readme_tables import finding_margins  # noqa: E402


def _run(name, perturbed, **margins):
    return {"run": name, "seed": 0, "perturbed": perturbed, "wall_s": 1.0,
            **{k: {"margin": v, "holds": v > 0, "unit": "points"} for k, v in margins.items()}}


def test_shown_needs_all_runs_but_one_and_two_standard_errors():
    runs = [_run(f"seed{i}", False, a=m, b=n, c=o) for i, (m, n, o) in
            enumerate([(10, 5, 1), (12, -1, 1.2), (11, 6, 0.9), (9, 5, 1.1), (13, -2, 1.0)])]
    runs.append(_run("seed0-plain-kernels", True, a=-3, b=4, c=-0.5))
    _, rows = BF.summarise(runs)
    r = {x["finding"]: x for x in rows}
    # a: holds on 5 of 6, mean 11 ± sqrt(2.5/5) = 0.71: shown
    assert r["a"]["holds"] == 5 and r["a"]["mean"] == pytest.approx(11)
    assert r["a"]["se"] == pytest.approx(math.sqrt(2.5 / 5)) and r["a"]["shown"]
    # b: fails on two seeds: not shown, whatever its mean
    assert r["b"]["holds"] == 4 and not r["b"]["shown"]
    # c: holds on 5 of 6 but the perturbed run is left out of the mean: 1.04 ± 0.05, shown
    assert r["c"]["mean"] == pytest.approx(1.04) and r["c"]["shown"]
    runs[1]["a"] = {"margin": 1, "holds": True, "unit": "points"}
    runs[3]["a"] = {"margin": 60, "holds": True, "unit": "points"}  # 10 1 11 60 13: mean 19, se 10.5
    _, rows = BF.summarise(runs)
    assert not rows[0]["shown"] and rows[0]["mean"] == pytest.approx(19)


def test_margins_from_a_results_folder(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    p = {"base": 0.2, "r1_zero": 0.5, "cold_start": 0.7, "reasoning_rl": 0.72, "r1_sft": 0.71, "r1": 0.8,
         "distill_student": 0.4, "rl_only_student": 0.35}
    pd.DataFrame([{"benchmark": "held_out", "model": m, "pass@1": v, "cons@k": 0.6 if m == "r1_zero" else None,
                   "cons_k": 8} for m, v in p.items()]).to_csv(tables / "benchmarks.csv", index=False)
    (tmp_path / "r1_zero").mkdir()
    pd.DataFrame({"step": range(8), "completion_length": [10, 11, 12, 14, 15, 15, 16, 19],
                  "reflections": [0.1, 0.1, 0.2, 0.2, 0.1, 0.1, 0.3, 0.3]}).to_csv(
        tmp_path / "r1_zero" / "metrics.csv", index=False)
    m = finding_margins(tmp_path)
    assert m["RL learns (R1-Zero - base)"]["margin"] == pytest.approx(30)
    assert m["cons@8 > pass@1 (R1-Zero)"]["margin"] == pytest.approx(10)
    assert m["final SFT >= its data's checkpoint"]["margin"] == pytest.approx(-1)
    assert not m["final SFT >= its data's checkpoint"]["holds"]
    assert m["distilled >= RL-only + 10"]["margin"] == pytest.approx(-5)
    # quarters of two steps: lengths 10.5, 13, 15, 17.5 (smallest rise 2); re-checks 0.1, 0.2, 0.1, 0.3
    assert m["length rising each quarter"]["margin"] == pytest.approx(2)
    assert m["re-checks rising each quarter"]["margin"] == pytest.approx(-0.1)
    assert not m["re-checks rising each quarter"]["holds"]


def test_findings_block_is_written_between_its_markers(tmp_path):
    runs = []
    for i, (base, zero) in enumerate([(20.0, 40.0), (22.0, 41.0), (18.0, 45.0)]):
        r = _run(f"seed{i}", False, a=zero - base)
        r.update({"pass@1": {"base": base, "r1_zero": zero}, "commit": "abc1234567",
                  "machine": "AMD EPYC, 2 cores, avx2 fma (no avx512_bf16 or AMX)"})
        runs.append(r)
    table, rows = BF.summarise(runs)
    assert [r["finding"] for r in rows] == ["a"]  # pass@1 is a table of its own, not a finding
    pt = BF.pass_table(runs)
    # base 20, 22, 18: mean 20, SE sqrt(4/3) = 1.15
    assert "| base (tiny Llama) | 20.0 | 22.0 | 18.0 | 20.0 ± 1.2 |" in pt
    doc = tmp_path / "README.md"
    doc.write_text("# x\n\n<!-- findings -->\nold figures\n<!-- /findings -->\n\nafter\n")
    BF.write_block(doc, runs, table, rows)
    text = doc.read_text()
    assert "old figures" not in text and text.endswith("<!-- /findings -->\n\nafter\n")
    assert "Commit abc1234567; machine: AMD EPYC, 2 cores, avx2 fma" in text
    assert pt in text and table in text and "**Shown**" in text
    doc.write_text("no markers")
    with pytest.raises(SystemExit, match="findings"):
        BF.write_block(doc, runs, table, rows)
