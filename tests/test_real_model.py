"""A real pretrained model by config alone: loading (folder, hub id, GGUF), saving, a real tokenizer and
its chat template in every stage, real worked solutions as the annotated cold start (section 2.3.1), and
GRPO that says when nothing can be learned (section 2.2). The SmolLM2 tests skip without its GGUF."""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch

from r1flow import rewards as R
from r1flow.config import ConfigError, check_model_source
from r1flow.data import cold_start as C
from r1flow.data.formats import READABLE_MARKER, split_readable
from r1flow.data.preferences import make_preferences
from r1flow.data.tasks import generate_tasks, load_prompts, split_gsm8k

ROOT = Path(__file__).resolve().parent.parent
GSM8K = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                     "How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72"}


# -- real worked solutions as the annotated cold start (section 2.3.1) ------------------------------------
def test_gsm8k_rationale_becomes_readable_cold_start_data():
    """Section 2.3.1: annotators turn solutions into |special_token| reasoning |special_token| summary;
    GSM8K's rationale is the reasoning (calculator annotations dropped), its final answer the summary."""
    solution, answer = split_gsm8k(GSM8K["answer"])
    assert answer == "72" and "<<" not in C.annotate(GSM8K["question"], solution, answer)
    text = C.annotate(GSM8K["question"], solution, answer)
    reasoning, summary = split_readable(text)
    assert "48/2 = 24 clips in May" in reasoning and summary.strip() == "The answer is \\boxed{72}."
    from r1flow.training.sft_data import readability

    assert readability([text], [answer]) == [""]  # correct and readable: the cold start keeps it


def test_math_solution_and_synthetic_chains_are_annotated():
    """MATH's solution is the reasoning, its answer the summary; synthetic chains still annotate (2.3.1)."""
    text = C.annotate("Compute 1/2+1/4.", "We have $\\frac12+\\frac14=\\frac34$.", "\\frac{3}{4}")
    assert split_readable(text)[1].strip() == "The answer is \\boxed{\\frac{3}{4}}."
    assert C.annotate("Compute (7+5)*2", None, "24").startswith(READABLE_MARKER + " 7+5=12 12*2=24 ")
    assert C.annotate("What is the capital of Peru?", None, "Lima") is None


def test_gsm8k_files_keep_the_solution_and_the_final_answer(tmp_path):
    """Real prompt sets carry worked solutions: GSM8K's "... #### N" splits into solution and answer;
    MATH-like files name their solution field."""
    t = load_prompts(str(ROOT / "tests" / "data" / "gsm8k_mini.jsonl"))
    assert t["answer"].tolist()[:2] == ["7", "1200"] and t["solution"].iloc[0] == "3 + 4 = 7"
    p = tmp_path / "math.jsonl"
    p.write_text(json.dumps({"problem": "1+1?", "solution": "1+1=2, $\\boxed{2}$", "answer": "2"}) + "\n")
    m = load_prompts(str(p), question_field="problem", solution_field="solution")
    assert m["solution"].iloc[0].startswith("1+1=2") and m["answer"].iloc[0] == "2"


def test_self_cognition_names_the_configured_model():
    """Section 2.3.3's self-cognition data names the model trained, not the embedded one."""
    df = make_preferences(40, 0, seed=0, assistant_name="r1flow-smollm2")
    texts = " ".join(m["content"] for msgs in df["chosen"] for m in msgs)
    assert "r1flow-tiny" not in texts and ("r1flow-smollm2" in texts or "I am" not in texts)


