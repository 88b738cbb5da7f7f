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

Data parallelism (DeepSpeed ZeRO, `train_sft(..., deepspeed=...)` under torchrun with W ranks): every rank
draws the same shuffled order from the seed and collates the same batch; each trains on its contiguous
share (`rank_rows`: ceil(n / W) rows per rank in rank order, the last ranks' shorter; engine.shard's shares
when W divides n). A batch_size that W does not divide, and an epoch's short last batch, are split
unevenly rather than refused: the loss is divided by the step's token count over all ranks, so uneven
shares leave it exact. ZeRO-2 reduces gradients in every backward, so every rank runs as many micro-batches
(`rank_micro_batches`); one with no rows of its own there runs a zero-weighted filler row.

Resumable (`train_sft(..., state_dir=...)`): a checkpoint every `save_every` updates, every
`save_every_minutes` of wall time and on SIGTERM (SLURM's time limit, a preemption: the job then stops,
is resubmitted and resumes; r1flow.training.stopping). It holds the weights, the optimiser (DeepSpeed: each
rank's shard), the float32 master weights, the schedule and the rows so far; the data order is the seed's,
drawn again, so the resumed run takes the batches it had not taken, and ends as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from r1flow.config import ConfigError
from r1flow.models import call_model, model_device
from r1flow.models.lora import is_lora
from r1flow.training.engine import DeepSpeedSettings, make_engine, master_parameters, shard_model
from r1flow.training.stopping import CheckpointSchedule, Stopped, StopRequest, weights_fingerprint
from r1flow.training.tracking import open_run

from r1flow.models.chunked import linear_logprobs, output_layer, set_activation_checkpointing

IGNORE = -100
log = logging.getLogger(__name__)


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

    def trimmed(self) -> "SFTBatch":
        """These rows up to their own longest sequence (a micro-batch sliced from a batch that `collate`
        padded to the whole batch's longest). The columns cut are right padding: no real token attends to
        them (causal) and they carry no loss, so loss and gradients are those of the untrimmed rows."""
        width = max(1, int(self.attention_mask.sum(1).max())) if len(self) else 0
        if width >= self.input_ids.shape[1]:
            return self
        return SFTBatch(self.input_ids[:, :width], self.attention_mask[:, :width], self.labels[:, :width])


def collate(tokenizer, prompts: list[str], completions: list[str], max_length: int | None = None,
            add_eos: bool = True, device=None) -> SFTBatch:
    """Tokenize prompt and completion separately, so the boundary between them is exact whatever the
    tokenizer would merge across it; append EOS to the completion (the model must learn to stop);
    truncate from the right to max_length; right-pad. The tensors go to `device` (the model's; CPU if None)."""
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
    cpu = torch.device("cpu")  # built on the CPU, copied to the device once
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long, device=cpu)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=cpu)
    lab_t = torch.full((len(rows), width), IGNORE, dtype=torch.long, device=cpu)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=cpu)
        mask[i, : len(ids)] = 1
        lab_t[i, : len(lab)] = torch.tensor(lab, dtype=torch.long, device=cpu)
    device = cpu if device is None else device
    return SFTBatch(input_ids.to(device), mask.to(device), lab_t.to(device))


def chat_pairs(tokenizer, conversations) -> tuple[list[str], list[str]]:
    """(prompt, completion) texts of conversations whose last message is the assistant's answer.

    The prompt is what inference feeds the model: the chat template's generation prompt. The completion
    is what the template renders after that prompt up to the end of the answer, so the model is trained
    on the token sequence it must produce at inference (e.g. no space after Qwen's or SmolLM's
    `<|im_start|>assistant\n`; the space after our own template's `Assistant:`). The end of turn is the
    EOS token that `collate` appends."""
    prompts, completions = [], []
    for msgs in conversations:
        msgs = list(msgs)
        answer = msgs[-1]["content"]
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        end = full.find(answer, len(prompt))
        if not full.startswith(prompt) or end < 0:
            raise ValueError("the chat template renders an assistant turn that does not continue its generation "
                             f"prompt {prompt[-40:]!r}: cannot tell what the model must produce")
        prompts.append(prompt)
        completions.append(full[len(prompt):end + len(answer)])
    return prompts, completions


