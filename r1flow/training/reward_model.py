"""Bradley-Terry reward models for general data (section 2.3.4).

"For general data, we resort to reward models to capture human preferences in complex and nuanced
scenarios." Two models, one per aspect:

- helpfulness: "we focus exclusively on the final summary", so the model sees the prompt and the summary
  of a readable response (section 2.3.1's |special_token|<reasoning_process>|special_token|<summary>),
  never the reasoning process; a response without the pattern is taken whole.
- harmlessness: "we evaluate the entire response of the model, including both the reasoning process and
  the summary", since harm can hide in the reasoning.

A reward model is a sequence classifier with one output (AutoModelForSequenceClassification,
num_labels=1) initialised from a causal LM folder: the transformer body is the LM's, a fresh linear
head reads the hidden state at the last non-pad token. Training and scoring share `render_for_rm` and
`rm_response` (r1flow.models.reward_model), so the reward model is always scored on exactly what it was
trained on.
"""

from __future__ import annotations

import logging
import math
import os
import time

import pandas as pd
import torch
import torch.nn.functional as F

from r1flow.data.preferences import ASPECTS, prompt_text, response_text
from r1flow.models import save_policy, sharded_root
from r1flow.models.reward_model import load_reward_model, max_length_of, render_for_rm, rm_response, score_texts
from r1flow.training.engine import DeepSpeedSettings, make_engine, master_parameters, shard_model
from r1flow.training.sft import rank_rows
from r1flow.training.tracking import open_run

log = logging.getLogger(__name__)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the preferences under the Bradley-Terry model:

        P(chosen > rejected) = sigmoid(r_chosen - r_rejected)
        L = -mean log sigmoid(r_chosen - r_rejected)

    (logsigmoid is the numerically stable form of log(1 / (1 + exp(-(r_c - r_r))))).
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs with r_chosen > r_rejected; ties count half, so a constant model scores 0.5."""
    wins = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    return wins.mean().item()


def pair_texts(pairs: pd.DataFrame, aspect: str | None = None, tokenizer=None) -> tuple[list[str], list[str]]:
    """(chosen texts, rejected texts) as the reward model of each pair's aspect reads them (in the
    tokenizer's chat template when it has one)."""
    chosen, rejected = [], []
    for row in pairs.itertuples(index=False):
        a = aspect or row.aspect
        p = prompt_text(row.prompt)
        chosen.append(render_for_rm(p, rm_response(response_text(row.chosen), a), tokenizer))
        rejected.append(render_for_rm(p, rm_response(response_text(row.rejected), a), tokenizer))
    return chosen, rejected


def evaluate_reward_model(model, tokenizer, pairs: pd.DataFrame, aspect: str | None = None,
                          batch_size: int = 32) -> float:
    """Pairwise accuracy on preference pairs (ties count half). `aspect` defaults to each row's."""
    was_training = model.training
    model.eval()
    chosen, rejected = pair_texts(pairs, aspect, tokenizer)
    r_c = score_texts(model, tokenizer, chosen, batch_size)
    r_r = score_texts(model, tokenizer, rejected, batch_size)
    model.train(was_training)
    return pairwise_accuracy(r_c, r_r)