# -- model sources fail before any job starts --------------------------------------------------------------
def test_unreachable_hub_id_names_the_setting(monkeypatch):
    """Offline, a hub id not in the cache stops the workflow at parse time, naming the config key."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'base_model.path'.*nobody/no-such-model"):
        check_model_source("base_model.path", "nobody/no-such-model")


def test_missing_gguf_or_chat_template_names_the_setting(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="'base_model.gguf_file'.*x.gguf"):
        check_model_source("base_model.path", str(tmp_path / "m"), "x.gguf")
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "tokenizer_config.json").write_text("{}")
    check_model_source("evaluation.external_models.m.path", str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="'evaluation.external_models.m.path'.*no chat template"):
        check_model_source("evaluation.external_models.m.path", str(tmp_path / "m"), needs_chat_template=True)


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path, monkeypatch):
    import r1flow.config as cfg

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.gguf").write_bytes(b"")
    monkeypatch.setattr(cfg, "gguf_metadata", lambda path, key: "rwkv7" if key == "general.architecture" else None)
    monkeypatch.setattr(cfg, "gguf_supported_architectures", lambda: {"llama", "qwen2"})
    with pytest.raises(ConfigError, match="'student.gguf_file'.*'rwkv7'.*cannot load"):
        check_model_source("student.path", str(tmp_path / "m"), "x.gguf")


# -- GRPO says so when nothing can be learned (section 2.2, eq. 3) ------------------------------------------
def test_grpo_without_signal_warns_and_stops(tiny_policy, tmp_path, caplog):
    """A constant reward gives every group one value, so every advantage of eq. 3 is 0: the log says
    so with the mean reward and format rate, and stop_without_signal_after ends the run."""
    from r1flow.models import load_policy
    from r1flow.training.grpo import GRPOConfig, GRPOTrainer, NoLearningSignal

    name = "test_constant"
    if name not in R.REGISTRY:
        R.register(name)(R.per_sample(lambda c, a: R.Reward(0.5, "constant")))
    splits = generate_tasks(5, {"chain": {"difficulties": [2]}}, {"train": 16})
    policy, tok = load_policy(str(tiny_policy[0]))
    cfg = GRPOConfig.from_dict({"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 8,
                                "steps": 10, "eval_every": 0, "save_every": 10, "beta": 0.0,
                                "rewards": {name: 1.0}, "stop_without_signal_after": 3})
    t = GRPOTrainer(policy, None, tok, cfg, splits["train"], None, tmp_path / "g")
    with caplog.at_level(logging.WARNING), pytest.raises(NoLearningSignal, match="no learning signal for 3 step"):
        t.train(progress=False)
    assert t.step_no == 3
    assert all(h["groups_with_signal"] == 0.0 for h in t.history)
    assert any("no learning signal" in r.message and "mean reward 0.500" in r.message for r in caplog.records)


# -- every stage on SmolLM2's real tokenizer and weights ---------------------------------------------------
def test_every_stage_runs_on_a_real_model(smollm2_gguf, tmp_path):
    """One or two steps of each stage on SmolLM2-135M-Instruct from its GGUF file: save as a plain folder,
    cold-start SFT on annotated GSM8K data (sec. 2.3.1) with the marker as one new token, a GRPO step in the
    chat template (2.3.2), a reward-model step in the chat template (2.3.4), sampling for rejection
    sampling (2.3.3)."""
    from r1flow.data.prompts import chat_prompt
    from r1flow.models import add_tokens, load_policy, save_policy
    from r1flow.models.reward_model import render_for_rm
    from r1flow.training import sft_data as S
    from r1flow.training.grpo import GRPOConfig, GRPOTrainer
    from r1flow.training.reward_model import train_reward_model
    from r1flow.training.sft import chat_pairs, train_sft

    folder, gguf = smollm2_gguf
    model, tok = load_policy(folder, "float32", gguf_file=gguf)
    assert getattr(model.config, "quantization_config", None) is None  # a plain model now
    torch.manual_seed(0)

    # cold-start SFT on annotated GSM8K data, the marker one new token at the mean embedding
    old = model.get_input_embeddings().weight.shape[0]
    assert add_tokens(model, tok, [READABLE_MARKER]) == 1
    emb = model.get_input_embeddings().weight
    assert len(tok(READABLE_MARKER, add_special_tokens=False)["input_ids"]) == 1
    assert torch.allclose(emb[old], emb[:old].mean(0), atol=1e-6)
    solution, answer = split_gsm8k(GSM8K["answer"])
    rows = C.sft_rows(["p0"], [GSM8K["question"]], [C.annotate(GSM8K["question"], solution, answer)], "annotated")
    prompts, completions = chat_pairs(tok, rows["messages"])
    assert "<|im_start|>assistant" in prompts[0] and completions[0].startswith(READABLE_MARKER)
    m = train_sft(model, tok, prompts * 2, completions * 2, epochs=1, learning_rate=1e-5, batch_size=2,
                  micro_batch_size=0, max_length=256, warmup_steps=0, seed=0)
    assert m and all(r["loss"] == r["loss"] for r in m)
    out = tmp_path / "cold_start"
    save_policy(model, tok, out)  # a GGUF-loaded model saves as a plain Hugging Face folder
    assert (out / "model.safetensors").exists() and "quantization_config" not in json.loads((out / "config.json").read_text())

    # a GRPO step in the model's chat template
    train = pd.DataFrame({"prompt_id": ["a", "b"], "task": "math", "difficulty": 0,
                          "question": ["What is 2+3?", "What is 4*5?"], "answer": ["5", "20"]})
    cfg = GRPOConfig.from_dict({"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 32,
                                "steps": 1, "eval_every": 0, "save_every": 1, "beta": 0.0, "template": "chat",
                                "rewards": {"accuracy": 1.0, "format_readable": 0.25}, "warmup_steps": 0})
    t = GRPOTrainer(model, None, tok, cfg, train, None, tmp_path / "grpo")
    assert t._prompt("q").startswith("<|im_start|>system")
    metrics = t.train(progress=False)
    assert len(metrics) == 1 and metrics["loss"].notna().all()

    # a reward-model step from the saved folder, reading the chat template
    pairs = make_preferences(2, 2, seed=0, assistant_name="r1flow-smollm2")
    rm, rm_tok, rm_metrics = train_reward_model(out, pairs, "helpfulness", None, steps=1, batch_size=2, max_length=128)
    assert render_for_rm("q", "a", rm_tok).startswith("<|im_start|>") and len(rm_metrics) == 1
    del rm

    # sampling for rejection sampling, in the chat template, then the readability filter
    s = {"samples_per_prompt": 2, "temperature": 0.7, "max_new_tokens": 16, "seed": 0}
    texts, cut = S.sample_completions(str(out), lambda tk: [chat_prompt(tk, q) for q in train["question"]], s, None)
    assert len(texts) == 4 and len(cut) == 4 and all(isinstance(c, bool) for c in cut)
    assert len(S.readability(texts, ["5", "5", "20", "20"])) == 4
