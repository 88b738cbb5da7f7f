"""The GPU memory plan (r1flow.training.memory_plan), by hand, against the cluster config, and GRPO's
micro-batches trimmed to their own longest completion (r1flow/training/grpo.py `_step`)."""

import copy
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from r1flow import rewards as R
from r1flow.config import ConfigError, stage_settings, validate_config
from r1flow.training import memory_plan as M
from r1flow.training.memory_plan import GiB, model_shape, plan_job, require_fits

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
QWEN7B = M.KNOWN_SHAPES["Qwen/Qwen2.5-7B"]
P7 = 7_615_616_512  # Qwen2.5-7B's parameters, counted below by hand


# -- shapes ---------------------------------------------------------------------------------------------

def test_n_params_by_hand():
    h, kv, inter, vocab = 3584, 4 * 128, 18944, 152064
    attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q (+bias), k and v (+biases), o
    layer = attn + 3 * h * inter + 2 * h  # gated MLP, two RMSNorms
    assert QWEN7B.n_params == 28 * layer + h + 2 * vocab * h == P7  # + final norm, embeddings and lm_head
    assert round(P7 / 1e9, 2) == 7.62  # the published 7.62B (model card: 7.61B, 6.53B without embeddings)
    assert round((P7 - 2 * vocab * h) / 1e9, 2) == 6.53
    # Qwen2.5-0.5B: tied embeddings, the published 0.49B
    assert M.KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"].n_params == 494_032_768
    # Llama-3.1-8B: no attention biases, 8.03B
    assert round(M.KNOWN_SHAPES["meta-llama/Llama-3.1-8B"].n_params / 1e9, 2) == 8.03
    instruct = M.KNOWN_SHAPES["Qwen/Qwen2.5-7B-Instruct"]
    assert instruct.n_params == P7 and instruct.max_position_embeddings == 32768


