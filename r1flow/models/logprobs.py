"""Per-token log-probabilities of sampled completions under a policy: the pi_theta(o_{i,t}|q, o_{i,<t})
of eq. 1, for the policy being trained, the old policy and the reference model alike."""

from __future__ import annotations

import torch

from r1flow.config import require_positive
from r1flow.models import call_model, fast_llama, sharded_root
from r1flow.models.chunked import linear_logprobs, output_layer


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                   entropy_grad: bool = False):
    """log softmax(logits / T) at the sampled tokens, and optionally the entropy of that distribution
    (detached unless `entropy_grad`).

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
    if with_entropy or entropy_grad:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def hf_completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                           temperature: float = 1.0, with_entropy: bool = False, chunk_size: int | None = None,
                           entropy_grad: bool = False):
    """Reference implementation through the model's own forward over prompt + completion (rows aligned).

    Where the model's logits are lm_head(decoder hidden state) (`chunked.output_layer`), the decoder runs
    and the log-probs come from `chunked.linear_logprobs`, a chunk of tokens at a time: the (rows, length,
    vocab) logits never exist. Other models give their logits, the ones predicting completion tokens."""
    require_positive("temperature", temperature)
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(completion_mask)], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    C = completion_ids.shape[1]
    head = output_layer(model)
    if head is not None:
        decoder, lm_head = head
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        # positions P-1 .. P+C-2 predict the completion tokens
        return linear_logprobs(hidden[:, ids.shape[1] - C - 1:-1], lm_head.weight, completion_ids, bias=lm_head.bias,
                               temperature=temperature, with_entropy=with_entropy, chunk_size=chunk_size,
                               entropy_grad=entropy_grad)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=C + 1).logits[:, :-1]
    return token_logprobs(logits, completion_ids, temperature, with_entropy, entropy_grad)


def prompt_groups(prompt_ids, prompt_mask) -> list[int]:
    """Lengths of the runs of consecutive rows with the same prompt (ids and mask), in order."""
    if prompt_ids.shape[0] == 0:
        return []
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(1) & (prompt_mask[1:] == prompt_mask[:-1]).all(1)
    # bookkeeping on the CPU (a list of run lengths comes out), whatever device the prompts are on
    starts = torch.cat((torch.tensor([0], device="cpu"), torch.nonzero(~same.cpu()).flatten() + 1,
                        torch.tensor([prompt_ids.shape[0]], device="cpu")))
    return starts.diff().tolist()


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size: int,
                        temperature: float = 1.0, with_entropy: bool = False, fast: bool = True,
                        entropy_grad: bool = False):
    """(N, C) log-probs (and entropies) of the completion tokens; prompt_ids has one row per completion.
    The entropies are detached, unless `entropy_grad` (an entropy term in the loss).

    With `fast`, supported architectures (Llama, Qwen2) run r1flow.models.fast_llama, which computes
    each prompt once per run of consecutive rows that share it (a group of `group_size` rows, or the
    part of one that a micro-batch holds: N need not be a multiple of group_size) instead of once per
    row; results are the same (tested). Either way the log-probs are computed a chunk of tokens at a
    time, without the (N, C, vocab) logits.
    """
    require_positive("temperature", temperature)
    if sharded_root(model) is not None:
        # FSDP2 (r1flow.training.engine.shard_model): the model's own forward, which gathers each decoder
        # layer's weights in its hooks; the fast path reads the weights directly and would see shards
        return call_model(model, hf_completion_logprobs, prompt_ids, prompt_mask, completion_ids, completion_mask,
                          temperature, with_entropy, entropy_grad=entropy_grad)
    if fast:
        if fast_llama.supports(model):
            counts = prompt_groups(prompt_ids, prompt_mask)
            first = torch.tensor([0, *counts], dtype=torch.long, device=prompt_ids.device).cumsum(0)[:-1]  # run starts
            return fast_llama.completion_logprobs(
                model, prompt_ids[first], prompt_mask[first], completion_ids, completion_mask,
                counts, temperature=temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)
    return hf_completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                  temperature, with_entropy, entropy_grad=entropy_grad)
