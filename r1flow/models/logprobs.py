"""Per-token log-probabilities of sampled completions under a policy: the pi_theta(o_{i,t}|q, o_{i,<t})
of eq. 1, for the policy being trained, the old policy and the reference model alike."""

from __future__ import annotations

import torch

from r1flow.config import require_positive
from r1flow.models import fast_llama


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False):
    """log softmax(logits / T) at the sampled tokens, and optionally the entropy of that distribution.

    Dividing by the sampling temperature makes pi_theta_old the distribution the samples came from
    (temperature 0, greedy sampling, has no such distribution: refused, it would give NaN).
    """
    require_positive("temperature", temperature)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def hf_completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                           temperature: float = 1.0, with_entropy: bool = False):
    """Reference implementation through the model's own forward over prompt + completion (rows aligned)."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(completion_mask)], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    C = completion_ids.shape[1]
    # only the logits that predict completion tokens: positions P-1 .. P+C-2
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=C + 1).logits[:, :-1]
    return token_logprobs(logits, completion_ids, temperature, with_entropy)


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size: int,
                        temperature: float = 1.0, with_entropy: bool = False, fast: bool = True):
    """(N, C) log-probs (and entropies) of the completion tokens. Rows are prompt-major groups of
    `group_size`; prompt_ids has one row per completion.

    With `fast`, supported architectures (Llama, Qwen2) run r1flow.models.fast_llama, which computes
    each prompt once per group instead of G times; results are the same (tested).
    """
    require_positive("temperature", temperature)
    if fast:
        if fast_llama.supports(model):
            return fast_llama.completion_logprobs(
                model, prompt_ids[::group_size], prompt_mask[::group_size], completion_ids, completion_mask,
                group_size, temperature=temperature, with_entropy=with_entropy)
    return hf_completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                  temperature, with_entropy)