# -- training ------------------------------------------------------------------------------------------
def train_reward_model(base_path: str | os.PathLike, pairs_df: pd.DataFrame, aspect: str,
                       out_dir: str | os.PathLike | None, steps: int = 100, lr: float = 1e-3, batch_size: int = 16,
                       seed: int = 0, weight_decay: float = 0.0, warmup_steps: int = 0, max_grad_norm: float = 1.0,
                       max_length: int | None = None, dtype: str = "float32", device: str | torch.device = "cpu",
                       log_every: int = 10, gguf_file: str | None = None, deepspeed: dict | None = None,
                       tracking: dict | None = None, run_config: dict | None = None):
    """Train the `aspect` reward model on the pairs of that aspect; save it to `out_dir` (if given).

    Each step draws `batch_size` pairs (a fixed stream from `seed`), scores chosen and rejected in one
    forward and minimises the Bradley-Terry loss (see `bradley_terry_loss`) with AdamW and a cosine
    schedule. Returns (model, tokenizer, metrics) with metrics one row per step (RM_METRICS schema):
    step, loss, accuracy (pairwise, on the step's batch), learning_rate.

    `deepspeed`: the config's training.deepspeed section. When enabled (under torchrun, W ranks) every rank
    draws the same batch and scores its contiguous share of the pairs (r1flow.training.sft.rank_rows; a
    batch that W does not divide is split unevenly, a rank without pairs scores a filler pair with weight
    0); each rank's loss is its pairs' sum over the whole batch's size, so the update and the metrics
    (summed over ranks, the same on every rank) are those of one process. Rank 0 saves. With engine fsdp2
    the model is sharded (r1flow.training.engine.shard_model) and stays so: score it through
    r1flow.models.reward_model.score_texts, save it with save_policy on every rank.

    `tracking`: the job's tracking settings (r1flow.training.tracking): rank 0 logs every row, with
    `run_config` recorded in the run.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"unknown reward model aspect {aspect!r}; expected one of {ASPECTS}")
    pairs = pairs_df[pairs_df["aspect"] == aspect].reset_index(drop=True)
    if pairs.empty:
        raise ValueError(f"no preference pairs with aspect '{aspect}' (aspects present: "
                         f"{sorted(pairs_df['aspect'].unique())})")
    torch.manual_seed(seed)  # the fresh score head is initialised from it
    model, tok = load_reward_model(base_path, dtype=dtype, gguf_file=gguf_file, device=device)
    max_length = max_length or max_length_of(model, tok)
    chosen, rejected = pair_texts(pairs, aspect, tok)
    # tokens per text as scored (truncated to max_length), for the throughput in the log
    n_tok = [min(len(ids), max_length) for ids in tok(chosen + rejected, add_special_tokens=False)["input_ids"]]

    ds = DeepSpeedSettings.from_dict(deepspeed)
    if ds.shards_parameters:  # FSDP2 (engine fsdp2): each rank keeps its shards of weights, gradients, AdamW
        shard_model(model, ds)
    # float32 master weights for a bf16 / fp16 model, stepped by the engine (r1flow.training.engine)
    params, master = master_parameters(model, ds)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    engine = make_engine(model, opt, max_grad_norm, ds, master=master)
    rank, world, main = engine.rank, engine.world_size, engine.rank == 0
    g = torch.Generator().manual_seed(seed)
    rows, t0, tokens = [], time.time(), 0
    tracker = open_run(tracking, run_config, main=main)
    model.train()
    for step in range(1, steps + 1):
        # indices drawn on the CPU (a fixed stream whatever the device); the batch is scored on the model's
        idx = torch.randint(len(pairs), (min(batch_size, len(pairs)),), generator=g, device="cpu").tolist()
        mine = idx[rank_rows(len(idx), rank, world)]  # this rank's pairs (all of them in one process)
        scored = mine or idx[:1]  # a rank without pairs still runs the backward ZeRO reduces in: weight 0
        texts = [chosen[i] for i in scored] + [rejected[i] for i in scored]
        r = score_texts(model, tok, texts, batch_size=len(texts), max_length=max_length, grad=True)
        r_c, r_r = r[: len(scored)], r[len(scored):]
        # this rank's part of the whole batch's mean loss (the whole of it in one process)
        loss = bradley_terry_loss(r_c, r_r) * (len(mine) / len(idx))
        engine.zero_grad()
        engine.backward(loss * engine.loss_scale)  # x W: DeepSpeed averages gradients over ranks
        lr_now = sched.get_last_lr()[0]
        engine.step()  # clip the gradient norm, update
        sched.step()
        wins = pairwise_accuracy(r_c.detach(), r_r.detach()) * len(mine)
        loss_sum, wins_sum = engine.all_sum([loss.item(), wins])
        rows.append({"step": step, "loss": loss_sum, "accuracy": wins_sum / len(idx), "learning_rate": lr_now})
        tracker.log(rows[-1], step)
        tokens += sum(n_tok[i] + n_tok[len(pairs) + i] for i in idx)
        if main and (step % log_every == 0 or step == steps):
            log.info("reward model '%s' step %d/%d: loss %.4f, batch accuracy %.3f, lr %.3g, %.0f tokens/s", aspect,
                     step, steps, rows[-1]["loss"], rows[-1]["accuracy"], lr_now, tokens / (time.time() - t0))
    tracker.close()
    model.eval()
    if main:
        log.info("reward model '%s': %d steps on %d pairs in %.1fs, final batch loss %.3f", aspect, steps,
                 len(pairs), time.time() - t0, rows[-1]["loss"])
    # with DeepSpeed rank 0 writes the model (the weights are the same on all); FSDP2's shards are gathered
    # by every rank (save_policy), rank 0 writing them
    if out_dir is not None and (main or sharded_root(model) is not None):
        save_policy(model, tok, out_dir)  # any transformers model: save_pretrained to a tmp folder, then rename
    return model, tok, pd.DataFrame(rows)
