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
