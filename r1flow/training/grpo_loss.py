"""The GRPO objective of the paper, equations 1 to 3, and its well-known later variants.

Notation follows section 2.2.1: for each question q, G outputs o_1..o_G are sampled from the old policy
pi_theta_old; rewards r_1..r_G give advantages (eq. 3)

    A_i = (r_i - mean({r_1..r_G})) / std({r_1..r_G})

and the policy maximises (eq. 1)

    1/G sum_i [ min(rho_i A_i, clip(rho_i, 1 - epsilon, 1 + epsilon) A_i) - beta D_KL(pi_theta || pi_ref) ]

with the KL estimated per token as in eq. 2:

    D_KL = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1        (Schulman's k3: unbiased, always >= 0)

Ratios. Eq. 1 writes rho_i = pi_theta(o_i|q) / pi_theta_old(o_i|q) for the whole output; the GRPO
implementation of DeepSeekMath applies it per token, rho_{i,t} = pi_theta(o_{i,t}|q,o_{i,<t}) / pi_old(...).
`importance_sampling_level="token"` (default) does the latter. "sequence" uses the length-normalised
sequence ratio exp(mean_t log rho_{i,t}) of GSPO (Zheng et al., 2025), since the raw product of token
ratios over hundreds of tokens is numerically useless for clipping.

Variants, each named after its source:
- scale_rewards="group" is eq. 3; "none" drops the division by std (Dr. GRPO, Liu et al., 2025);
  "batch" divides by the std of the whole batch.
- loss_type="grpo": mean over tokens of each output (the 1/|o_i| of DeepSeekMath), then mean over outputs;
  "dapo": one mean over all tokens of the batch (DAPO's token-level loss, Yu et al., 2025);
  "dr_grpo": sum over tokens divided by (outputs x max completion length), a constant (Dr. GRPO).
- epsilon_high > epsilon: DAPO's clip-higher (asymmetric clip range [1 - epsilon, 1 + epsilon_high]).
- mask_truncated_completions: outputs cut off at the length limit contribute no gradient (DAPO's
  overlong filtering).
- Truncated importance sampling (TIS; Yao et al., 2025, as in verl and TRL's vllm_importance_sampling_cap):
  a fast sampler (vLLM) and the trainer compute slightly different probabilities for the same weights, so
  the outputs come from pi_sampler, not pi_theta_old. Each token's policy-gradient term is weighted by
  w_{i,t} = min(pi_theta_old(o_{i,t}) / pi_sampler(o_{i,t}), C) (detached); the KL term is not weighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


# Rewards this close (relative) are equal: float32 keeps ~7 digits, so closer values are rounding noise.
_EQUAL_REL = 1e-6


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(groups,) bool: whose G rewards differ by more than float32 rounding (see group_advantages); only
    these get a non-zero advantage (eq. 3), hence a gradient."""
    r = rewards.double().view(-1, group_size)
    spread = r.max(dim=1).values - r.min(dim=1).values
    return spread > _EQUAL_REL * r.abs().max(dim=1).values.clamp(min=1.0)


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """Eq. 3. rewards: (N,) in prompt-major order, N = prompts x G.

    std is the population std of the group (divide by G). A group whose rewards are all equal carries no
    signal, and its advantages are exactly 0. "Equal" allows for float32 rounding: a weighted sum such as
    1.475 or eight rewards of 0.1 give a std near 1e-8, which divided into a centred value near 1e-8 would
    push every output of the group by +1 or -1 (all one sign). Rewards within `_EQUAL_REL` of each other
    (relative to their size, at least 1) count as equal; other groups are divided by their exact std, so
    real differences keep the advantages of eq. 3 unchanged (no std + epsilon damping).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    r = rewards.double().view(-1, group_size)
    signal = groups_with_signal(rewards, group_size).unsqueeze(1)  # (groups, 1)
    centered = torch.where(signal, r - r.mean(dim=1, keepdim=True), torch.zeros_like(r))
    if scale_rewards == "none":
        return centered.flatten().float()
    if scale_rewards == "group":
        std = r.std(dim=1, unbiased=False, keepdim=True)
    else:
        std = r.std(unbiased=False).expand(r.shape[0], 1)
    # Where a group has signal its std is at least spread / G > 0; elsewhere the 1 only avoids 0/0.
    return (centered / torch.where(signal, std, torch.ones_like(std))).flatten().float()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Eq. 2 per token: pi_ref/pi - log(pi_ref/pi) - 1, from log-probabilities."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def loss_mask(completion_mask: torch.Tensor, truncated: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """Tokens that count in the loss: the completion's own tokens, minus truncated outputs if asked."""
    m = completion_mask.float()
    if mask_truncated:
        m = m * (~truncated).float().unsqueeze(1)
    return m


