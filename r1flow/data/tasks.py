"""Synthetic verifiable reasoning tasks for the embedded default, and a loader for real prompt sets.

Each family yields (question, answer, difficulty) and can write a worked solution, so the same code
builds RL prompts and the tiny base model's pretraining corpus. Worked solutions get longer with the
difficulty, so a policy that learns to reason step by step writes longer answers on harder prompts
(the growth of Figure 3 in miniature).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import pandas as pd


@dataclass
class Task:
    task: str
    question: str
    answer: str
    difficulty: int
    # (a, b) for addition; (a, b, c) for a*x + b = c
    operands: tuple


def make_addition(rng: random.Random, digits: int) -> Task:
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return Task("addition", f"Compute {a} + {b}", str(a + b), digits, (a, b))


def make_linear(rng: random.Random, digits: int) -> Task:
    # a*x + b = c with an integer solution; larger x and b for higher difficulty.
    a = rng.randint(2, 9)
    x = rng.randint(1, 10**digits - 1)
    b = rng.randint(1, 10**digits - 1)
    return Task("linear", f"Solve {a}*x + {b} = {a * x + b} for x", str(x), digits, (a, b, a * x + b))


def make_sum(rng: random.Random, terms: int) -> Task:
    # The sum of `terms` single digits: hopeless "in the head" for a tiny model, easy step by step with a
    # running total, and the worked solution grows with the number of terms.
    xs = [rng.randint(1, 9) for _ in range(terms)]
    return Task("sum", "Compute " + "+".join(map(str, xs)), str(sum(xs)), terms, tuple(xs))


MAX_CHAIN_VALUE = 20


def make_chain(rng: random.Random, ops: int) -> Task:
    # An expression evaluated left to right, e.g. (7+5)*2-3: order matters, so unlike a plain sum it cannot
    # be answered by pooling the digits in one glance; one step per operation, values kept within 0..MAX_CHAIN_VALUE.
    value = rng.randint(2, 9)
    expr, steps, flat = str(value), [], True  # flat: no + or - at the top level of expr yet
    for _ in range(ops):
        choices = ["+", "-"] + (["*"] if value * 2 <= MAX_CHAIN_VALUE else [])
        op = rng.choice(choices)
        if op == "*":
            k = rng.choice([k for k in (2, 3) if value * k <= MAX_CHAIN_VALUE])
            if not flat:
                expr = f"({expr})"
            new, expr, flat = value * k, f"{expr}*{k}", True
        elif op == "+":
            k = rng.randint(1, min(9, MAX_CHAIN_VALUE - value)) if value < MAX_CHAIN_VALUE else 0
            if k == 0:
                op, k = "-", rng.randint(1, 9)
                new = value - k
            else:
                new = value + k
            expr, flat = f"{expr}{op}{k}", False
        else:
            k = rng.randint(1, min(9, value)) if value > 0 else 0
            if k == 0:
                op, k = "+", rng.randint(1, 9)
                new = value + k
            else:
                new = value - k
            expr, flat = f"{expr}{op}{k}", False
        steps.append((value, op, k, new))
        value = new
    return Task("chain", f"Compute {expr}", str(value), ops, tuple(steps))


def make_guess(rng: random.Random, ops: int) -> Task:
    # An arithmetic chain run backwards: "Find x: (x+5)*2-3 = 21". The base's textbook never inverts a chain,
    # it guesses x and checks the guess by running the chain forwards, the arithmetic it knows: checking is
    # easier than solving, so re-checking a guess ("wait") pays (the reflection of section 2.2.4).
    t = make_chain(rng, ops)
    expr = re.sub(r"^(\(*)\d+", r"\g<1>x", t.question.removeprefix("Compute "), count=1)
    return Task("guess", f"Find x: {expr} = {t.answer}", str(t.operands[0][0]), ops, t.operands)


FAMILIES = {"chain": make_chain, "sum": make_sum, "addition": make_addition, "linear": make_linear,
            "guess": make_guess}

# Guess-and-check in the corpus: the first guess is right with probability GUESS_HIT_RATE, else off by one
# or two (a rough guess: the base learns such an intuition, not the inversion); each failed check says
# whether the result is low or high, and the next guess moves one step that way. Guesses whose chain
# leaves 0..MAX_CHAIN_VALUE (the arithmetic the textbook teaches) are not made.
GUESS_HIT_RATE = 0.4
GUESS_OFFSETS = (-2, -1, 1, 2)
GUESS_MAX_TRIES = max(map(abs, GUESS_OFFSETS)) + 1


def apply_op(value: int, op: str, k: int) -> int:
    """One step of a chain: value op k, for op in + - *."""
    return value + k if op == "+" else value - k if op == "-" else value * k


def run_chain(start: int, steps: tuple) -> tuple[list[str], int, bool]:
    """A chain's operations run forwards from `start`: the steps written out ("5+5=10 10*2=20"), the
    result, and whether every value stays within 0..MAX_CHAIN_VALUE."""
    value, out, inside = start, [], True
    for _, op, k, _ in steps:
        new = apply_op(value, op, k)
        inside = inside and 0 <= new <= MAX_CHAIN_VALUE
        out.append(f"{value}{op}{k}={new}")
        value = new
    return out, value, inside


def guess_tries(t: Task, rng: random.Random) -> list[int]:
    """The guesses a corpus document tries for a guess task, in order, one step apart, the right one last."""
    x = int(t.answer)
    off = [d for d in GUESS_OFFSETS if x + d >= 0 and run_chain(x + d, t.operands)[2]]
    if not off or rng.random() < GUESS_HIT_RATE:
        return [x]
    d = rng.choice(off)
    return [x + d - i * (1 if d > 0 else -1) for i in range(abs(d) + 1)]


def addition_columns(a: int, b: int, wrong_column: int | None = None, rng: random.Random | None = None):
    """Column-by-column addition from the units up. Returns (steps, answer string).

    With `wrong_column`, that column's sum is off by a small amount and the rest stays consistent with
    it, which plants a plausible-looking mistake in the base model's corpus.
    """
    da, db = str(a)[::-1], str(b)[::-1]
    carry, steps, digits_out = 0, [], []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        if i == wrong_column:
            s = max(0, s + rng.choice([-2, -1, 1, 2]))
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        steps.append(f"{terms}={s}")
        digits_out.append(s % 10)
        carry = s // 10
    if carry:
        digits_out.append(carry)
    answer = "".join(str(d) for d in reversed(digits_out)).lstrip("0") or "0"
    return steps, answer


def chain_rechecked(n_steps: int, rng: random.Random, recheck_share: float) -> set[int]:
    """The steps a corpus document re-checks: none with probability 1 - recheck_share, else a number drawn
    uniformly from 1 to all of them (so documents that re-check every step are rare, and RL can grow the
    habit from none to all: the reflection of section 2.2.4 in miniature)."""
    if n_steps == 0 or rng.random() >= recheck_share:
        return set()
    return set(rng.sample(range(n_steps), rng.randint(1, n_steps)))


def worked_solution(t: Task, rng: random.Random, wrong: bool = False, shorthand: bool = False,
                    slip_rate: float = 0.0, rechecked: set[int] | None = None) -> tuple[str, str]:
    """A reasoning trace and the answer it reaches (wrong on purpose when `wrong`).

    `shorthand` (chain tasks) writes only the running values, "=12 =24 =21": the terse, sloppier style
    of reasoning in the base model's corpus, told apart from careful steps by its very first token.

    Chain tasks model two kinds of scratch work. A careful step writes its operands ("7+5=12") and does
    not slip; a quick (shorthand) step writes only the result ("=12") and slips (off by 1 or 2) with
    probability `slip_rate`. A quick step in `rechecked` is followed by "wait" and the step done carefully
    ("=13 wait 7+5=12"), which catches a slip, and the chain goes on from the right value; an unchecked
    slip propagates to a wrong answer. Re-checking costs tokens and pays on long chains: the trade RL
    settles as it trains (the reflection and growing length of section 2.2.4 and Figure 3).
    """
    if t.task == "chain":
        # one line per operation, "7+5=12 12*2=24 24-3=21"; a planted mistake propagates onwards
        bad = rng.randrange(len(t.operands)) if wrong else None
        rechecked = rechecked or set()
        value, out = t.operands[0][0], []
        for i, (_, op, k, _) in enumerate(t.operands):
            right = apply_op(value, op, k)
            new = right
            if i == bad or (shorthand and slip_rate and rng.random() < slip_rate):
                d = rng.choice([-2, -1, 1, 2])
                new = right + d if right + d >= 0 else right - d
            out.append(f"={new}" if shorthand else f"{value}{op}{k}={new}")
            if shorthand and i in rechecked:
                new = right
                out.append(f"wait {value}{op}{k}={new}")
            value = new
        return " ".join(out), str(value)
    if t.task == "guess":
        # "try 5: 5+5=10 10*2=20 20-3=17 vs 21 low wait try 6: ... 22-3=19 vs 21 low wait try 7: 7+5=12
        # 12*2=24 24-3=21 vs 21 x=7": each guess checked by running the chain forwards and setting the result
        # beside the target (a comparison of two adjacent numbers); "low"/"high", "wait" and the next guess
        # one step that way when they differ, "x=7" when they agree (the answer is then the last value
        # written, as in a chain). A planted mistake accepts a failed guess.
        target = t.operands[-1][3]  # the chain's result, the right-hand side of the question
        tries = guess_tries(t, rng)
        if wrong:
            tries = [tries[0] if len(tries) > 1 else int(t.answer) + 1]
        out = []
        for g in tries:
            steps, value, _ = run_chain(g, t.operands)
            verdict = "" if value == target or wrong else " low wait" if value < target else " high wait"
            out.append(f"try {g}: {' '.join(steps)} vs {target}{verdict}")
        return " ".join(out) + f" x={tries[-1]}", str(tries[-1])
    if t.task == "sum":
        # running total: "+5=8 +8=16 ..." after the first term; a planted mistake propagates onwards
        xs, total, steps = t.operands, t.operands[0], []
        bad = rng.randrange(1, len(t.operands)) if wrong else None
        for i, x in enumerate(xs[1:], start=1):
            total += x + (rng.choice([-2, -1, 1, 2]) if i == bad else 0)
            steps.append(f"+{x}={total}")
        return f"{xs[0]} " + " ".join(steps), str(total)
    if t.task == "addition":
        a, b = t.operands
        col = rng.randrange(len(str(max(a, b)))) if wrong else None
        steps, answer = addition_columns(a, b, col, rng)
        return " ".join(steps), answer
    if t.task == "linear":
        a, b, c = t.operands
        d = c - b
        x = d // a
        if wrong:
            x += rng.choice([-2, -1, 1, 2])
        return f"{c}-{b}={d} {d}/{a}={x}", str(x)
    raise ValueError(f"no worked solution for task family {t.task!r}")


def family_weights(families: dict[str, dict]) -> tuple[list[str], list[float]]:
    """The families to draw from and their weights. Weight 0 leaves a family out: a config that extends
    the default one (whose `chain` family it inherits) can then train on other families alone."""
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown task families {sorted(unknown)}; known: {sorted(FAMILIES)}")
    names = [n for n in families if families[n].get("weight", 1.0) > 0]
    if not names:
        raise ValueError(f"every task family has weight 0 in data.synthetic.families: {families}")
    return names, [families[n].get("weight", 1.0) for n in names]


def problem_key(task: str, question: str, answer: str) -> str:
    """The arithmetic a question asks about: a guess task is a chain run backwards, so "Find x: (x+5)*2 = 18"
    (x = 4) and "Compute (4+5)*2" are one problem, and splits and the pretraining corpus compare these keys,
    not question texts (a held-out guess whose chain is pretrained on is not held out)."""
    if task == "guess":
        m = re.fullmatch(r"Find x: (.*) = (-?\d+)", question)
        if m:
            return "Compute " + m.group(1).replace("x", answer, 1)
    return question


def task_key(t: Task) -> str:
    return problem_key(t.task, t.question, t.answer)


def mix_quotas(families: dict[str, dict], n: int) -> dict[tuple[str, int], int]:
    """How many of `n` prompts each (family, difficulty) cell gets: the family's share of the weights, split
    evenly over its listed difficulties (a difficulty listed twice counts twice), rounded by largest
    remainder so the counts sum to `n`. Drawing to quotas, not at random, keeps every split at the configured
    mix however small it is."""
    names, weights = family_weights(families)
    share: dict[tuple[str, int], float] = {}
    for name, w in zip(names, weights):
        diffs = families[name]["difficulties"]
        for d in diffs:
            share[(name, d)] = share.get((name, d), 0.0) + w / sum(weights) / len(diffs)
    exact = {cell: s * n for cell, s in share.items()}
    counts = {cell: int(x) for cell, x in exact.items()}
    for cell in sorted(exact, key=lambda c: counts[c] - exact[c])[: n - sum(counts.values())]:
        counts[cell] += 1
    return counts


def generate_tasks(seed: int, families: dict[str, dict], sizes: dict[str, int]) -> dict[str, pd.DataFrame]:
    """Draw disjoint splits of distinct problems (`problem_key`), each at the configured mix (`mix_quotas`).

    families: {name: {"weight": w, "difficulties": [d, ...]}}; sizes: {split: number of prompts}. The held-out
    splits are drawn first and train last, so that train takes what is left rather than the held-out splits
    taking what train left (small cells, such as one-operation problems, would otherwise run out there).
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out = {}
    for split in sorted(sizes, key=lambda s: s == "train"):
        quotas = mix_quotas(families, sizes[split])
        cells = [cell for cell, count in quotas.items() for _ in range(count)]
        rng.shuffle(cells)
        rows = []
        for name, d in cells:
            for _ in range(1000):
                t = FAMILIES[name](rng, d)
                if task_key(t) not in seen:
                    break
            else:
                raise ValueError(
                    f"cannot draw {quotas[(name, d)]} '{split}' problems of family {name!r} at difficulty {d} distinct "
                    f"from the other splits' (data.synthetic.sizes {sizes}); lower the sizes or change "
                    f"data.synthetic.families.{name}.difficulties")
            seen.add(task_key(t))
            rows.append(
                {"prompt_id": f"{split}-{len(rows):06d}", "task": t.task, "question": t.question,
                 "answer": t.answer, "difficulty": t.difficulty}
            )
        out[split] = pd.DataFrame(rows, columns=["prompt_id", "task", "question", "answer", "difficulty"])
    return {split: out[split] for split in sizes}


