"""benchmarks/bench_default.py --seed-offset shifts the whole default: every seed of the config tree;
benchmarks/readme_tables.py writes a run's table from its own records."""

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _bench(name="bench_default"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _seeds(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "seed":
                yield path + "." + k, v
            else:
                yield from _seeds(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _seeds(v, f"{path}[{i}]")


def test_seed_offset_shifts_every_seed_defaults_included():
    b = _bench()
    cfg = b.validate_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()),
                            ROOT / "workflow" / "schemas" / "config.schema.yaml")
    before = dict(_seeds(cfg))
    after = dict(_seeds(b.shift_seeds(cfg, 7)))
    assert before.keys() == after.keys()
    # the stages that draw random numbers all have a seed, and each one moved by exactly the offset
    for key in (".data.synthetic.seed", ".base_model.tiny.seed", ".r1_zero.grpo.seed", ".r1.cold_start.seed",
                ".r1.sft.seed", ".r1.reasoning_rl.seed", ".r1.rejection_sampling.seed", ".r1.final_sft.seed",
                ".r1.reward_models.train.seed", ".r1.rl_all.grpo.seed", ".distillation.sft.seed",
                ".distillation.rl_only.seed", ".evaluation.seed"):
        assert after[key] == before[key] + 7, key
    assert all(after[k] == v + 7 for k, v in before.items())
    # nothing but seeds changes
    assert b.shift_seeds({"a": [{"seed": 1, "steps": 3}], "seeds": 2}, 5) == {"a": [{"seed": 6, "steps": 3}], "seeds": 2}


def test_readme_table_of_a_named_benchmark_with_each_jobs_time_and_memory(tmp_path):
    import json

    import pandas as pd

    res = tmp_path / "results"
    for d in ("tables", "provenance", "benchmarks"):
        (res / d).mkdir(parents=True)
    rows = [("base", 0.05, 0.10), ("r1_zero", 0.25, 0.95)]
    pd.DataFrame([{"benchmark": "gsm8k_held_out", "model": m, "pass@1": p, "cons@k": p, "cons_k": 2,
                   "format_rate": f, "mean_length": 100.0, "num_problems": 50, "n": 2, "temperature": 0.6,
                   "top_p": 0.95, "max_new_tokens": 200} for m, p, f in rows]).to_csv(res / "tables" / "benchmarks.csv")
    (res / "provenance" / "benchmark_table.json").write_text(json.dumps({"git": {"commit": "abc" * 14, "dirty": False}}))
    for job, s, rss in (("r1_zero", 900.5, 6123.4), ("tasks", 1.2, 150.0)):
        (res / "benchmarks" / f"{job}.tsv").write_text(f"s\tmax_rss\n{s}\t{rss}\n")
    text = _bench("readme_tables").block(res, "gsm8k_held_out", "SmolLM2-135M-Instruct", jobs=True)
    assert "| SmolLM2-135M-Instruct | 5.0 | 5.0 | 10.0 | 100.0 |" in text
    assert "| R1-Zero | 25.0 | 25.0 | 95.0 | 100.0 |" in text
    assert "R1 vs R1-Zero" not in text and "cons@2 vs pass@1: 25.0 vs 25.0" in text
    assert "| r1_zero | 900 | 6,123 |" in text and "| tasks | 1 | 150 |" in text
    assert "abcabcabca" in text and "50 held-out problems, n = 2" in text


def test_guess_checks_reads_each_checked_guess_and_what_follows():
    checks = _bench("guess_checks").checks
    text = (" <think> try 5: 5+5=10 10*2=20 vs 18 high wait try 4: 4+5=9 9*2=18 vs 18 x=4 </think>"
            " <answer> 4 </answer>")
    assert checks(text, "18") == {(False, "wait"): 1, (True, "x"): 1}
    # a failed check accepted anyway; a check left hanging (stop); the result, not the echoed target, decides
    assert checks(" <think> try 6: 6*2=12 vs 18 x=6 </think> <answer> 6 </answer>", "18") == {(False, "x"): 1}
    assert checks(" <think> try 9: 9*2=18 vs 12 </think> <answer> 9 </answer>", "18") == {(True, "stop"): 1}
    # tries after </think>, malformed steps and chains without "try" are not checks
    assert checks(" <think> 7+5=12 12*2=24 </think> try 3: 3*2=6 vs 6 x=3", "6") == {}
    assert checks(" <think> try 3: 3*2= vs 6 wait try x: 1+1=2 vs 2 </think>", "2") == {}


def test_readme_findings_carry_the_paired_standard_error(tmp_path):
    """Hand-computed: per-problem pass@1 of R1 [1, .5, 1, 0] (62.5) and of R1-Zero [.5, .5, .5, 0] (37.5) on
    the same four problems: differences [.5, 0, .5, 0], mean .25, sample sd sqrt(4 * .25**2 / 3) = .2887, se
    .1443 -- the difference (25.0) is within two standard errors (28.9)."""
    import json

    import pandas as pd

    res = tmp_path / "results"
    for d in ("tables", "provenance"):
        (res / d).mkdir(parents=True)
    per = {"r1": [[1, 1], [1, 0], [1, 1], [0, 0]], "r1_zero": [[1, 0], [0, 1], [1, 0], [0, 0]]}
    rows = []
    for m, correct in per.items():
        out = res / "eval" / m / "held_out"
        out.mkdir(parents=True)
        # problem 3's second sample of R1-Zero is right but truncated: wrong, as section 3 counts it
        cut = [[False, False], [False, False], [False, True], [False, False]] if m == "r1_zero" else [[False] * 2] * 4
        if m == "r1_zero":
            correct = [[1, 0], [0, 1], [1, 1], [0, 0]]
        pd.DataFrame([{"problem_id": f"p{i}", "sample": j, "correct": float(c), "truncated": t}
                      for i, (cs, ts) in enumerate(zip(correct, cut)) for j, (c, t) in enumerate(zip(cs, ts))]
                     ).iloc[::-1].to_parquet(out / "samples.parquet")  # any row order
        p1 = sum(map(sum, per[m])) / 8
        rows.append({"benchmark": "held_out", "model": m, "pass@1": p1, "pass@1_se": 0.125, "cons@k": 0.5,
                     "cons@k_lo": 0.25, "cons@k_hi": 0.75, "cons_k": 2, "format_rate": 1.0, "mean_length": 9.0,
                     "num_problems": 4, "n": 2, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 20})
    pd.DataFrame(rows).to_csv(res / "tables" / "benchmarks.csv")
    (res / "provenance" / "benchmark_table.json").write_text(json.dumps({"git": {"commit": "f" * 40, "dirty": False}}))
    text = _bench("readme_tables").block(res)
    assert "R1 vs R1-Zero: 62.5 vs 37.5 (+25.0 ± 14.4; within two standard errors: not shown apart)" in text
    assert "| **R1** (RL for all scenarios) | 62.5 ± 12.5 | 50.0 [25.0, 75.0] | 100.0 | 9.0 |" in text
