"""Loading and saving policies in the Hugging Face format, whatever built them."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import torch

from r1flow.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_KEY = "device"  # the config key every model-running stage gets (auto | cpu | cuda | cuda:N)


def parse_device(setting: str | None, key: str = DEVICE_KEY) -> str:
    """The `device` setting checked for its form only (auto | cpu | cuda | cuda:N), on any host."""
    setting = "auto" if setting is None else str(setting)
    if setting != "auto":
        try:
            ok = torch.device(setting).type in ("cpu", "cuda") and setting.split(":")[0] in ("cpu", "cuda")
        except (RuntimeError, ValueError):
            ok = False
        if not ok or (setting.startswith("cpu") and setting != "cpu"):
            raise ConfigError(f"config key '{key}': expected auto, cpu, cuda or cuda:N, got {setting!r}")
    return setting


def resolve_device(setting: str | None = "auto", key: str = DEVICE_KEY) -> torch.device:
    """The device a job's models run on, from the config's `device` setting, before any model loads.

    auto: CUDA when torch sees a GPU, else the CPU. cuda (or auto on a GPU node) under torchrun: the local
    rank's GPU (cuda:LOCAL_RANK), made current so that collectives and DeepSpeed use it too. cuda:N as
    given. Asking for CUDA on a host without it stops here, naming the key, instead of training on the CPU
    or failing later on a device mismatch."""
    setting = parse_device(setting, key)
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(setting)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise ConfigError(f"config key '{key}': {setting!r} asked but torch.cuda.is_available() is False on host "
                          f"{socket.gethostname()}")
    if dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.index >= torch.cuda.device_count():
        raise ConfigError(f"config key '{key}': {str(dev)!r} asked but host {socket.gethostname()} has "
                          f"{torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(dev)
    return dev


def model_device(model) -> torch.device:
    """Where a model's weights are (its first parameter's device)."""
    return next(model.parameters()).device


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    """The tokenizer of a local folder or hub id, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if not os.path.exists(name_or_path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model '{name_or_path}' is not a local path and HF_HUB_OFFLINE=1")
    tok = AutoTokenizer.from_pretrained(name_or_path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu",
                gguf_file: str | None = None):
    """A causal LM and its tokenizer from a local folder or a hub id (the config's `model.path`), on
    `device` (a resolved device; see resolve_device)."""
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = load_tokenizer(name_or_path, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype], **kw).to(device)
    return model, tok


def load_weights(model, folder: str | os.PathLike) -> None:
    """Load a saved policy's weights into `model` in place, one file at a time: a single
    model.safetensors, or the shards of a large model's save listed in model.safetensors.index.json
    (read by transformers). A tied lm_head is not stored and may be missing; anything else is an error."""
    from safetensors.torch import load_file
    from transformers.trainer_utils import load_sharded_checkpoint

    folder = Path(folder)
    if (folder / "model.safetensors.index.json").exists():
        missing, unexpected = load_sharded_checkpoint(model, folder, strict=False)
    else:
        missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if unexpected or any(not (tied and "lm_head" in m) for m in missing):
        raise RuntimeError(f"weights in {folder} do not fit the model: missing {missing}, unexpected {unexpected}")


def save_policy(model, tokenizer, path: str | os.PathLike) -> None:
    """save_pretrained into a sibling folder, then rename: a crash never leaves half a model."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
