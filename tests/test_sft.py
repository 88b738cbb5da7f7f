"""SFT (sections 2.3.1, 2.3.3, 2.4): what is trained is what inference produces, and what is logged is
what was used."""

import math

import pytest

from r1flow.data.prompts import R1_CHAT_TEMPLATE
from r1flow.models import load_policy, load_tokenizer
from r1flow.training.sft import IGNORE, chat_pairs, collate, train_sft

CONVERSATIONS = [
    [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in all?"},
     {"role": "assistant", "content": "In May she sold 48/2 = 24. In all 48+24 = 72. The answer is \\boxed{72}."}],
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3=5, so 5."}],
]


def test_sft_sequence_is_what_inference_produces_under_a_real_chat_template(smollm2_gguf):
    """SmolLM2's template opens the answer with `<|im_start|>assistant\\n`: the trained sequence must be
    the generation prompt followed by the answer's own tokens (no space the model never produces) and
    the end-of-turn token generation stops at."""
    folder, gguf = smollm2_gguf
    tok = load_tokenizer(folder, gguf)
    prompts, completions = chat_pairs(tok, CONVERSATIONS)
    batch = collate(tok, prompts, completions)
    for i, msgs in enumerate(CONVERSATIONS):
        gen = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        assert gen.endswith("<|im_start|>assistant\n") and prompts[i] == gen
        assert completions[i] == msgs[1]["content"]
        expected = tok(gen + msgs[1]["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.eos_token == "<|im_end|>"  # the chat template's end of turn
        n = int(batch.attention_mask[i].sum())
        assert batch.input_ids[i, :n].tolist() == expected
        n_prompt = len(tok(gen, add_special_tokens=False)["input_ids"])
        assert (batch.labels[i, :n_prompt] == IGNORE).all() and batch.labels[i, n_prompt:n].tolist() == expected[n_prompt:]


def test_sft_completion_follows_our_own_template(tiny_policy):
    """The R1 chat template (set at the cold start) renders a finished turn as `Assistant: <answer>`: the
    completion carries the space the template puts after the generation prompt `Assistant:`."""
    tok = load_tokenizer(str(tiny_policy[0]))
    tok.chat_template = R1_CHAT_TEMPLATE
    prompts, completions = chat_pairs(tok, CONVERSATIONS)
    assert prompts[1] == "User: What is 2+3?\nAssistant:" and completions[1] == " 2+3=5, so 5."


def test_template_whose_turn_does_not_continue_its_generation_prompt_is_refused(tiny_policy):
    tok = load_tokenizer(str(tiny_policy[0]))
    tok.chat_template = R1_CHAT_TEMPLATE.replace("Assistant: {{ m['content'] }}", "Bot: {{ m['content'] }}")
    with pytest.raises(ValueError, match="does not continue its generation prompt"):
        chat_pairs(tok, CONVERSATIONS)


def test_logged_learning_rate_is_the_one_each_update_used(tiny_policy):
    """Warm-up over 4 updates, then cosine to 10% over the 4 updates of one epoch: update s (from 0) uses
    lr x min(1, (s+1)/4) x (0.1 + 0.9 x (1 + cos(pi s / 4)) / 2)."""
    model, tok = load_policy(str(tiny_policy[0]))
    tok.chat_template = R1_CHAT_TEMPLATE
    prompts, completions = chat_pairs(tok, CONVERSATIONS * 4)
    rows = train_sft(model, tok, prompts, completions, epochs=1, learning_rate=1e-3, batch_size=2, warmup_steps=4)
    expected = [2.5e-4, 1e-3 * 0.5 * (0.1 + 0.45 * (1 + math.cos(math.pi / 4))), 1e-3 * 0.75 * 0.55,
                1e-3 * (0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4)))]
    assert [r["learning_rate"] for r in rows] == pytest.approx(expected, rel=1e-9)
