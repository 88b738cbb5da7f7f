"""Prompt templates.

`TABLE1` is the R1-Zero template of the paper's Table 1, word for word; "prompt" is replaced by the
question. R1-Zero completes the text after "Assistant:".
"""

TABLE1 = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {prompt}. Assistant:"
)

TEMPLATES = {"table1": TABLE1, "plain": "{prompt}"}


def render(question: str, template: str = "table1") -> str:
    """Fill a named template (or a literal template containing `{prompt}`) with a question."""
    text = TEMPLATES.get(template, template)
    if "{prompt}" not in text:
        raise ValueError(f"template {template!r} has no '{{prompt}}' placeholder")
    return text.replace("{prompt}", question)
