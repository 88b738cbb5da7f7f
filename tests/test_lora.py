"""LoRA (PEFT) for GRPO and SFT: only the adapters train, the export is a plain Hugging Face folder with
them merged in, a killed GRPO run resumes from its adapter checkpoint, and a module name the model lacks
is refused naming the setting."""

from pathlib import Path

import pytest
import torch
from test_grpo_options import _params, _tasks, _trainer, marked_reward  # noqa: F401

from r1flow.config import ConfigError, validate_config
from r1flow.models import load_policy, save_policy
from r1flow.models.lora import add_lora, is_lora, merged_copy

pytest.importorskip("peft", reason="LoRA needs peft (pip install 'r1flow[lora]')")

SCHEMA = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _split(params):
    lora = {k: v for k, v in params.items() if "lora_" in k}
    return lora, {k: v for k, v in params.items() if "lora_" not in k}


def test_grpo_with_lora_trains_only_the_adapters(tiny_policy, tmp_path, marked_reward):
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "l", _tasks(8, lambda i: True), num_generations=4, lora=LORA, learning_rate=1e-2)
    assert is_lora(t.model)
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for g in t.opt.param_groups for p in g["params"]} == \
        {id(p) for p in t.model.parameters() if p.requires_grad}
    lora0, base0 = _split(_params(t.model))
    t.step()
    lora1, base1 = _split(_params(t.model))
    assert all(torch.equal(base0[k], base1[k]) for k in base0)  # the base is frozen
    # lora_B starts at zero (the adapted model starts as the base) and moves with the update
    b = [k for k in lora0 if "lora_B" in k]
    assert all(torch.count_nonzero(lora0[k]) == 0 for k in b)
    assert max(float(lora1[k].abs().max()) for k in b) > 1e-4


def test_export_is_a_plain_folder_with_the_adapters_merged(tiny_policy, tmp_path, marked_reward):
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "x", _tasks(8, lambda i: True), num_generations=4, lora=LORA, learning_rate=1e-2,
                 select_checkpoint="last")
    t.train(progress=False)
    out = tmp_path / "exported"
    t.export(out)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    plain, tok = load_policy(str(out))
    assert not is_lora(plain) and not any("lora" in k for k in plain.state_dict())
    ids = tok(["Compute 2+3:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = t.model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-5)
    start, _ = load_policy(str(path))
    with torch.no_grad():
        assert not torch.allclose(start(input_ids=ids).logits, got, atol=1e-4)  # it did learn something


def test_a_killed_lora_run_resumes_to_the_same_weights(tiny_policy, tmp_path, marked_reward):
    path, _ = tiny_policy
    train = _tasks(8, lambda i: True)
    straight = _trainer(path, tmp_path / "a", train, num_generations=4, lora=LORA, steps=3, save_every=1,
                        learning_rate=1e-2)
    m_straight = straight.train(progress=False)
    first = _trainer(path, tmp_path / "b", train, num_generations=4, lora=LORA, steps=3, save_every=1,
                     learning_rate=1e-2)
    first.train(progress=False, stop_after=2)
    # the checkpoint is the adapter alone, not a copy of the base
    ck = tmp_path / "b" / "checkpoint" / "model"
    assert (ck / "adapter_model.safetensors").exists() and not (ck / "model.safetensors").exists()
    resumed = _trainer(path, tmp_path / "b", train, num_generations=4, lora=LORA, steps=3, save_every=1,
                       learning_rate=1e-2)
    m_resumed = resumed.train(progress=False)
    a, b = _params(straight.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert m_straight["loss"].tolist() == m_resumed["loss"].tolist()


def test_a_module_the_model_lacks_is_refused_naming_the_setting(tiny_policy, tmp_path, marked_reward):
    path, _ = tiny_policy
    with pytest.raises(ConfigError, match=r"grpo\.lora\.target_modules: the model has no linear layer named \['c_attn'\]"):
        _trainer(path, tmp_path / "m", _tasks(8, lambda i: True), lora={**LORA, "target_modules": ["q_proj", "c_attn"]})
    policy, _ = load_policy(str(path))
    with pytest.raises(ConfigError, match=r"r1\.sft\.lora\.r must be 0"):
        add_lora(policy, {"r": -1}, "r1.sft.lora")
    assert add_lora(policy, {"r": 0}, "r1.sft.lora") is policy  # off
    with pytest.raises(ConfigError, match="grpo.lora with the vllm generation backend"):
        from r1flow.training.grpo import GRPOConfig, GRPOTrainer

        GRPOTrainer(policy, None, load_policy(str(path))[1], GRPOConfig(lora=LORA, beta=0.0), _tasks(4, lambda i: True),
                    None, tmp_path / "v", generation={"backend": "vllm"})


def test_sft_with_lora_trains_adapters_and_saves_merged(tiny_policy, tmp_path):
    from r1flow.training.sft import train_sft

    path, _ = tiny_policy
    policy, tok = load_policy(str(path))
    model = add_lora(policy, LORA, "r1.sft.lora")
    lora0, base0 = _split(_params(model))
    rows = train_sft(model, tok, ["Compute 2+3:"] * 8, [" 2+3=5. So the answer is 5."] * 8, epochs=3,
                     learning_rate=1e-2, batch_size=4, warmup_steps=0)
    assert rows[-1]["loss"] < rows[0]["loss"]
    lora1, base1 = _split(_params(model))
    assert all(torch.equal(base0[k], base1[k]) for k in base0)
    save_policy(model, tok, tmp_path / "sft", merged=True)
    plain, _ = load_policy(str(tmp_path / "sft"))
    ids = tok(["Compute 2+3: 2+3=5."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, merged_copy(model)(input_ids=ids).logits, atol=1e-5)
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_the_config_takes_lora_in_every_training_section():
    cfg = validate_config({"r1_zero": {"grpo": {"lora": {"r": 8}}}, "r1": {"sft": {"lora": {"r": 4, "alpha": 4}}}},
                          SCHEMA)
    assert cfg["r1_zero"]["grpo"]["lora"]["alpha"] == 32 and cfg["r1_zero"]["grpo"]["lora"]["r"] == 8
    assert cfg["r1"]["sft"]["lora"]["target_modules"][0] == "q_proj"
    defaults = validate_config({}, SCHEMA)
    assert defaults["r1_zero"]["grpo"]["lora"] is None and defaults["r1"]["final_sft"]["lora"] is None
    with pytest.raises(ConfigError, match=r"r1_zero\.grpo\.lora"):
        validate_config({"r1_zero": {"grpo": {"lora": {"rank": 8}}}}, SCHEMA)
