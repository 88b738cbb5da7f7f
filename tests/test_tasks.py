"""Synthetic tasks: answers are right, worked solutions reach them, splits are disjoint and seeded."""

import random

import pytest

from r1flow.data import tasks as T
from r1flow.data.prompts import TABLE1, render


def _eval_question(q: str) -> int:
    expr = q.removeprefix("Compute ")
    assert set(expr) <= set("0123456789+-*() ")  # safe to eval: arithmetic only
    return eval(expr)


@pytest.mark.parametrize("family", ["chain", "sum"])
def test_answers_and_worked_solutions(family):
    rng = random.Random(0)
    for _ in range(500):
        t = T.FAMILIES[family](rng, rng.randint(2, 6))
        assert _eval_question(t.question) == int(t.answer)
        steps, ans = T.worked_solution(t, rng)
        assert ans == t.answer
        _, wrong = T.worked_solution(t, rng, wrong=True)
        assert wrong != t.answer
        if family == "chain":
            assert 0 <= int(t.answer) <= T.MAX_CHAIN_VALUE
            assert len(steps.split()) == t.difficulty  # one step per operation


def test_chain_worked_solution_example():
    t = T.Task("chain", "Compute (7+5)*2-3", "21", 3, ((7, "+", 5, 12), (12, "*", 2, 24), (24, "-", 3, 21)))
    assert T.worked_solution(t, random.Random(0)) == ("7+5=12 12*2=24 24-3=21", "21")


def test_addition_and_linear():
    rng = random.Random(1)
    for _ in range(200):
        t = T.make_addition(rng, 3)
        a, b = t.operands
        assert T.worked_solution(t, rng)[1] == str(a + b) == t.answer
        t = T.make_linear(rng, 2)
        a, b, c = t.operands
        assert a * int(t.answer) + b == c and T.worked_solution(t, rng)[1] == t.answer


def test_splits_disjoint_and_deterministic():
    fam = {"chain": {"difficulties": [2, 3]}, "sum": {"weight": 0.5, "difficulties": [3]}}
    a = T.generate_tasks(7, fam, {"train": 300, "validation": 50, "test": 50})
    b = T.generate_tasks(7, fam, {"train": 300, "validation": 50, "test": 50})
    assert all(a[s].equals(b[s]) for s in a)
    qs = [set(a[s]["question"]) for s in ("train", "validation", "test")]
    assert not (qs[0] & qs[1]) and not (qs[0] & qs[2]) and not (qs[1] & qs[2])
    assert set(a["train"]["task"]) == {"chain", "sum"}


def test_too_many_prompts_for_the_space_fails_clearly():
    with pytest.raises(ValueError, match="cannot draw"):
        T.generate_tasks(0, {"sum": {"difficulties": [1]}}, {"train": 50})  # only 9 distinct questions
    with pytest.raises(ValueError, match="unknown task families"):
        T.generate_tasks(0, {"nope": {"difficulties": [1]}}, {"train": 5})


def test_weight_zero_leaves_a_family_out():
    # a config extending the default inherits its `chain` family; weight 0 is how it trains on others alone
    fam = {"chain": {"weight": 0.0, "difficulties": [1]}, "addition": {"difficulties": [2]}}
    split = T.generate_tasks(3, fam, {"train": 40})["train"]
    assert set(split["task"]) == {"addition"}
    assert split["question"].str.fullmatch(r"Compute \d\d \+ \d\d").all()
    with pytest.raises(ValueError, match="every task family has weight 0"):
        T.generate_tasks(3, {"chain": {"weight": 0, "difficulties": [1]}}, {"train": 5})


def test_table1_template_word_for_word():
    assert render("Compute 1+2") == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
        "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
        "User: Compute 1+2. Assistant:")
    assert TABLE1.count("{prompt}") == 1
    with pytest.raises(ValueError):
        render("x", "no placeholder")


