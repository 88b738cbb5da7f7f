"""Supervised fine-tuning on (prompt, completion) pairs: cross-entropy on the completion tokens only.

This is the step of the cold start (section 2.3.1) and of the SFT on rejection-sampled data and
distillation (sections 2.3.3, 2.4): the model learns to produce the completion given the prompt, so the
prompt's tokens carry no loss.

    batch = collate(tokenizer, prompts, completions)      # labels = -100 on prompt and padding
    loss = sft_loss(model, batch)                         # mean over the batch's completion tokens
    sft_step(engine, [batch_a, batch_b])                  # one update over micro-batches (and ranks)

`sft_loss(..., num_tokens=T)` divides by a given count instead of the batch's own: with T the count of
the whole step (all micro-batches, all ranks), the micro-batch losses add up to the full-batch mean, so
micro-batching and data parallelism change nothing but the float summation order (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # (B, L) prompt + completion (+ EOS), right-padded
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L) = input_ids on completion tokens, IGNORE elsewhere

    @property
    def num_tokens(self) -> int:
        """Completion tokens that carry loss (each predicted from the token before it)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def __getitem__(self, rows) -> "SFTBatch":
        return SFTBatch(self.input_ids[rows], self.attention_mask[rows], self.labels[rows])

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def collate(tokenizer, prompts: list[str], completions: list[str], max_length: int | None = None,
            add_eos: bool = True) -> SFTBatch:
    """Tokenize prompt and completion separately, so the boundary between them is exact whatever the
    tokenizer would merge across it; append EOS to the completion (the model must learn to stop);
    truncate from the right to max_length; right-pad."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    rows, labels = [], []
    for p, c in zip(p_ids, c_ids):
        ids = (p + c + eos)[:max_length]
        lab = ([IGNORE] * len(p) + c + eos)[:max_length]
        rows.append(ids)
        labels.append(lab)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        lab_t[i, : len(lab)] = torch.tensor(lab)
    return SFTBatch(input_ids, mask, lab_t)


def sft_loss(model, batch: SFTBatch, num_tokens: int | float | None = None) -> torch.Tensor:
    """Sum of the completion tokens' negative log-likelihoods divided by `num_tokens` (default: the
    batch's own count, i.e. the mean per completion token)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            ignore_index=IGNORE, reduction="sum")
    denom = batch.num_tokens if num_tokens is None else num_tokens
    return nll / max(1, denom)


def sft_step(engine, micro_batches: list[SFTBatch]) -> float:
    """One optimiser update over this rank's micro-batches; returns the full-batch mean loss (all ranks).

    `engine` is r1flow.training.engine.LocalEngine or DeepSpeedEngine: with W ranks each rank passes its
    own share of the batch; the token count is summed over ranks so every rank divides by the same total.
    """
    total = engine.all_sum([float(sum(mb.num_tokens for mb in micro_batches))])[0]
    engine.model.train()
    engine.zero_grad()
    loss_sum = 0.0
    for mb in micro_batches:
        loss = sft_loss(engine.model, mb, total)
        engine.backward(loss * engine.loss_scale)  # x W: DeepSpeed averages gradients over ranks
        loss_sum += loss.item()
    engine.step()
    return engine.all_sum([loss_sum])[0]