def test_model_shape_reads_a_local_config_json(tmp_path):
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
           "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
           "vocab_size": 152064, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "max_position_embeddings": 131072}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(tmp_path)
    assert shape == QWEN7B and shape.head_dim == 128 and shape.qkv_bias
    llama = {**cfg, "model_type": "llama", "head_dim": 64, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    s = model_shape(str(tmp_path))
    assert s.head_dim == 64 and not s.qkv_bias and s.tie_word_embeddings


def test_unknown_models_have_no_shape(tmp_path):
    assert model_shape("tiny") is None
    assert model_shape("nobody-here/no-such-model-r1flow") is None  # not cached, not known: no network asked
    assert model_shape(tmp_path / "missing") is None
    assert model_shape(None) is None
    assert require_fits("x", "grpo", {}, None, 80, "r1_zero.grpo") is None  # nothing to plan


def test_the_module_loads_without_torch():
    code = "import sys, r1flow.training.memory_plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_constants_agree_with_the_training_code():
    from r1flow.generation import make_generator
    from r1flow.models.chunked import CHUNK_ELEMENTS
    from r1flow.training.grpo import GRPOConfig
    from r1flow.training.sft import train_sft

    assert M.LOGITS_CHUNK_ELEMENTS == CHUNK_ELEMENTS
    g = GRPOConfig()
    assert {k: getattr(g, k) for k in M.GRPO_DEFAULTS} == M.GRPO_DEFAULTS
    sig = inspect.signature(train_sft).parameters
    assert {k: sig[k].default for k in M.SFT_DEFAULTS} == M.SFT_DEFAULTS
    assert inspect.signature(make_generator).parameters["batch_size"].default == M.GENERATOR_BATCH_SIZE


# -- model state and activations by hand ----------------------------------------------------------------

def test_zero2_bf16_eight_ranks_by_hand():
    ds = {"enabled": True, "zero_stage": 2, "nproc_per_node": 8, "bf16": True}
    s = M.model_state(QWEN7B, "bfloat16", ds)
    assert s["weights"] == 2 * P7  # ZeRO-2 keeps every 16-bit weight on every rank
    assert s["master weights (fp32)"] == 4 * P7 // 8
    assert s["optimizer state (AdamW m, v)"] == 8 * P7 // 8
    # the bf16 gradient partition and its fp32 accumulation (grad_accum_dtype fp32), 1/8 each, plus the
    # reduce bucket (5e8 elements) and the embedding's gradient (152064 x 3584), both bf16
    assert s["gradients"] == 6 * P7 // 8 + 2 * (500_000_000 + 152064 * 3584)
    # = the ZeRO paper's 2 + (2 + 12) / N bytes per parameter, plus our fp32 accumulation 4 / N
    assert s["weights"] + s["master weights (fp32)"] + s["optimizer state (AdamW m, v)"] + 6 * P7 // 8 == \
        pytest.approx((2 + (2 + 12 + 4) / 8) * P7, abs=8)
    # per rank: 2 P + 18 P / 8 = 4.25 bytes per parameter (32.4 GB) and the two bf16 buffers (2.1 GB)
    assert sum(s.values()) == 2 * P7 + 18 * P7 // 8 + 2 * (500_000_000 + 152064 * 3584) == 34_456_364_928
    assert round(sum(s.values()) / GiB, 2) == 32.09
    # one process, bf16 weights: fp32 master weights and AdamW, bf16 gradients folded into fp32 ones
    local = M.model_state(QWEN7B, "bfloat16", None)
    assert sum(local.values()) == (2 + 4 + 8 + 2 + 4) * P7
    # offloaded optimizer: master weights, AdamW state and the gradient partitions leave the GPU
    off = M.model_state(QWEN7B, "bfloat16", {**ds, "offload_optimizer": True})
    assert off["master weights (fp32)"] == off["optimizer state (AdamW m, v)"] == 0
    assert off["gradients"] == 2 * (500_000_000 + 152064 * 3584)
    # stage 1 shards the optimizer state only
    one = M.model_state(QWEN7B, "bfloat16", {**ds, "zero_stage": 1})
    assert one["gradients"] == (2 + 4) * P7 and one["optimizer state (AdamW m, v)"] == 8 * P7 // 8


def test_activations_of_one_row_of_1024_tokens_with_checkpointing_by_hand():
    h, kv, inter, L = 3584, 512, 18944, 28
    # one fast_llama layer's saved tensors per token (bf16): two fp32 RMSNorm inputs (8 h), then in bf16
    # 6 h (norm outputs, q, the query layout, SDPA's output and o_proj's input), 4 kv (K, V and their
    # gathered copies) and 3 I (gate, up, their product)
    layer = 8 * h + 2 * (6 * h + 4 * kv + 3 * inter)
    assert layer == 189_440 == M.layer_activation_bytes_fast(QWEN7B, 2)
    # checkpointed: every layer's input (2 h each), one layer recomputed, its incoming and outgoing
    # gradients (2 x 2 h) and SDPA's dq, dk, dv (2 (h + 2 kv))
    per_token = L * 2 * h + layer + 2 * 2 * h + 2 * (h + 2 * kv)
    assert per_token == 413_696
    assert M.activation_bytes(QWEN7B, 1, 1024, 2, checkpointing=True) == 1024 * per_token == 423_624_704
    # without checkpointing every layer keeps its tensors: 28 layers x 189,440 bytes per token
    assert M.activation_bytes(QWEN7B, 1, 1024, 2, checkpointing=False) == 1024 * 28 * layer
    # transformers' layer (SFT, reward models): K/V repeated per head, the MLP's four tensors
    assert M.layer_activation_bytes_hf(QWEN7B, 2) == 8 * h + 2 * (7 * h + 4 * inter) == 230_400


# -- GRPO plans -------------------------------------------------------------------------------------------

# R1-Zero's RL settings for Qwen2.5-7B on one node of 8 x 80 GB (the cluster config's, written out here so
# that this case does not move when the config does)
GRPO_7B = {
    "grpo": {"prompts_per_step": 32, "num_generations": 16, "max_completion_length": 32768, "beta": 0.001,
             "num_iterations": 1, "micro_batch_size": 16, "gradient_checkpointing": True,
             "generation_batch_size": 512},
    "generation": {"backend": "vllm", "vllm": {"colocate": True, "sleep_mode": True, "sleep_level": 2,
                                               "tensor_parallel_size": 1, "gpu_memory_utilization": 0.35,
                                               "max_model_len": 33792}},
    "deepspeed": {"enabled": True, "zero_stage": 2, "offload_optimizer": False, "bf16": True, "nproc_per_node": 8},
    "dtype": "bfloat16",
}


def _mb(settings, value):
    return {**settings, "grpo": {**settings["grpo"], "micro_batch_size": value}}


def test_micro_batch_16_at_32k_tokens_for_7b_is_refused_with_the_largest_that_fits():
    with pytest.raises(ConfigError) as e:
        require_fits("r1_zero", "grpo", GRPO_7B, QWEN7B, 80, "r1_zero.grpo")
    msg = str(e.value)
    assert msg.startswith("r1_zero: planned peak ") and "on a 80 GiB GPU (training: weights 14.2" in msg
    assert "reference model 14.2" in msg and "activations 208." in msg
    assert msg.endswith("lower config key 'r1_zero.grpo.micro_batch_size' (largest that fits: 2)")
    plan = require_fits("r1_zero", "grpo", _mb(GRPO_7B, 2), QWEN7B, 80, "r1_zero.grpo")
    assert plan.peak_bytes <= 80 * GiB and plan.peak_phase == "training"
    assert plan_job("grpo", _mb(GRPO_7B, 3), QWEN7B, 80).peak_bytes > 80 * GiB
    # a micro-batch of 1 also fits, with room; the colocated vLLM engine's share is then the largest phase
    one = plan_job("grpo", _mb(GRPO_7B, 1), QWEN7B, 80)
    assert one.peak_phase == "sampling" and one.items["vLLM (gpu_memory_utilization)"] == int(0.35 * 80 * GiB)
    text = one.describe()
    assert "sampling:" in text and "training:" in text and "update:" in text and "<- peak" in text
    # the phases: vLLM asleep (level 2) holds nothing while the rank trains; the reference model is resident
    assert "vLLM (awake, no sleep_mode)" not in one.phases["training"]
    assert one.phases["training"]["reference model"] == 2 * P7


def test_the_plan_follows_the_settings():
    base = _mb(GRPO_7B, 1)
    peak = plan_job("grpo", base, QWEN7B, 80).phases["training"]
    # no checkpointing: every layer's activations of one 33,792-token row (~170 GiB)
    no_ckpt = plan_job("grpo", {**base, "grpo": {**base["grpo"], "gradient_checkpointing": False}}, QWEN7B, 80)
    assert no_ckpt.phases["training"]["activations"] > 10 * peak["activations"]
    # beta 0: no reference model
    assert "reference model" not in plan_job("grpo", {**base, "grpo": {**base["grpo"], "beta": 0.0}}, QWEN7B,
                                             80).phases["training"]
    # without sleep mode vLLM keeps its share while the rank trains, and nothing fits then
    awake = {**base, "generation": {"backend": "vllm", "vllm": {**base["generation"]["vllm"], "sleep_mode": False}}}
    assert plan_job("grpo", awake, QWEN7B, 80).phases["training"]["vLLM (awake, no sleep_mode)"] > 0
    with pytest.raises(ConfigError, match=r"generation\.vllm\.gpu_memory_utilization.*sleep_mode: true"):
        require_fits("r1_zero", "grpo", awake, QWEN7B, 80, "r1_zero.grpo")
    # the share itself too large beside the training state: the largest share that fits
    greedy = {**base, "generation": {"backend": "vllm", "vllm": {**base["generation"]["vllm"],
                                                                 "gpu_memory_utilization": 0.6}}}
    with pytest.raises(ConfigError) as e:
        require_fits("r1_zero", "grpo", greedy, QWEN7B, 80, "r1_zero.grpo")
    share = float(re.search(r"'generation\.vllm\.gpu_memory_utilization' \(largest that fits: ([0-9.]+)\)",
                            str(e.value)).group(1))
    assert 0.35 <= share < 0.6
    fixed = {**greedy, "generation": {"backend": "vllm", "vllm": {**greedy["generation"]["vllm"],
                                                                  "gpu_memory_utilization": share}}}
    assert require_fits("r1_zero", "grpo", fixed, QWEN7B, 80, "r1_zero.grpo") is not None
    # two 7B reward models on the rank (section 2.3.4) beside policy, reference and optimizer: not even
    # one row fits, and the message says what stays on the GPU
    rl_all = {**base, "grpo": {**base["grpo"], "rewards": {"reasoning": {"accuracy": 1.0},
                                                           "general": {"helpfulness": 1.0, "harmlessness": 1.0}}}}
    with pytest.raises(ConfigError, match=r"even one row of one token does not fit: what stays on the GPU "
                                          r"\(weights, reference model, reward model"):
        require_fits("r1", "grpo", rl_all, QWEN7B, 80, "r1.rl_all.grpo")


def test_transformers_backend_samples_in_process():
    s = {"grpo": {"prompts_per_step": 16, "num_generations": 8, "max_completion_length": 4096,
                  "generation_batch_size": 128, "micro_batch_size": 4, "gradient_checkpointing": True},
         "dtype": "bfloat16"}
    shape = M.KNOWN_SHAPES["Qwen/Qwen2.5-1.5B"]
    plan = plan_job("grpo", s, shape, 80)
    kv = plan.phases["sampling"]["KV cache (sampling)"]
    # 128 rows (16 prompts of 8) x 4096 tokens x K and V of 28 layers x 2 KV heads x 128 x 2 bytes, + prompts
    assert kv == 128 * 4096 * 2 * 28 * 2 * 128 * 2 + 16 * 1024 * 2 * 28 * 2 * 128 * 2
    assert "vLLM (gpu_memory_utilization)" not in plan.phases["sampling"]
    with pytest.raises(ConfigError, match=r"'r1_zero\.grpo\.generation_batch_size' \(largest that fits: \d+\)"):
        require_fits("r1_zero", "grpo", {**s, "grpo": {**s["grpo"], "generation_batch_size": 1 << 14,
                                                       "prompts_per_step": 2048}}, shape, 80, "r1_zero.grpo")


# -- vLLM's KV cache ------------------------------------------------------------------------------------

def test_vllm_share_too_small_for_max_model_len_is_refused():
    ev = {"evaluation": {"batch_size": 512, "max_new_tokens": 32768}, "spec": {"n": 4},
          "generation": {"backend": "vllm", "vllm": {"gpu_memory_utilization": 0.2, "max_model_len": 33792}},
          "dtype": "bfloat16"}
    k = M.vllm_kv_check(QWEN7B, ev["generation"]["vllm"], 80 * GiB)
    assert k["needed"] == 33792 * 2 * 28 * 4 * 128 * 2  # K and V, 28 layers, 4 KV heads of 128, bf16
    assert not k["fits"] and k["weights"] == 2 * P7
    with pytest.raises(ConfigError) as e:
        require_fits("evaluate", "evaluation", ev, QWEN7B, 80, "evaluation")
    msg = str(e.value)
    smallest = float(re.search(r"raise config key 'generation\.vllm\.gpu_memory_utilization' "
                               r"\(smallest that works: ([0-9.]+)\)", msg).group(1))
    assert "33792 tokens (generation.vllm.max_model_len)" in msg
    ok = {**ev, "generation": {"backend": "vllm", "vllm": {**ev["generation"]["vllm"],
                                                           "gpu_memory_utilization": smallest}}}
    assert require_fits("evaluate", "evaluation", ok, QWEN7B, 80, "evaluation").kv_check["fits"]
    below = {**ev, "generation": {"backend": "vllm", "vllm": {**ev["generation"]["vllm"],
                                                              "gpu_memory_utilization": smallest - 0.01}}}
    with pytest.raises(ConfigError):
        require_fits("evaluate", "evaluation", below, QWEN7B, 80, "evaluation")


def test_transformers_evaluation_batch_is_searched():
    ev = {"evaluation": {"batch_size": 4096, "max_new_tokens": 32768}, "spec": {"n": 16, "max_new_tokens": None},
          "dtype": "bfloat16"}
    with pytest.raises(ConfigError) as e:
        require_fits("evaluate", "evaluation", ev, QWEN7B, 80, "evaluation")
    largest = int(re.search(r"'evaluation\.batch_size' \(largest that fits: (\d+)\)", str(e.value)).group(1))
    fits = {**ev, "evaluation": {**ev["evaluation"], "batch_size": largest}}
    assert require_fits("evaluate", "evaluation", fits, QWEN7B, 80, "evaluation").peak_bytes <= 80 * GiB


def test_sft_and_reward_model_plans():
    ds = {"enabled": True, "zero_stage": 2, "nproc_per_node": 8, "bf16": True}
    sft = {"settings": {"batch_size": 32, "micro_batch_size": 1, "max_length": 33792, "gradient_checkpointing": True},
           "deepspeed": ds, "dtype": "bfloat16"}
    assert require_fits("cold_start_sft", "sft", sft, QWEN7B, 80, "r1.sft").peak_bytes <= 80 * GiB
    # one process (no DeepSpeed): 20 bytes per parameter of state alone, more than the GPU
    with pytest.raises(ConfigError, match="even one row of one token does not fit"):
        require_fits("cold_start_sft", "sft", {**sft, "deepspeed": None}, QWEN7B, 80, "r1.sft")
    with pytest.raises(ConfigError, match=r"lower config key 'r1\.sft\.micro_batch_size' \(largest that fits: \d+\)"):
        require_fits("cold_start_sft", "sft", {**sft, "settings": {**sft["settings"], "micro_batch_size": 4}},
                     QWEN7B, 80, "r1.sft")
    rm = {"settings": {"batch_size": 64, "max_length": 1024}, "deepspeed": ds, "dtype": "bfloat16"}
    plan = plan_job("reward_model", rm, QWEN7B, 80)
    # a scalar head instead of lm_head: no logits, and the LM head's parameters are not trained
    assert plan.phases["training"]["weights"] == 2 * (P7 - 152064 * 3584 + 3584)
    # each rank scores its share, 64 / 8 pairs = 16 texts of 1,024 tokens, without checkpointing
    assert plan.phases["training"]["activations"] == 16 * 1024 * 28 * 230_400
    with pytest.raises(ConfigError, match=r"'r1\.reward_models\.train\.batch_size' \(largest that fits: \d+\)"):
        require_fits("reward_model", "reward_model", rm, QWEN7B, 80, "r1.reward_models.train")


# -- the shipped cluster config ---------------------------------------------------------------------------

def _cluster():
    cfg = validate_config(yaml.safe_load((ROOT / "config" / "cluster" / "r1_zero_qwen2.5.yaml").read_text()), SCHEMA)
    settings = {"grpo": cfg["r1_zero"]["grpo"], **stage_settings(cfg, "r1_zero", SCHEMA),
                "dtype": cfg["base_model"]["dtype"]}
    return cfg, settings


def test_the_r1_zero_cluster_job_passes_and_16_rows_does_not():
    cfg, settings = _cluster()
    shape = model_shape(cfg["base_model"]["path"])
    assert shape == QWEN7B
    plan = require_fits("r1_zero", "grpo", settings, shape, 80, "r1_zero.grpo")  # as shipped: fits
    assert plan.peak_bytes <= 80 * GiB
    with pytest.raises(ConfigError) as e:
        require_fits("r1_zero", "grpo", _mb(settings, 16), shape, 80, "r1_zero.grpo")
    largest = int(re.search(r"lower config key 'r1_zero\.grpo\.micro_batch_size' \(largest that fits: (\d+)\)$",
                            str(e.value)).group(1))
    assert largest >= max(1, settings["grpo"]["micro_batch_size"])
    require_fits("r1_zero", "grpo", _mb(settings, largest), shape, 80, "r1_zero.grpo")
    with pytest.raises(ConfigError):
        require_fits("r1_zero", "grpo", _mb(settings, largest + 1), shape, 80, "r1_zero.grpo")


# -- GRPO micro-batches trimmed to their own longest completion --------------------------------------------

@R.register("test_memory_plan_length")
@R.per_sample
def _length_reward(completion: str, gold: str) -> R.Reward:
    """A dense reward (the text's length), so that every group has advantages and the step a gradient."""
    return R.Reward(len(completion) / 50.0, "test")


LENGTHS = [2, 5, 3, 9, 1, 4, 6, 6]  # two groups of G = 4; micro-batches of 3 rows: [0:3], [3:6], [6:8]
WIDTH = 12  # the batch's completion width (wider than any completion, as a padded sampler may give)


def _hand_built_batch(tok):
    from r1flow.generation import Completions

    g = torch.Generator().manual_seed(0)
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in ("Compute 1+2", "Compute 3+4+5+6")]
    P, pad = max(map(len, enc)), tok.pad_token_id
    prompt_ids = torch.tensor([[pad] * (P - len(e)) + e for e in enc for _ in range(4)])
    prompt_mask = torch.tensor([[0] * (P - len(e)) + [1] * len(e) for e in enc for _ in range(4)])
    lengths = torch.tensor(LENGTHS)
    cmask = (torch.arange(WIDTH)[None, :] < lengths[:, None]).long()
    ids = torch.randint(10, len(tok), (len(LENGTHS), WIDTH), generator=g).masked_fill(cmask == 0, pad)
    texts = tok.batch_decode(ids.masked_fill(cmask == 0, pad), skip_special_tokens=True)
    return Completions(prompt_ids, prompt_mask, ids, cmask, torch.zeros(len(LENGTHS), dtype=torch.bool), texts)


