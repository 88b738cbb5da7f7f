"""Every tensor a stage makes is made on its model's device (the config's `device`), never on torch's default.

No GPU here, so the model stays on the CPU and torch's *default* device is made another one for the
duration of the step: `with torch.device("meta")`. A tensor the code creates without `device=` then lands
on meta, and the first operation mixing it with the model's CPU tensors raises (as a CPU tensor would
meet a CUDA model on a GPU node); `.item()` / `.tolist()` of a meta tensor raise too. A step that runs
through proves that what it made, it made on the model's device. Loading is done outside the trick (a
model loaded under it would itself be on meta)."""

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES

from r1flow.config import ConfigError
from r1flow.data.tasks import generate_tasks
from r1flow.generation import Generator, SamplingParams
from r1flow.models import load_policy

ROOT = Path(__file__).resolve().parent.parent


def elsewhere():
    """torch's default device made another than the model's (CPU) one."""
    return torch.device("meta")


@contextlib.contextmanager
def loads_on_cpu(monkeypatch, module, name):
    """`module.name` (a loader) run with the CPU as the default device, inside elsewhere()."""
    orig = getattr(module, name)

    def load(*args, **kw):
        with torch.device("cpu"):
            return orig(*args, **kw)

    monkeypatch.setattr(module, name, load)
    yield


def test_the_trick_catches_a_tensor_made_on_the_default_device():
    """Self-check: the test would fail on code that forgets `device=`."""
    model = torch.nn.Linear(4, 4)
    with elsewhere(), pytest.raises(RuntimeError):
        model(torch.zeros(2, 4))
    with elsewhere():
        assert model(torch.zeros(2, 4, device="cpu")).device.type == "cpu"


@pytest.mark.parametrize("fast", [True, False], ids=["fast_llama", "transformers_forward"])
def test_sampling_makes_its_tensors_on_the_model_device(tiny_policy, fast):
    model, tok = load_policy(str(tiny_policy[0]))
    gen = Generator(model, tok, batch_size=8, seed=0, fast=fast)
    with elsewhere():
        out = gen.generate(["1+2=", "3+4+5="], SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=6))
    assert out.completion_ids.device.type == "cpu" and len(out.texts) == 4
    assert gen.rng.device.type == "cpu"  # the sampler's generator is on the model's device


def test_grpo_step_makes_its_tensors_on_the_model_device(tiny_policy, tmp_path):
    from r1flow.training.grpo import GRPOConfig, GRPOTrainer

    splits = generate_tasks(5, FAMILIES, {"train": 16, "validation": 4})
    policy, tok = load_policy(str(tiny_policy[0]))
    ref, _ = load_policy(str(tiny_policy[0]))
    cfg = GRPOConfig.from_dict({"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 8,
                                "steps": 1, "eval_every": 1, "eval_prompts": 4, "eval_k": 1, "warmup_steps": 0,
                                "micro_batch_size": 2, "num_iterations": 2})
    t = GRPOTrainer(policy, ref, tok, cfg, splits["train"], splits["validation"], tmp_path)
    with elsewhere():
        row = t.step()
        row.update(t.validate())
    assert row["step"] == 1 and row["kl"] is not None and 0 <= row["val_pass@1"] <= 1


def test_sft_step_makes_its_tensors_on_the_model_device(tiny_policy):
    from r1flow.training.sft import train_sft

    model, tok = load_policy(str(tiny_policy[0]))
    before = model.model.embed_tokens.weight.detach().clone()
    with elsewhere():
        rows = train_sft(model, tok, ["1+2=", "2+2=", "3+3="], [" 3", " 4", " 6"], epochs=1, batch_size=2,
                         micro_batch_size=1, max_length=32, warmup_steps=0)
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    assert not torch.equal(before, model.model.embed_tokens.weight)  # it trained


def test_reward_model_step_makes_its_tensors_on_the_model_device(tiny_policy, monkeypatch):
    from r1flow.data.preferences import make_preferences
    from r1flow.training import reward_model as RM

    pairs = make_preferences(8, 8, seed=0)
    with loads_on_cpu(monkeypatch, RM, "load_reward_model"), elsewhere():
        model, tok, metrics = RM.train_reward_model(str(tiny_policy[0]), pairs, "helpfulness", None, steps=2,
                                                    batch_size=4, max_length=64)
        scores = RM.score_texts(model, tok, ["User: hi\nAssistant: hello", "User: hi\nAssistant: no"])
    assert len(metrics) == 2 and scores.device.type == "cpu" and scores.shape == (2,)


# -- the setting -------------------------------------------------------------------------------------------
def resolve_device(setting):
    from r1flow.models import resolve_device

    return resolve_device(setting)


def test_auto_is_the_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto means CUDA here")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("asked", ["cuda", "cuda:0"])
def test_cuda_asked_without_cuda_names_the_key(asked, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"config key 'device': '{asked}' asked but torch.cuda.is_available\(\) "
                                          r"is False on host"):
        resolve_device(asked)


def test_bad_device_names_the_key():
    with pytest.raises(ConfigError, match="config key 'device': expected auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")


def test_each_torchrun_rank_takes_its_local_gpu(monkeypatch):
    """Under torchrun (DeepSpeed), `cuda` and `auto` mean cuda:LOCAL_RANK, made the current device."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert current == [torch.device("cuda", 3)] * 2
    with pytest.raises(ConfigError, match="'cuda:5' asked but host .* has 4 GPU"):
        resolve_device("cuda:5")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
@pytest.mark.parametrize("script", ["grpo.py", "sft.py", "reward_model.py", "evaluate.py", "cold_start.py",
                                    "rejection_sampling.py", "build_base.py"])
def test_a_stage_asked_for_cuda_without_it_stops_before_loading(script, tmp_path):
    """Every model-running script takes --device and refuses CUDA on this CPU-only host before reading its
    inputs or loading a model (the paths given do not exist: a later failure would name them instead)."""
    missing = str(tmp_path / "missing")
    args = {"grpo.py": ["--model", missing, "--train", missing, "--validation", missing, "--grpo", "{}",
                        "--state", missing, "--out-model", missing, "--metrics", missing,
                        "--validation-curve", missing],
            "sft.py": ["--model", missing, "--data", missing, "--settings", "{}", "--out", missing,
                       "--metrics", missing],
            "reward_model.py": ["--base", missing, "--pairs", missing, "--aspect", "helpfulness", "--out", missing,
                                "--metrics", missing],
            "evaluate.py": ["--model", missing, "--name", "m", "--benchmark", "b", "--spec", "{}", "--evaluation",
                            "{}", "--samples", missing, "--summary", missing],
            "cold_start.py": ["--base", missing, "--r1-zero", missing, "--train", missing, "--settings", "{}",
                              "--out", missing],
            "rejection_sampling.py": ["--model", missing, "--train", missing, "--settings", "{}", "--out", missing],
            "build_base.py": ["--tiny", "{}", "--families", "{}", "--out", missing, "--loss", missing]}[script]
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args, "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    refusal = "config key 'device': 'cuda' asked but torch.cuda.is_available() is False on host"
    assert refusal in p.stderr, p.stderr[-2000:]
    assert "missing" not in p.stderr.split("ConfigError")[-1]


def test_pad_batch_goes_to_the_device():
    from r1flow.models.decoding import pad_batch

    with elsewhere():
        ids, mask = pad_batch([[1, 2], [3]], 0, left=True, device=torch.device("cpu"))
    assert ids.device.type == "cpu" and ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