def test_load_prompts_from_jsonl(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": 4}\n')
    df = T.load_prompts(str(p), "problem", "answer", split="test")
    assert df["question"].tolist() == ["1+1?", "2+2?"] and df["answer"].tolist() == ["2", "4"]
    with pytest.raises(KeyError, match="no field 'question'"):
        T.load_prompts(str(p), "question", "answer")


def test_base_corpus_mix_and_textbook_share():
    from r1flow.models.tiny import build_corpus

    fam = {"chain": {"difficulties": [2, 3]}}
    docs = build_corpus(0, 2000, fam, {"worked": 0.5, "answer_only": 0.5}, "table1", textbook_share=0.4)
    textbook = [d for d in docs if not d[0].startswith("A conversation")]
    assert 0.35 < len(textbook) / len(docs) < 0.45
    for prompt, completion in textbook[:50]:
        q = prompt.removesuffix(":")
        steps, ans = completion.removesuffix(".").split(". So the answer is ")
        assert str(eval(q.removeprefix("Compute "))) == ans  # textbook examples are always right
    templated = [c for p, c in docs if p.startswith("A conversation")]
    worked = [c for c in templated if "<think>" in c]
    assert 0.4 < len(worked) / len(templated) < 0.6
    one = {"chain": {"difficulties": [1]}}  # a small question space, so exclusions bite
    held_out = set(T.generate_tasks(2, one, {"test": 40})["test"]["question"])
    seen = {p.split("User: ")[1].removesuffix(". Assistant:") for p, _ in
            build_corpus(1, 500, one, {"bare": 1.0}, "table1", exclude=held_out)}
    assert len(seen) > 40 and not (seen & held_out)


def test_quick_steps_slip_and_a_recheck_catches_the_slip():
    t = T.Task("chain", "Compute (7+5)*2-3", "21", 3, ((7, "+", 5, 12), (12, "*", 2, 24), (24, "-", 3, 21)))
    rng = random.Random(0)
    # no slip: quick steps write only the results; re-checked ones redo the step in full
    assert T.worked_solution(t, rng, shorthand=True, rechecked={0, 2}) == ("=12 wait 7+5=12 =24 =21 wait 24-3=21", "21")
    for seed in range(20):
        # every quick step slips: unchecked, the slip propagates; all re-checked, the answer is right
        steps, ans = T.worked_solution(t, random.Random(seed), shorthand=True, slip_rate=1.0)
        assert steps.split()[0] in {"=10", "=11", "=13", "=14"} and "wait" not in steps
        steps, ans = T.worked_solution(t, random.Random(seed), shorthand=True, slip_rate=1.0, rechecked={0, 1, 2})
        assert ans == "21" and steps.count("wait") == 3
        assert steps.split()[1:3] == ["wait", "7+5=12"] and steps.split()[0] != "=12"
        # careful steps never slip
        assert T.worked_solution(t, random.Random(seed), slip_rate=1.0) == ("7+5=12 12*2=24 24-3=21", "21")


def test_rechecked_steps_range_from_none_to_all():
    rng = random.Random(0)
    assert all(T.chain_rechecked(4, rng, 0.0) == set() for _ in range(50))
    counts = {len(T.chain_rechecked(4, rng, 1.0)) for _ in range(400)}
    assert counts == {1, 2, 3, 4}
    assert all(T.chain_rechecked(4, rng, 1.0) <= {0, 1, 2, 3} for _ in range(50))


def test_partial_solutions_write_a_prefix_of_the_steps_and_the_right_answer():
    from r1flow.models.tiny import corpus_completion

    t = T.Task("chain", "Compute (7+5)*2-3", "21", 3, ((7, "+", 5, 12), (12, "*", 2, 24), (24, "-", 3, 21)))
    seen = set()
    for seed in range(60):
        c = corpus_completion(t, random.Random(seed), {"partial": 1.0})
        seen.add(c)
        assert c in {" <think> 7+5=12 </think> <answer> 21 </answer>",
                     " <think> 7+5=12 12*2=24 </think> <answer> 21 </answer>"}
    assert len(seen) == 2  # one to all-but-one steps, never none and never all
    one_step = T.Task("chain", "Compute 7+5", "12", 1, ((7, "+", 5, 12),))
    assert corpus_completion(one_step, random.Random(0), {"partial": 1.0}) == " <think> 7+5=12 </think> <answer> 12 </answer>"


def test_recheck_guesses_then_writes_the_remaining_steps():
    from r1flow.data.formats import reflections
    from r1flow.models.tiny import corpus_completion

    t = T.Task("chain", "Compute (7+5)*2-3", "21", 3, ((7, "+", 5, 12), (12, "*", 2, 24), (24, "-", 3, 21)))
    guesses, prefixes = set(), set()
    for seed in range(80):
        c = corpus_completion(t, random.Random(seed), {"recheck": 1.0})
        think = c.split("<think> ")[1].split(" </think>")[0]
        before, after = think.split(" wait ") if " wait " in think else ("", "")
        assert reflections(c) == 1 and c.endswith("</think> <answer> 21 </answer>")
        *written, guess = before.split(" ")
        guesses.add(guess)
        prefixes.add(len(written))
        # the careful steps before and after the guess are the whole worked solution, in order
        assert " ".join(written + after.split(" ")) == "7+5=12 12*2=24 24-3=21"
    assert "=21" in guesses and guesses <= {"=19", "=20", "=21", "=22", "=23"} and len(guesses) > 2
    assert prefixes == {0, 1, 2}


def test_guess_tasks_invert_a_chain_and_check_each_guess_forwards():
    from r1flow.data.formats import reflections

    rng = random.Random(0)
    for _ in range(300):
        t = T.make_guess(rng, rng.randint(1, 3))
        expr, target = t.question.removeprefix("Find x: ").split(" = ")
        x = int(t.answer)
        assert _eval_question(expr.replace("x", t.answer, 1)) == int(target) and expr.count("x") == 1
        steps, ans = T.worked_solution(t, rng)
        assert ans == t.answer and steps.endswith(f" vs {target} x={x}")
        tries = steps.removesuffix(f" x={x}").split(" wait ")
        assert 1 <= len(tries) <= T.GUESS_MAX_TRIES and reflections(steps) == len(tries) - 1
        guesses = []
        for i, tr in enumerate(tries):
            head, rest = tr.split(": ")
            g = int(head.removeprefix("try "))
            written, verdict = rest.split(f" vs {target}")
            written = written.split(" ")
            value = int(written[-1].split("=")[1])
            # each check runs the chain forwards from the guess, every step right and within 0..20
            assert written[0].startswith(f"{g}") and len(written) == t.difficulty
            assert all(_eval_question(w.split("=")[0]) == int(w.split("=")[1]) <= T.MAX_CHAIN_VALUE for w in written)
            # the verdict is the comparison of the result with the target; only the last check holds
            assert verdict == ("" if i == len(tries) - 1 else " low" if value < int(target) else " high")
            assert (value == int(target)) == (i == len(tries) - 1)
            guesses.append(g)
        assert guesses[-1] == x and all(abs(a - b) == 1 for a, b in zip(guesses, guesses[1:]))
        steps, ans = T.worked_solution(t, rng, wrong=True)
        assert ans != t.answer and "wait" not in steps and steps.endswith(f" x={ans}")


def test_guess_worked_solution_example():
    t = T.Task("guess", "Find x: (x+5)*2-3 = 15", "4", 3, ((4, "+", 5, 9), (9, "*", 2, 18), (18, "-", 3, 15)))
    rng = random.Random(3)
    traces = {T.worked_solution(t, rng)[0] for _ in range(200)}
    # right at once, or off by one or two and one step towards x per failed check; 6 would leave 0..20
    right = "try 4: 4+5=9 9*2=18 18-3=15 vs 15 x=4"
    assert traces == {
        right,
        "try 5: 5+5=10 10*2=20 20-3=17 vs 15 high wait " + right,
        "try 3: 3+5=8 8*2=16 16-3=13 vs 15 low wait " + right,
        "try 2: 2+5=7 7*2=14 14-3=11 vs 15 low wait try 3: 3+5=8 8*2=16 16-3=13 vs 15 low wait " + right,
    }


def test_partial_guess_checks_the_first_guesses_then_answers():
    from r1flow.models.tiny import corpus_completion

    t = T.Task("guess", "Find x: x*3-2 = 13", "5", 2, ((5, "*", 3, 15), (15, "-", 2, 13)))
    # a prefix of the worked trace, one try to all but one (the rest done in the head), then the answer;
    # 7 is never tried (7*3=21 leaves 0..20)
    expected = {
        "try 5: 5*3=15 15-2=13 vs 13 x=5",
        "try 4: 4*3=12 12-2=10 vs 13",
        "try 6: 6*3=18 18-2=16 vs 13",
        "try 3: 3*3=9 9-2=7 vs 13",
        "try 3: 3*3=9 9-2=7 vs 13 low wait try 4: 4*3=12 12-2=10 vs 13",
    }
    seen = set()
    for seed in range(200):
        c = corpus_completion(t, random.Random(seed), {"partial": 1.0})
        assert c.startswith(" <think> ") and c.endswith(" </think> <answer> 5 </answer>")
        seen.add(c.removeprefix(" <think> ").removesuffix(" </think> <answer> 5 </answer>"))
    assert seen == expected


def test_a_guess_and_the_chain_it_runs_backwards_are_one_problem():
    # hand-built twins: (4+5)*2 = 18 forwards, and x = 4 backwards
    assert T.problem_key("chain", "Compute (4+5)*2", "18") == "Compute (4+5)*2"
    assert T.problem_key("guess", "Find x: (x+5)*2 = 18", "4") == "Compute (4+5)*2"
    assert T.problem_key("guess", "Find x: (x+5)*2 = 18", "5") != "Compute (4+5)*2"  # another x, another chain
    assert T.problem_key("guess", "Find x: x*3-2 = 13", "5") == "Compute 5*3-2"
    # only the first number is x: a chain that repeats its start value keeps the later ones
    assert T.problem_key("guess", "Find x: (x+4)*2 = 16", "4") == "Compute (4+4)*2"
    rng = random.Random(3)
    for _ in range(200):
        t = T.make_chain(rng, rng.randint(1, 4))
        rng2 = random.Random(rng.random())
        state = rng2.getstate()
        c = T.make_chain(rng2, t.difficulty)
        rng2.setstate(state)
        g = T.make_guess(rng2, t.difficulty)  # the guess built from the very chain c
        assert T.task_key(g) == T.task_key(c) == c.question


def test_no_split_shares_a_problem_with_another_in_either_direction():
    fam = {"chain": {"weight": 0.5, "difficulties": [1]}, "guess": {"weight": 0.5, "difficulties": [1]}}
    # 129 one-operation problems in all: 120 prompts of both families leave no twin across the splits
    s = T.generate_tasks(0, fam, {"train": 80, "validation": 20, "test": 20})
    keys = {k: set(map(T.problem_key, d["task"], d["question"], d["answer"])) for k, d in s.items()}
    assert all(len(keys[k]) == len(s[k]) for k in s)  # no twins inside a split either
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["validation"])
    assert not (keys["validation"] & keys["test"])
    with pytest.raises(ValueError, match=r"data\.synthetic\.families\.(chain|guess)\.difficulties"):
        T.generate_tasks(0, fam, {"train": 120, "validation": 20, "test": 20})  # 160 > 129


