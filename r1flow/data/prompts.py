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


# From the cold start on (section 2.3), models are chat models: a user turn, then the assistant's
# readable answer. This template is set on the tokenizer at the cold-start SFT, so every later model
# folder carries it and Hugging Face tooling (apply_chat_template, TRL) formats prompts the same way.
R1_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def chat_prompt(tokenizer, question: str) -> str:
    """The generation prompt of a one-turn conversation, by the tokenizer's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' needs a tokenizer with a chat template (set at the cold-start SFT)")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
