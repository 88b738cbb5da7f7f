"""Pandera schemas for every table that passes between rules.

A table is only ever read or written through `r1flow.data.artifacts`, which validates it against
one of these, so a malformed file stops the rule that meets it.
"""

from pandera.pandas import Check, Column, DataFrameSchema

# Prompts with a verifiable answer: synthetic tasks or a real dataset mapped to these columns.
TASKS = DataFrameSchema(
    {
        "prompt_id": Column(str, unique=True),
        "task": Column(str),
        "question": Column(str, Check.str_length(min_value=1)),
        "answer": Column(str, Check.str_length(min_value=1)),
        "difficulty": Column(int, Check.ge(0)),
    },
    name="tasks",
    strict=False,  # extra columns (subject, level, ...) ride along
    coerce=True,
)

# Problems of an evaluation benchmark, whatever their source (r1flow.evaluation.benchmarks).
PROBLEMS = DataFrameSchema(
    {
        "benchmark": Column(str),
        "problem_id": Column(str, unique=True),
        "question": Column(str, Check.str_length(min_value=1)),
        "answer": Column(str, Check.str_length(min_value=1)),
        "answer_type": Column(str, Check.isin(["math", "multiple_choice", "code"])),
    },
    name="problems",
    coerce=True,
)

# One row per sampled completion during evaluation: enough to explain every verdict.
SAMPLES = DataFrameSchema(
    {
        "benchmark": Column(str),
        "problem_id": Column(str),
        "sample": Column(int, Check.ge(0)),
        "prompt": Column(str),
        "completion": Column(str),
        "extracted": Column(str, nullable=True),
        "correct": Column(float, Check.in_range(0.0, 1.0)),
        "reason": Column(str),
        "format": Column(float, Check.in_range(0.0, 1.0)),
        "language": Column(float, Check.in_range(0.0, 1.0), nullable=True),
        "completion_tokens": Column(int, Check.ge(0)),
        "truncated": Column(bool),
    },
    name="samples",
    coerce=True,
)

# One row per (model, benchmark): the metrics of section 3 and the sampling settings behind them.
EVAL_SUMMARY = DataFrameSchema(
    {
        "model": Column(str),
        "benchmark": Column(str),
        "num_problems": Column(int, Check.ge(1)),
        "n": Column(int, Check.ge(1)),
        "pass@1": Column(float, Check.in_range(0.0, 1.0)),
        # standard error over problems (NaN for one problem); cons@k's 95% bootstrap interval over problems
        "pass@1_se": Column(float, Check.ge(0.0), nullable=True),
        "cons@k": Column(float, Check.in_range(0.0, 1.0), nullable=True),
        "cons@k_lo": Column(float, Check.in_range(0.0, 1.0), nullable=True),
        "cons@k_hi": Column(float, Check.in_range(0.0, 1.0), nullable=True),
        "cons_k": Column(float, Check.ge(1), nullable=True),
        "format_rate": Column(float, Check.in_range(0.0, 1.0)),
        "mean_length": Column(float, Check.ge(0.0)),
        # re-checked steps ("wait") per completion: reflection, section 2.2.4
        "reflections": Column(float, Check.ge(0.0), nullable=True),
        "language_consistency": Column(float, Check.in_range(0.0, 1.0), nullable=True),
        "truncated_rate": Column(float, Check.in_range(0.0, 1.0)),
        # code samples the sandbox could not start (scored 0; not the model's failure)
        "sandbox_errors": Column(int, Check.ge(0)),
        "temperature": Column(float, Check.ge(0.0)),
        "top_p": Column(float, Check.in_range(0.0, 1.0, include_min=False)),
        "max_new_tokens": Column(int, Check.ge(1)),
    },
    name="eval_summary",
    strict=False,  # pass@k columns (pass@8, ...) are added by name
    coerce=True,
)

# Per-step GRPO metrics. Validation columns are empty on steps without an evaluation.
GRPO_METRICS = DataFrameSchema(
    {
        "step": Column(int, Check.ge(1), unique=True),
        "reward_mean": Column(float),
        "reward_std": Column(float, Check.ge(0.0)),
        "accuracy": Column(float, Check.in_range(0.0, 1.0)),
        "format_rate": Column(float, Check.in_range(0.0, 1.0)),
        "kl": Column(float, nullable=True),
        "clip_fraction": Column(float, Check.in_range(0.0, 1.0)),
        "entropy": Column(float, Check.ge(0.0)),
        "completion_length": Column(float, Check.ge(0.0)),
        "reflections": Column(float, Check.ge(0.0)),
        "truncated_fraction": Column(float, Check.in_range(0.0, 1.0)),
        "learning_rate": Column(float, Check.ge(0.0)),
        "loss": Column(float),
        "time_generation": Column(float, Check.ge(0.0)),
        "time_training": Column(float, Check.ge(0.0)),
        # resident memory of the trainer process after the step, and its peak so far (MB; NaN off Linux)
        "rss_mb": Column(float, Check.gt(0.0), nullable=True),
        "peak_rss_mb": Column(float, Check.gt(0.0), nullable=True),
        # the step's own peak in each phase: sampling, training (log-probs and backward), the optimizer update
        "peak_rss_sampling_mb": Column(float, Check.gt(0.0), nullable=True, required=False),
        "peak_rss_training_mb": Column(float, Check.gt(0.0), nullable=True, required=False),
        "peak_rss_update_mb": Column(float, Check.gt(0.0), nullable=True, required=False),
        # with dynamic sampling (GRPO's dynamic_sampling): completions and batches of prompts drawn in the step
        "samples_drawn": Column(float, Check.gt(0.0), required=False),
        "prompt_batches_drawn": Column(float, Check.ge(1.0), required=False),
        "val_pass@1": Column(float, Check.in_range(0.0, 1.0), nullable=True),
        "val_format_rate": Column(float, Check.in_range(0.0, 1.0), nullable=True),
        "val_length": Column(float, Check.ge(0.0), nullable=True),
    },
    name="grpo_metrics",
    strict=False,  # per-reward columns reward/<name>_mean and _std are added by name
    coerce=True,
)