@pytest.mark.parametrize("loss_type,fast", [("grpo", True), ("dapo", False)])
def test_trimmed_micro_batches_give_the_full_width_loss_and_gradients(tiny_policy, tmp_path, monkeypatch,
                                                                      loss_type, fast):
    from r1flow.models import load_policy
    from r1flow.models.logprobs import completion_logprobs
    from r1flow.training import grpo as grpo_module
    from r1flow.training.grpo import GRPOConfig, GRPOTrainer
    from r1flow.training.grpo_loss import Normalizer, group_advantages, grpo_loss, loss_mask

    path, _ = tiny_policy
    policy, tok = load_policy(str(path))
    ref = load_policy(str(path))[0]
    cfg = GRPOConfig(prompts_per_step=2, num_generations=4, max_completion_length=WIDTH, steps=1, eval_every=0,
                     beta=0.04, micro_batch_size=3, warmup_steps=0, learning_rate=1e-3, loss_type=loss_type,
                     fast_path=fast, rewards={"test_memory_plan_length": 1.0})
    train = pd.DataFrame({"question": ["Compute 1+2", "Compute 3+4+5+6"], "answer": ["3", "18"]})
    trainer = GRPOTrainer(policy, ref, tok, cfg, train, None, tmp_path / "state")
    out = _hand_built_batch(tok)
    trainer.generator.generate = lambda prompts, params, seeds=None: out
    start = copy.deepcopy(trainer.model)

    widths = []  # the completion width of every log-prob forward the step runs

    def recording(model, prompt_ids, prompt_mask, completion_ids, *rest, **kw):
        widths.append((model is trainer.model, completion_ids.shape[1]))
        return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, *rest, **kw)

    monkeypatch.setattr(grpo_module, "completion_logprobs", recording)
    grads = {}
    step = trainer.engine.step

    def step_and_keep_gradients():
        grads.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        step()

    trainer.engine.step = step_and_keep_gradients
    row = trainer.step()

    # each micro-batch at its own longest completion: rows [0:3] -> 5, [3:6] -> 9, [6:8] -> 6
    assert widths == [(False, 5), (False, 9), (False, 6), (True, 5), (True, 9), (True, 6)]  # reference, policy

    # the untrimmed computation: the whole batch in one forward at the batch's full width
    total, _ = trainer._score(train, out.texts, 4)
    adv = group_advantages(torch.tensor(total), 4, cfg.scale_rewards)
    assert adv.abs().sum() > 0
    mask = loss_mask(out.completion_mask, out.truncated, False)
    norm = Normalizer(float((mask.sum(1) > 0).sum()), float(mask.sum()), float(mask.shape[0]), WIDTH)
    args = (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask, 4, cfg.temperature)
    with torch.no_grad():
        ref_lp = completion_logprobs(ref, *args, False, fast)[0]
    start.train()
    lp = completion_logprobs(start, *args, False, fast)[0]
    assert lp.shape[1] == WIDTH
    loss, _ = grpo_loss(lp, lp.detach(), ref_lp, adv, mask, epsilon=cfg.epsilon, beta=cfg.beta, loss_type=loss_type,
                        normalizer=norm)
    loss.backward()
    assert row["loss"] == pytest.approx(loss.item(), abs=1e-6)
    expected = {n: p.grad for n, p in start.named_parameters() if p.grad is not None}
    assert expected.keys() == grads.keys()
    assert max((grads[n] - expected[n]).abs().max().item() for n in expected) < 1e-6
    assert max(g.abs().max().item() for g in expected.values()) > 1e-4  # a real gradient, not zeros


