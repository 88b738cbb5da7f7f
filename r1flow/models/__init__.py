"""Loading and saving policies in the Hugging Face format, whatever built them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_policy(name_or_path: str, dtype: str = "float32", device: str = "cpu", gguf_file: str | None = None):
    """A causal LM and its tokenizer from a local folder or a hub id (the config's `model.path`)."""
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = load_tokenizer(name_or_path, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype], **kw).to(device)
    return model, tok


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