def test_every_split_has_the_configured_mix():
    import yaml

    syn = yaml.safe_load(open("config/config.yaml"))["data"]["synthetic"]
    for seed in (syn["seed"], syn["seed"] + 1):
        splits = T.generate_tasks(seed, syn["families"], syn["sizes"])
        assert {k: len(v) for k, v in splits.items()} == syn["sizes"]
        total = sum(f["weight"] for f in syn["families"].values())
        for name, d in splits.items():
            for fam, f in syn["families"].items():
                for diff in f["difficulties"]:
                    want = f["weight"] / total / len(f["difficulties"])
                    got = ((d["task"] == fam) & (d["difficulty"] == diff)).mean()
                    assert abs(got - want) <= 0.02, (name, fam, diff, got, want)
    # the quotas round by largest remainder and sum to n
    q = T.mix_quotas({"chain": {"weight": 2, "difficulties": [2, 3, 3]}, "guess": {"weight": 1, "difficulties": [2]}}, 10)
    assert q == {("chain", 2): 2, ("chain", 3): 5, ("guess", 2): 3}


def test_the_corpus_never_holds_a_held_out_problem_in_either_direction():
    from r1flow.models.tiny import build_corpus

    fam = {"chain": {"weight": 0.5, "difficulties": [1]}, "guess": {"weight": 0.5, "difficulties": [1]}}
    test = T.generate_tasks(4, fam, {"test": 40})["test"]
    held_out = set(map(T.problem_key, test["task"], test["question"], test["answer"]))
    docs = build_corpus(1, 600, fam, {"bare": 1.0}, "table1", exclude=held_out)
    seen = set()
    for p, c in docs:
        q = p.split("User: ")[1].removesuffix(". Assistant:")
        task = "guess" if q.startswith("Find x") else "chain"
        seen.add(T.problem_key(task, q, c.strip()))
    assert len(seen) > 60 and not (seen & held_out)