def sft_loss(model, batch: SFTBatch, num_tokens: int | float | None = None) -> torch.Tensor:
    """Sum of the completion tokens' negative log-likelihoods divided by `num_tokens` (default: the
    batch's own count, i.e. the mean per completion token).

    Where the model's logits are lm_head(decoder hidden state) (`chunked.output_layer`), only the hidden
    states of the positions that carry loss go through lm_head, a chunk of tokens at a time
    (`chunked.linear_logprobs`): the (rows, length, vocab) logits never exist. Other models give their
    logits and the cross-entropy is taken on them."""
    # an FSDP2-sharded model (training.deepspeed.engine fsdp2) runs it inside its root's forward
    return call_model(model, _sft_loss, batch, num_tokens)


def _sft_loss(model, batch: SFTBatch, num_tokens: int | float | None) -> torch.Tensor:
    targets = batch.labels[:, 1:]
    head = output_layer(model)
    if head is not None:
        decoder, lm_head = head
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         use_cache=False).last_hidden_state[:, :-1]
        keep = targets != IGNORE
        logp, _ = linear_logprobs(hidden[keep], lm_head.weight, targets[keep], bias=lm_head.bias)
        nll = -logp.sum()
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index=IGNORE, reduction="sum")
    denom = batch.num_tokens if num_tokens is None else num_tokens
    return nll / max(1, denom)