def _messages(roles: tuple[str, ...] | None = None, last: str | None = None):
    """Element check: a non-empty list of {"role", "content"} messages (a numpy array after parquet).

    roles: the roles allowed; last: the role of the final message.
    """

    def ok(value) -> bool:
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__") or len(value) == 0:
            return False
        for m in value:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return False
            if roles is not None and m["role"] not in roles:
                return False
        return last is None or value[-1]["role"] == last

    return Check(ok, element_wise=True, name=f"messages(last={last})" if last else f"messages(roles={roles})")


def _one_assistant_message():
    return [_messages(roles=("assistant",)), Check(lambda v: len(v) == 1, element_wise=True, name="one_message")]


# Preference pairs for the reward models of section 2.3.4, in the conversational layout TRL's reward
# trainer reads directly: `prompt` is a message list ending with the user's, `chosen` and `rejected` hold
# one assistant message each. `aspect` names the reward model a pair trains.
PREFERENCES = DataFrameSchema(
    {
        "pair_id": Column(str, unique=True),
        "aspect": Column(str, Check.isin(["helpfulness", "harmlessness"])),
        "prompt": Column(object, _messages(roles=("system", "user", "assistant"), last="user")),
        "chosen": Column(object, _one_assistant_message()),
        "rejected": Column(object, _one_assistant_message()),
    },
    name="preferences",
    strict=False,  # `kind` (the generator's request type) and any source columns ride along
    coerce=True,
)

# SFT data (cold start, rejection sampling, non-reasoning, distillation): a conversational `messages`
# column (user turn, then the assistant's) as Hugging Face tooling reads it directly.
SFT_DATA = DataFrameSchema(
    {
        "prompt_id": Column(str),
        "messages": Column(object, _messages(roles=("system", "user", "assistant"), last="assistant")),
        "source": Column(str),
        # how the assistant turn ended: "stop" (a sample that emitted the end of sequence) or "written" (a
        # text composed by rule). "length" (cut off at max_new_tokens) is refused: SFT appends an end of
        # sequence to every target and would teach the model to stop mid-thought.
        "stop_reason": Column(str, Check.isin(["stop", "written"])),
    },
    name="sft_data",
    coerce=True,
)

# Per-update SFT metrics.
SFT_METRICS = DataFrameSchema(
    {
        "step": Column(int, Check.ge(1), unique=True),
        "epoch": Column(int, Check.ge(1)),
        "loss": Column(float, Check.ge(0.0)),
        "learning_rate": Column(float, Check.ge(0.0)),
    },
    name="sft_metrics",
    coerce=True,
)

# Per-step Bradley-Terry reward model training metrics (r1flow.training.reward_model).
RM_METRICS = DataFrameSchema(
    {
        "step": Column(int, Check.ge(1), unique=True),
        "loss": Column(float, Check.ge(0.0)),
        "accuracy": Column(float, Check.in_range(0.0, 1.0)),  # pairwise, on the step's batch; ties count half
        "learning_rate": Column(float, Check.ge(0.0)),
    },
    name="rm_metrics",
    coerce=True,
)

# Overlap of the training prompts with the benchmarks (r1flow.data.decontamination): one row per (training
# set, benchmark) pair; `example` is the first contaminated prompt, empty when there is none.
DECONTAMINATION = DataFrameSchema(
    {
        "split": Column(str, Check.isin(["train", "validation"])),
        "benchmark": Column(str),
        "prompts": Column(int, Check.ge(0)),
        "contaminated": Column(int, Check.ge(0)),
        "share": Column(float, Check.in_range(0.0, 1.0)),
        "example": Column(str, nullable=True),
    },
    name="decontamination",
    unique=["split", "benchmark"],
    coerce=True,
)

# Every contaminated (training prompt, benchmark): the first benchmark problem it overlaps and the words shared.
DECONTAMINATION_MATCHES = DataFrameSchema(
    {
        "split": Column(str, Check.isin(["train", "validation"])),
        "prompt_id": Column(str),
        "benchmark": Column(str),
        "problem_id": Column(str),
        "match": Column(str, Check.str_length(min_value=1)),
        "question": Column(str),
    },
    name="decontamination_matches",
    unique=["split", "prompt_id", "benchmark"],
    coerce=True,
)

SCHEMAS = {s.name: s for s in (TASKS, SAMPLES, EVAL_SUMMARY, GRPO_METRICS, PREFERENCES, RM_METRICS, SFT_DATA,
                                SFT_METRICS, DECONTAMINATION, DECONTAMINATION_MATCHES)}
