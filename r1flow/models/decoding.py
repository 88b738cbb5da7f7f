"""Token-level pieces shared by the sampling loops (r1flow.generation, r1flow.models.fast_llama) and the
training forwards: token lists padded into batches, and one token drawn from logits."""

from __future__ import annotations

import torch


def pad_batch(seqs: list[list[int]], pad: int, left: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask) on `device` (the model's; the CPU when None). Prompts are left-padded
    (every row's next token is at the end), completions right-padded (every row starts at the same position).
    Built on the CPU and copied once: one transfer per batch, not one per row."""
    width = max(map(len, seqs), default=0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for r, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[r, cols] = torch.tensor(s, dtype=torch.long, device="cpu")
        mask[r, cols] = 1
    device = torch.device("cpu") if device is None else device
    return ids.to(device), mask.to(device)


class GroupGenerators:
    """One random stream per group of `n` consecutive rows (a prompt's n samples), each seeded on its own,
    in place of one torch.Generator for the whole batch: a group's samples then do not depend on which
    other prompts are decoded with it (nor on which DeepSpeed rank samples it). `sample_next` accepts it
    as its `generator`."""

    def __init__(self, seeds: list[int], n: int):
        self.seeds, self.n = [int(s) for s in seeds], n
        self.gens: list[torch.Generator] | None = None

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        if probs.shape[0] != len(self.seeds) * self.n:
            raise ValueError(f"{probs.shape[0]} rows for {len(self.seeds)} groups of {self.n}")
        if self.gens is None:  # created on the device of the probabilities
            self.gens = [torch.Generator(probs.device).manual_seed(s) for s in self.seeds]
        u = torch.cat([_uniforms(self.n, probs.device, g) for g in self.gens])
        return _inverse_cdf(probs, u)


def _uniforms(n: int, device, generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row from (unnormalised) `probs` with one uniform each: the first token whose cumulative
    probability exceeds u x the row's total. One uniform per row instead of one exponential per token
    (torch.multinomial's way: 30% of a decoding step at a 49k vocabulary, measured); the sums are in
    float64 so that tokens of tiny probability keep their share, and a token of probability 0 is never drawn."""
    cdf = probs.double().cumsum(-1)
    r = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, r, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else nucleus sampling (top-p) at the temperature.
    `generator`: a torch.Generator for the batch, or `GroupGenerators` (one stream per group of rows)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if isinstance(generator, GroupGenerators):
        return generator.draw(probs)
    return _inverse_cdf(probs, _uniforms(probs.shape[0], probs.device, generator))