def rank_rows(n: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous share of n rows: ceil(n / W) per rank in rank order, the last ranks' shorter
    or empty (the convention of GRPO's sharded validation; engine.shard's shares when W divides n)."""
    per = -(-n // world_size)
    return slice(min(n, rank * per), min(n, (rank + 1) * per))


def rank_micro_batches(batch: SFTBatch, rank: int, world_size: int,
                       micro_batch_size: int = 0) -> list[SFTBatch | None]:
    """This rank's share of `batch` (`rank_rows`) in micro-batches of `micro_batch_size` rows (0: the
    share in one). Every rank gets as many entries, ceil(ceil(n / W) / micro_batch_size), since ZeRO-2
    reduces gradients in every backward; None where this rank has no rows left (sft_step's filler)."""
    n = len(batch)
    per = -(-n // world_size)
    mine = rank_rows(n, rank, world_size)
    mb = micro_batch_size or per
    return [batch[mine.start + j : min(mine.stop, mine.start + j + mb)] if mine.start + j < mine.stop else None
            for j in range(0, per, mb)]


def sft_step(engine, micro_batches: list[SFTBatch | None], filler: SFTBatch | None = None) -> float:
    """One optimiser update over this rank's micro-batches; returns the full-batch mean loss (all ranks).

    `engine` is r1flow.training.engine.LocalEngine or DeepSpeedEngine: with W ranks each rank passes its
    own share of the batch; the token count is summed over ranks so every rank divides by the same total.
    A None micro-batch (this rank has no rows there, others have: `rank_micro_batches`) runs `filler`, any
    real row, with weight 0, so that every rank runs as many backwards over the same parameters.
    """
    if filler is None and any(mb is None for mb in micro_batches):
        raise ValueError("a None micro-batch needs a filler row")
    total = engine.all_sum([float(sum(mb.num_tokens for mb in micro_batches if mb is not None))])[0]
    engine.model.train()
    engine.zero_grad()
    loss_sum = 0.0
    for mb in micro_batches:
        if mb is None:  # a zero gradient, through the same graph as the other ranks' backwards
            engine.backward(sft_loss(engine.model, filler, total) * 0.0)
            continue
        loss = sft_loss(engine.model, mb.trimmed(), total)  # at its own longest row, not the batch's
        engine.backward(loss * engine.loss_scale)  # x W: DeepSpeed averages gradients over ranks
        loss_sum += loss.item()
    engine.step()
    return engine.all_sum([loss_sum])[0]


def train_sft(model, tokenizer, prompts: list[str], completions: list[str], *, epochs: int = 2,
              learning_rate: float = 1e-3, batch_size: int = 32, micro_batch_size: int = 0, max_length: int = 256,
              warmup_steps: int = 10, max_grad_norm: float = 1.0, seed: int = 0, deepspeed=None,
              log_every: int = 10, gradient_checkpointing: bool = False, tracking: dict | None = None,
              run_config: dict | None = None, state_dir: str | os.PathLike | None = None,
              save_every: int | None = None, save_every_minutes: float | None = None) -> list[dict]:
    """SFT for a number of epochs (two in section 2.3.3) over shuffled (prompt, completion) pairs.

    Returns one metrics row per update (step, epoch, loss, learning_rate). Cosine decay after warm-up.
    `gradient_checkpointing` recomputes each decoder layer in the backward instead of keeping its
    activations (less memory, one more forward; the same loss and gradients).
    `deepspeed`: the config's training.deepspeed section; when enabled (under torchrun) each rank trains on
    its share of every batch (module docstring; `micro_batch_size` then counts a rank's rows) and returns
    the same rows on every rank; the caller saves on rank 0. With engine fsdp2 the model is sharded in
    place (r1flow.training.engine.shard_model) and stays so: save it with save_policy on every rank.
    `tracking`: the job's tracking settings (r1flow.training.tracking): rank 0 logs every row as it is
    made, with `run_config` recorded in the run.
    `state_dir`: where checkpoints go (module docstring); a checkpoint there is resumed when it is of this
    run (same settings, data, starting weights and ranks), otherwise the run starts over (a warning says
    why). Without it nothing is saved.
    """
    if not prompts:
        raise ValueError("no SFT examples")
    if gradient_checkpointing:
        set_activation_checkpointing(model, True)
    ds = DeepSpeedSettings.from_dict(deepspeed)
    if is_lora(model) and ds.enabled:
        raise ConfigError("an SFT stage's lora with training.deepspeed.enabled is not supported yet (tested in one "
                          "process only); turn one of them off")
    # which weights training started from (a checkpoint of another start is not resumed): taken before
    # FSDP2 replaces them with each rank's shards
    start = weights_fingerprint(model)
    if ds.shards_parameters:  # FSDP2 (engine fsdp2): each rank keeps its shards of weights, gradients, AdamW
        shard_model(model, ds)
    # float32 master weights for a bf16 / fp16 model (r1flow.training.engine); the model's own otherwise
    params, master = master_parameters(model, ds)
    if is_lora(model):  # LoRA (r1flow.models.lora): only the adapters train, the frozen base takes no state
        params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    steps_per_epoch = math.ceil(len(prompts) / batch_size)
    total = epochs * steps_per_epoch

    def lr_factor(s):
        warm = min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    engine = make_engine(model, opt, max_grad_norm, ds, master=master)
    device = model_device(model)  # batches are made where the model is (the config's `device`)
    rank, world, main = engine.rank, engine.world_size, engine.rank == 0
    rng = random.Random(seed)  # the same order on every rank
    rows, step, tokens, t0 = [], 0, 0, time.perf_counter()
    run = {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size, "micro_batch_size":
           micro_batch_size, "max_length": max_length, "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm,
           "seed": seed, "world_size": world, "data": _data_hash(prompts, completions),
           "start": start}
    schedule = None
    if state_dir is not None:
        state_dir = Path(state_dir)
        step, rows = _resume(state_dir, run, engine, model, opt, master, sched)
        if step and main:
            log.info("SFT: resuming from step %d/%d (%s)", step, total, state_dir / "checkpoint")
        schedule = CheckpointSchedule(save_every, save_every_minutes, None, engine.all_sum, main)
    done = step  # updates taken before this process (a resumed run skips their batches)
    # no bar when stderr is not a terminal, nor on ranks other than 0
    bar = tqdm(total=total, initial=step, desc="SFT", unit="step", disable=None if main else True)
    tracker = open_run(tracking, run_config, main=main)
    # SIGTERM is caught only where a checkpoint can be saved; without a state folder it ends the job
    stopping = StopRequest() if schedule is not None else contextlib.nullcontext()
    with stopping as stop:
        for epoch in range(epochs):
            order = list(range(len(prompts)))
            rng.shuffle(order)
            for s in range(0, len(order), batch_size):
                if epoch * steps_per_epoch + s // batch_size < done:
                    continue  # taken before the resume (the order is the seed's, drawn again)
                idx = order[s : s + batch_size]
                batch = collate(tokenizer, [prompts[i] for i in idx], [completions[i] for i in idx], max_length,
                                device=device)
                lr = sched.get_last_lr()[0]  # the rate this update uses; sched.step() below sets the next one's
                # this rank's share of the batch (all of it in one process), in micro-batches
                loss = sft_step(engine, rank_micro_batches(batch, rank, world, micro_batch_size), filler=batch[:1])
                sched.step()
                step += 1
                rows.append({"step": step, "epoch": epoch + 1, "loss": loss, "learning_rate": lr})
                tracker.log(rows[-1], step)
                bar.update(1)
                tokens += int(batch.attention_mask.sum())
                if main and (step % log_every == 0 or step == total):
                    bar.set_postfix(loss=f"{loss:.3f}")
                    log.info("SFT step %d/%d (epoch %d): loss %.4f, lr %.3g, %.0f tokens/s", step, total, epoch + 1,
                             loss, rows[-1]["learning_rate"], tokens / (time.perf_counter() - t0))
                if schedule is not None and step < total and schedule.due(step, stop):
                    _save(state_dir, run, engine, model, opt, master, sched, step, rows)
                    if stop.signum is not None:  # resubmitted (the profile's retries), the job resumes here
                        bar.close()
                        tracker.close()
                        raise Stopped(f"SFT stopped by signal {stop.signum} after step {step}; checkpoint saved in "
                                      f"{state_dir / 'checkpoint'}, from which a rerun resumes")
    bar.close()
    tracker.close()
    if gradient_checkpointing:
        set_activation_checkpointing(model, False)
    model.eval()
    return rows


# -- checkpoints (resumable SFT) ------------------------------------------------------------------------
def _data_hash(prompts: list[str], completions: list[str]) -> str:
    """The examples' identity, so that a checkpoint is resumed only on the data it was made on."""
    h = hashlib.sha256()
    for p, c in zip(prompts, completions):
        h.update(p.encode() + b"\0" + c.encode() + b"\0")
    return h.hexdigest()


def _save(state_dir: Path, run: dict, engine, model, opt, master, sched, step: int, rows: list[dict]) -> None:
    """Written to checkpoint.tmp and renamed, so a kill while saving leaves the previous checkpoint."""
    tmp, final, main = state_dir / "checkpoint.tmp", state_dir / "checkpoint", engine.rank == 0
    if main and tmp.exists():
        shutil.rmtree(tmp)
    engine.barrier()
    if engine.shards_state:  # each rank writes its shard of the optimiser state (and DeepSpeed the module)
        engine.save(tmp / "engine")
        engine.barrier()
    if main:
        tmp.mkdir(parents=True, exist_ok=True)
        state = {"scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()}
        if not engine.shards_state:
            state.update(model=model.state_dict(), optimizer=opt.state_dict())
        if master is not None:  # the float32 weights the bf16 model is rounded from
            state["master_weights"] = master.state_dict()
        torch.save(state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "rows": rows, "run": run}))
        old = state_dir / "checkpoint.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    engine.barrier()


def _resume(state_dir: Path, run: dict, engine, model, opt, master, sched) -> tuple[int, list[dict]]:
    """(updates taken, their rows) from a checkpoint of this run, or (0, []) when there is none."""
    ck = state_dir / "checkpoint"
    if not (ck / "state.json").exists():
        return 0, []
    state = json.loads((ck / "state.json").read_text())
    if state["run"] != run:  # as GRPO does: a checkpoint of other settings, data or model is not this run's
        changed = sorted(k for k in run if state["run"].get(k) != run[k])
        log.warning("SFT checkpoint in %s was made with another %s; starting over from step 0", ck, ", ".join(changed))
        return 0, []
    tr = torch.load(ck / "trainer.pt", weights_only=False)
    if engine.shards_state:
        engine.load(ck / "engine")
    else:
        model.load_state_dict(tr["model"])
        opt.load_state_dict(tr["optimizer"])
    if master is not None:
        master.load_state_dict(tr["master_weights"])
    sched.load_state_dict(tr["scheduler"])
    torch.set_rng_state(tr["torch_rng"])
    return state["step"], state["rows"]