def test_sft_micro_batches_are_trimmed_to_their_own_longest_row(tiny_policy, monkeypatch):
    from r1flow.models import load_policy
    from r1flow.training import sft as sft_module
    from r1flow.training.engine import LocalEngine
    from r1flow.training.sft import collate, sft_loss, sft_step

    path, _ = tiny_policy
    model, tok = load_policy(str(path))
    prompts = ["Compute 1+2", "Compute 3+4+5+6+7+8", "Compute 2+2", "Compute 9+9"]
    completions = [" <answer> 3 </answer>",
                   " <think> 3+4=7 7+5=12 12+6=18 18+7=25 25+8=33 </think> <answer> 33 </answer>",
                   " <answer> 4 </answer>", " <think> 9+9=18 </think> <answer> 18 </answer>"]
    batch = collate(tok, prompts, completions)
    lengths = batch.attention_mask.sum(1).tolist()
    micro = [batch[0:2], batch[2:4]]
    assert [mb.trimmed().input_ids.shape[1] for mb in micro] == [max(lengths[:2]), max(lengths[2:])]
    assert micro[1].trimmed().input_ids.shape[1] < batch.input_ids.shape[1]  # the long row pads only its own
    assert batch.trimmed() is batch  # already at its longest

    total = batch.num_tokens
    model.train()
    for mb in micro:  # the untrimmed computation
        sft_loss(model, mb, total).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    widths = []
    real = sft_module.sft_loss

    def recording(m, b, num_tokens=None):
        widths.append(b.input_ids.shape[1])
        return real(m, b, num_tokens)

    monkeypatch.setattr(sft_module, "sft_loss", recording)
    engine = LocalEngine(model, torch.optim.SGD(model.parameters(), lr=0.0), 1e9)
    grads = {}
    engine.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    loss = sft_step(engine, micro)
    assert widths == [max(lengths[:2]), max(lengths[2:])]
    with torch.no_grad():
        expected = sum(real(model, mb, total).item() for mb in micro)
    assert loss == pytest.approx(expected, abs=1e-6)
    assert full.keys() == grads.keys()
    assert max((grads[n] - full[n]).abs().max().item() for n in full) < 1e-6
