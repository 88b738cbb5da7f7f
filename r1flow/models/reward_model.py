"""Bradley-Terry reward models (section 2.3.4) as models: loading one, what it reads of a response, scoring.

Shared by their training (r1flow.training.reward_model) and the model-based rewards
(r1flow.rewards.model_based), so a reward model is always scored on exactly what it was trained on.
"""

from __future__ import annotations

import os

import torch

from r1flow.data.formats import READABLE_MARKER, split_readable
from r1flow.data.preferences import ASPECTS
from r1flow.models import DTYPES, call_model, load_pretrained, load_tokenizer


def render_for_rm(prompt_text: str, response_text: str, tokenizer=None) -> str:
    """The one rendering a reward model reads, in training and in scoring alike: the conversation in the
    tokenizer's own chat template (the format a real chat model was trained on), or plain
    "User: ... Assistant: ..." for a tokenizer without one (the embedded tiny base)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt_text},
                                              {"role": "assistant", "content": response_text}], tokenize=False)
    return f"User: {prompt_text}\nAssistant: {response_text}"


def rm_response(response: str, aspect: str, marker: str = READABLE_MARKER) -> str:
    """What the reward model of `aspect` sees of a response (section 2.3.4).

    helpfulness: the summary only (the whole response when the readable pattern is absent);
    harmlessness: the whole response, reasoning process included.
    """
    if aspect == "helpfulness":
        parts = split_readable(response, marker)
        return response if parts is None else parts[1].strip()
    if aspect == "harmlessness":
        return response
    raise ValueError(f"unknown reward model aspect {aspect!r}; expected one of {ASPECTS}")


def prepare_tokenizer(tok):
    """Right padding, so every text keeps positions 0..n-1 whatever batch it is scored in (with RoPE,
    left padding is invariant too, but a model with absolute positions would not be; the classifier
    reads the rightmost non-pad token either way). Truncation keeps the end, where the score is read."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    tok.truncation_side = "left"
    return tok


def load_reward_model(path: str | os.PathLike, num_labels: int = 1, dtype: str | torch.dtype = "float32",
                      gguf_file: str | None = None, device: str | torch.device = "cpu"):
    """A sequence classifier with one output and its tokenizer, from a causal LM (a folder, hub id or
    GGUF file) or a reward model folder, through r1flow.models.load_pretrained, on `device`."""
    from transformers import AutoModelForSequenceClassification

    if isinstance(dtype, torch.dtype):
        dtype = {v: k for k, v in DTYPES.items()}[dtype]
    tok = prepare_tokenizer(load_tokenizer(str(path), gguf_file))
    model = load_pretrained(AutoModelForSequenceClassification, str(path), dtype, gguf_file, num_labels=num_labels).to(device)
    # LlamaForSequenceClassification scores the last token that is not pad_token_id; without it, a batch
    # of more than one text cannot be scored at all
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _scores(model, enc: dict) -> torch.Tensor:
    return model(**enc).logits[:, 0].float()


def max_length_of(model, tokenizer) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return int(min(limit, tokenizer.model_max_length))


def score_texts(model, tokenizer, texts: list[str], batch_size: int = 16, max_length: int | None = None,
                grad: bool = False) -> torch.Tensor:
    """One scalar reward per rendered text, shape (len(texts),), on the model's device."""
    max_length = max_length or max_length_of(model, tokenizer)
    dev = next(model.parameters()).device
    out = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for i in range(0, len(texts), batch_size):
            # lists, then tensors made on the model's device (return_tensors="pt" would make them on
            # torch's default device, wherever the model is)
            enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                            add_special_tokens=False)
            enc = {k: torch.tensor(enc[k], dtype=torch.long, device=dev) for k in ("input_ids", "attention_mask")}
            # inside the FSDP2 root's forward when the model is sharded (its embeddings and head gathered)
            out.append(call_model(model, _scores, enc))
    return torch.cat(out) if out else torch.zeros(0, device=dev)
