"""Math accuracy through Math-Verify in worker processes: verdict accuracy on a labelled set, adversarial
answers under hard time limits, and the worker pool's behaviour when checks hang, raise or kill it."""

import time
from pathlib import Path

import pandas as pd
import pytest

from r1flow import rewards as R
from r1flow.rewards.math_answer import verifier_pool, verify_pairs
from r1flow.rewards.workers import WorkerPool

LIMIT = 1.0  # seconds per check in these tests
MARGIN = 1.5  # killing a worker and collecting the verdict
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def warm_pool():
    pool = verifier_pool(workers=2, timeout_s=LIMIT)
    pool.warm()
    return pool


def test_verdict_accuracy_on_labelled_set(warm_pool):
    """Hand-labelled (gold, prediction, equivalent?) cases; the agreement rate is printed and bounded.
    Known disagreements (README): [0,\\infty) vs x >= 0, e^{i pi} vs -1, 100 vs 99.9999999."""
    df = pd.read_csv(HERE / "data" / "verdicts.csv", keep_default_na=False, dtype=str)
    got = verify_pairs(df.prediction.tolist(), df.gold.tolist(), workers=2, timeout_s=LIMIT)
    df["got"] = [int(bool(v)) for v, _ in got]
    wrong = df[df.got != df.equivalent.astype(int)]
    rate = 1 - len(wrong) / len(df)
    print(f"verdict agreement {rate:.3f} on {len(df)} labelled pairs; disagreements:\n{wrong.to_string()}")
    assert len(df) >= 60
    assert rate >= 0.94
    # no false positive: every pair labelled different is judged different
    assert not ((df.got == 1) & (df.equivalent == "0")).any()


ADVERSARIAL = [
    ("power tower", "\\boxed{5^{5^{5^{5}}}}", "5"),
    ("power tower, plain", "<think>.</think><answer>5^(5^(5^5))</answer>", "3"),
    ("10^10^10", "\\boxed{10^{10^{10}}}", "10"),
    ("huge factorial", "\\boxed{(10^{8})!}", "1"),
    ("factorial", "\\boxed{100000!}", "2"),
    ("nested braces", "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}", "2"),
    ("nested fractions", "\\boxed{" + "\\frac{1}{" * 60 + "2" + "}" * 60 + "}", "1"),
    ("megabyte answer", "\\boxed{" + "1+" * 500_000 + "1}", "1000001"),
    ("invalid latex", "\\boxed{\\frac{1}{}\\sqrt[}{x}^^_}", "1"),
    ("fullwidth digits", "\\boxed{１２}", "12"),
    ("cyrillic x", "\\boxed{х+1}", "x+1"),
    ("letter l for 1", "\\boxed{l2}", "12"),
    ("letter O for 0", "\\boxed{1O}", "10"),
    ("answer only inside think", "<think>so \\boxed{7}</think><answer></answer>", "7"),
    ("answer tag inside think", "<think><answer>7</answer></think> done", "7"),
]


@pytest.mark.parametrize("name,completion,gold", ADVERSARIAL, ids=[a[0] for a in ADVERSARIAL])
def test_adversarial_answer_scores_zero_within_limit(warm_pool, name, completion, gold):
    warm_pool.warm()  # a worker killed by the previous case is replaced before the clock starts
    t0 = time.monotonic()
    r = R.get("accuracy")([completion], [gold], workers=2, timeout_s=LIMIT)[0]
    elapsed = time.monotonic() - t0
    assert r.score == 0.0, (name, r)
    assert elapsed <= LIMIT + MARGIN, (name, elapsed, r.reason)


def test_hung_checks_do_not_disturb_the_batch(warm_pool):
    good = [("<think>.</think><answer>\\frac{1}{2}</answer>", "0.5"), ("\\boxed{x=3}", "3"),
            ("\\boxed{(1,2]}", "(1,2]"), ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}")]
    bad = [(c, g) for _, c, g in ADVERSARIAL[:4]]
    batch = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3]]
    restarts = warm_pool.restarts
    out = R.get("accuracy")([c for c, _ in batch], [g for _, g in batch], workers=2, timeout_s=LIMIT)
    assert [r.score for r in out] == [1, 0, 1, 0, 1, 0, 1, 0]
    assert {out[i].reason for i in (1, 5)} == {"timeout"}
    assert warm_pool.restarts > restarts  # hung workers were killed...
    warm_pool.warm()
    assert len(warm_pool.pids()) == 2  # ...and replaced, nothing else left running


@pytest.fixture
def test_pool(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(HERE / "helpers"))
    pool = WorkerPool("pool_funcs:prepare", "pool_funcs:check", workers=2, timeout_s=0.5)
    yield pool
    pool.close()


def test_pool_timeout_crash_and_error_are_isolated(test_pool):
    t0 = time.monotonic()
    res = test_pool.run([("a", ["a", "hang", "b", "a"]), ("b", ["die", "b"]), ("c", ["raise", "c"]),
                         ("hang", ["x", "y"]), ("d", ["d"])])
    assert res == [(True, "same"), (None, "timeout"), (False, "different"), (True, "same"),
                   (None, "error:worker_died"), (True, "same"),
                   (None, "error:ZeroDivisionError"), (True, "same"),
                   (None, "gold_timeout"), (None, "gold_timeout"),
                   (True, "same")]
    assert time.monotonic() - t0 < 15  # two 0.5 s timeouts, two restarts
    assert test_pool.restarts >= 2  # replaced while work remained (the last kill needs no replacement)
    test_pool.close()
    assert test_pool.pids() == []


def test_gold_parsed_once_per_prompt(monkeypatch, tmp_path):
    """Items of one gold go to one worker as a job: the gold is prepared once per job, not per sample."""
    log = tmp_path / "prepared.txt"
    monkeypatch.setenv("PYTHONPATH", str(HERE / "helpers"))
    monkeypatch.setenv("R1FLOW_TEST_PREPARE_LOG", str(log))
    pool = WorkerPool("pool_funcs:prepare_logged", "pool_funcs:check", workers=2, timeout_s=5)
    try:
        res = pool.run([(g, [g] * 8) for g in ("p", "q", "r")])
    finally:
        pool.close()
    assert all(v for v, _ in res) and len(res) == 24
    prepared = [k for k in log.read_text().split() if k != "0"]  # "0" is each worker's warm-up
    assert sorted(prepared) == ["p", "q", "r"]


def test_verify_pairs_rejects_unknown_verifier():
    with pytest.raises(ValueError, match="unknown verifier"):
        verify_pairs(["x"], ["y"], verifier="llm")