GSM8K_ANSWER = re.compile(r"^(?P<solution>.*)\n\s*####\s*(?P<answer>[^\n]+?)\s*$", re.DOTALL)


def split_gsm8k(text: str) -> tuple[str, str] | None:
    """(rationale, final answer) of an answer in GSM8K's form, "...\n#### 72"; None for other text."""
    m = GSM8K_ANSWER.match(str(text))
    return None if m is None else (m.group("solution").strip(), m.group("answer").replace(",", "").strip())


def load_prompts(source: str, question_field: str = "question", answer_field: str = "answer",
                 split: str = "train", limit: int | None = None, solution_field: str | None = None) -> pd.DataFrame:
    """Load a real prompt set (local parquet/jsonl/csv, or a `datasets` hub id when online) into the
    TASKS columns, so a cluster run swaps in real math prompts without code changes. A worked solution
    rides along in a `solution` column: the `solution_field` (MATH's "solution"), or the rationale of an
    answer in GSM8K's form ("... #### 72"), whose final answer then becomes the answer."""
    import os

    if os.path.exists(source):
        if source.endswith(".parquet"):
            df = pd.read_parquet(source)
        elif source.endswith(".csv"):
            df = pd.read_csv(source)
        else:
            df = pd.read_json(source, lines=True, dtype=False)
    else:
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(f"'{source}' is not a local file and the 'datasets' package is not installed") from e
        df = datasets.load_dataset(source, split=split).to_pandas()
    for f in (question_field, answer_field, *([solution_field] if solution_field else [])):
        if f not in df.columns:
            raise KeyError(f"{source}: no field '{f}' (fields: {list(df.columns)})")
    if limit:
        df = df.head(limit)
    out = pd.DataFrame({
        "prompt_id": [f"{split}-{i:06d}" for i in range(len(df))],
        "task": "math",
        "question": df[question_field].astype(str),
        "answer": df[answer_field].astype(str),
        "difficulty": 0,
    })
    gsm = [split_gsm8k(a) for a in out["answer"]]
    if all(g is not None for g in gsm) and gsm:
        out["solution"] = [g[0] for g in gsm]
        out["answer"] = [g[1] for g in gsm]
    if solution_field:
        out["solution"] = df[solution_field].astype(str).to_numpy()
    return out


def prepare_splits(data_cfg: dict) -> dict[str, pd.DataFrame]:
    """The three splits from the config's `data` section: synthetic, or real files (a missing
    validation file is carved from the end of the training set)."""
    if data_cfg["source"] == "synthetic":
        syn = data_cfg["synthetic"]
        return generate_tasks(syn["seed"], syn["families"], syn["sizes"])
    files = data_cfg["files"]
    for split in ("train", "test"):
        if not files.get(split):
            raise ValueError(f"data.source is 'files' but data.files.{split} is not set")
    kw = dict(question_field=files["question_field"], answer_field=files["answer_field"], limit=files["limit"],
              solution_field=files.get("solution_field"))
    train = load_prompts(files["train"], split="train", **kw)
    if files.get("validation"):
        validation = load_prompts(files["validation"], split="validation", **kw)
    else:
        n_val = min(128, max(1, len(train) // 10))
        validation = train.tail(n_val).assign(prompt_id=lambda d: d.prompt_id.str.replace("train-", "validation-"))
        train = train.head(len(train) - n_val)
    test = load_prompts(files["test"], split="test", **kw)
    return {"train": train, "validation": validation, "test": test}