@dataclass
class Normalizer:
    """Totals over the whole batch, so that micro-batches (gradient accumulation) sum to the full loss."""

    rows: float  # outputs with at least one token in the loss
    tokens: float  # tokens in the loss
    outputs: float  # all outputs, masked or not (Dr. GRPO's G x batch)
    max_len: int  # max completion length (Dr. GRPO's constant)

    @classmethod
    def of(cls, mask: torch.Tensor, max_len: int) -> "Normalizer":
        return cls(float((mask.sum(1) > 0).sum().clamp(min=1)), float(mask.sum().clamp(min=1)),
                   float(mask.shape[0]), max_len)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    normalizer: Normalizer | None = None,
    is_weights: torch.Tensor | None = None,
    pg_mask: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coeff: float = 0.0,
):
    """Negative of eq. 1 for a (micro-)batch. logp/old_logp/ref_logp/mask: (N, C); advantages: (N,).
    is_weights: (N, C) truncated importance-sampling weights of the policy-gradient term (see
    `truncated_importance_weights`), or None. pg_mask: (N, C) 0/1, the tokens that carry the
    policy-gradient term (high-entropy tokens; the KL term keeps all of `mask`, as TRL's
    top_entropy_quantile does), or None. entropy: (N, C) the policy's entropy per token with autograd,
    added to the objective times entropy_coeff (verl's entropy bonus), or None.

    Returns (loss, stats) where stats holds detached sums for metrics: kl and clip fraction (per token).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    norm = normalizer or Normalizer.of(mask, mask.shape[1])

    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        seq = (log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)
        # GSPO: every token of output i carries the same ratio s_i; its gradient reaches all tokens via the mean
        log_ratio = seq.unsqueeze(1).expand_as(logp)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    A = advantages.unsqueeze(1)
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A
    objective = torch.min(unclipped, clipped)
    if is_weights is not None:
        objective = objective * is_weights.detach()
    if pg_mask is not None:
        objective = objective * pg_mask
    if entropy is not None and entropy_coeff != 0.0:
        objective = objective + entropy_coeff * entropy
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if kl is not None and beta != 0.0:
        objective = objective - beta * kl
    per_token = -objective * mask

    if loss_type == "grpo":
        per_row = per_token.sum(1) / mask.sum(1).clamp(min=1)
        loss = per_row.sum() / norm.rows
    elif loss_type == "dapo":
        loss = per_token.sum() / norm.tokens
    else:  # dr_grpo
        loss = per_token.sum() / (norm.outputs * norm.max_len)

    with torch.no_grad():
        is_clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
        stats = {
            "tokens": mask.sum().item(),
            "clipped_tokens": (is_clipped.float() * mask).sum().item(),
            "kl_sum": (kl * mask).sum().item() if kl is not None else float("nan"),
        }
    return loss, stats


def truncated_importance_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> tuple[torch.Tensor, dict]:
    """TIS weights min(pi_theta_old / pi_sampler, cap) per token, from log-probs; (N, C) each.

    Where the sampler gave no log-prob (NaN: a stop token vLLM did not return) or outside the mask the
    weight is 1. Returns (weights, stats) with detached sums over the masked tokens that have a sampler
    log-prob: "is_tokens", "is_ratio_sum" (the uncapped ratio) and "is_capped_tokens" (ratio > cap).
    """
    if not cap > 0:
        raise ValueError(f"the importance-sampling cap must be positive, got {cap}")
    with torch.no_grad():
        known = ~torch.isnan(sampler_logp) & (mask > 0)
        ratio = torch.exp(old_logp.float() - torch.nan_to_num(sampler_logp.float(), nan=0.0))
        ratio = torch.where(known, ratio, torch.ones_like(ratio))
        weights = ratio.clamp(max=cap)
        k = known.float()
        stats = {"is_tokens": k.sum().item(), "is_ratio_sum": (ratio * k).sum().item(),
                 "is_capped_tokens": ((ratio > cap).float() * k).sum().item()}
    return weights, stats
