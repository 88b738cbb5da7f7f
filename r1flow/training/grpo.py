"""The GRPO training loop of R1-Zero (section 2.2), top to bottom:

    for each step:
        draw `prompts_per_step` questions q and sample G = num_generations outputs each from pi_theta_old
        score every output with the configured rule-based rewards (weighted sum)
        A_i = group-normalised rewards (eq. 3)
        log-probs under pi_theta_old (the sampling policy) and pi_ref (frozen base model, for eq. 2)
        mu = num_iterations times: minimise the negative of eq. 1 over the batch (micro-batched)
        every eval_every steps: pass@1 on held-out validation prompts (Figure 2); keep the best
        every save_every steps: checkpoint to the state folder, from which a killed run resumes

The state folder lies outside the rule's declared outputs: Snakemake deletes the outputs of a failed
job, and the checkpoint must survive that for the rerun to resume from.

With DeepSpeed (`deepspeed={"enabled": True, "zero_stage": 2, ...}`, launched by torchrun), every rank
samples the whole batch with the same seed and weights (so the same completions), and computes the loss
and gradients on its own share of the groups; ZeRO shards the gradients and optimiser states. Sampling
is thus replicated, not sharded, in this version: the update is what DeepSpeed distributes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from r1flow import rewards as R
from r1flow.config import require_positive
from r1flow.data.prompts import chat_prompt, render
from r1flow.evaluation import sample_and_grade, summarize
from r1flow.generation import SamplingParams, make_generator
from r1flow.models import load_weights, save_policy
from r1flow.models.chunked import set_activation_checkpointing
from r1flow.training.engine import DeepSpeedSettings, make_engine, shard
from r1flow.training.grpo_loss import Normalizer, group_advantages, grpo_loss, loss_mask
from r1flow.training.logprobs import completion_logprobs

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    # sampling from pi_theta_old
    prompts_per_step: int = 16
    num_generations: int = 8  # G
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    template: str = "table1"
    # eq. 1-3
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO clip-higher when > epsilon
    beta: float = 0.04
    num_iterations: int = 1  # mu
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    importance_sampling_level: str = "token"
    mask_truncated_completions: bool = False
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    reward_options: dict = field(default_factory=dict)  # the config's `rewards` section (limits, language)
    # optimisation
    steps: int = 300
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 0  # outputs per forward/backward (any number, not only whole groups); 0 = the whole batch
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward (less memory)
    # held-out validation during training (Figure 2) and checkpoint choice
    eval_every: int = 25
    eval_prompts: int = 128
    eval_k: int = 4
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    select_checkpoint: str = "best"  # best (by validation pass@1) | last
    save_every: int = 50
    seed: int = 0
    fast_path: bool = True
    generation_batch_size: int = 512

    @classmethod
    def from_dict(cls, d: dict) -> "GRPOConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GRPO settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def __post_init__(self):
        # the config schema refuses these too; the Python API must not train on NaN log-probs either
        require_positive("temperature", self.temperature)

    # Settings that leave the training trajectory as it is: when and how validation runs (it draws from
    # its own random stream), when checkpoints are saved, which one is exported, and how many sequences
    # are decoded at once (a memory setting; after a change the sampled batches are other draws from the
    # same distribution), and whether layers are recomputed in the backward (gradient checkpointing: a
    # memory setting, same gradients). A checkpoint made with other values of these is resumed.
    NOT_TRAJECTORY = ("eval_every", "eval_prompts", "eval_k", "eval_temperature", "eval_top_p",
                      "select_checkpoint", "save_every", "generation_batch_size", "gradient_checkpointing")

    def trajectory(self) -> dict:
        """The settings a checkpoint must share with this run to be resumed."""
        return {k: v for k, v in asdict(self).items() if k not in self.NOT_TRAJECTORY}


class GRPOTrainer:
    def __init__(self, model, ref_model, tokenizer, cfg: GRPOConfig, train: pd.DataFrame,
                 validation: pd.DataFrame | None, state_dir: str | os.PathLike, deepspeed: dict | None = None,
                 generation: dict | None = None, model_path: str | None = None):
        """`deepspeed`: the config's training.deepspeed section; `generation`: its generation section
        (backend), with `model_path` the policy's folder or hub id for a vLLM engine."""
        self.model, self.ref_model, self.tok, self.cfg = model, ref_model, tokenizer, cfg
        self.train_df = train.reset_index(drop=True)
        self.val_df = None if validation is None else validation.head(cfg.eval_prompts).reset_index(drop=True)
        self.state_dir = Path(state_dir)
        if cfg.micro_batch_size < 0:
            raise ValueError(f"micro_batch_size must be 0 (the whole batch) or positive, got {cfg.micro_batch_size}")
        if cfg.gradient_checkpointing:  # transformers' flag, which the fast forward follows too
            set_activation_checkpointing(model, True)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.99))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        # ZeRO-3 is refused by DeepSpeedSettings (and GRPO's sampling and r1flow.models.fast_llama would
        # also need to gather the partitioned weights)
        ds = DeepSpeedSettings.from_dict(deepspeed)
        self.engine = make_engine(model, self.opt, cfg.max_grad_norm, ds)
        self.rank, self.world_size = self.engine.rank, self.engine.world_size
        if self.world_size > 1 and (generation or {}).get("backend") == "vllm":
            raise ValueError("the vllm generation backend with several DeepSpeed ranks is not supported yet")
        # which policy training started from: a checkpoint made from another starting model (an upstream
        # stage was rerun) must not be resumed, even when the GRPO settings are the same
        self.start_fingerprint = weights_fingerprint(model)
        self.generator = make_generator(model, tokenizer, generation, model_path=model_path,
                                        batch_size=cfg.generation_batch_size, seed=cfg.seed, fast=cfg.fast_path)
        self.step_no = 0
        self.best = {"step": 0, "val_pass@1": -1.0}
        self.history: list[dict] = []
        # Rewards per kind of prompt (section 2.3.4: rule-based rewards for reasoning prompts, reward models
        # for general ones); a flat {name: weight} applies to every prompt.
        nested = all(isinstance(v, dict) for v in cfg.rewards.values())
        self.weights_by_kind = ({k: {n: float(w) for n, w in v.items()} for k, v in cfg.rewards.items()} if nested
                                else {"reasoning": {n: float(w) for n, w in cfg.rewards.items()}})
        kinds = set(self.train_df["kind"]) if "kind" in self.train_df else {"reasoning"}
        missing = kinds - set(self.weights_by_kind)
        if missing:
            raise ValueError(f"no rewards configured for prompts of kind {sorted(missing)}")
        for weights in self.weights_by_kind.values():
            for name in weights:
                R.get(name)  # fail now, not after the first sampling, on an unknown reward

    # -- schedule and data -------------------------------------------------------------------------
    def _lr_factor(self, s: int) -> float:
        c = self.cfg
        warm = min(1.0, (s + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        if c.lr_scheduler == "cosine":
            progress = min(1.0, s / max(1, c.steps))
            return warm * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm

    def _batch(self, step: int) -> pd.DataFrame:
        """Prompts of a step: a fixed shuffle per epoch, derived from the seed, so a resumed run sees
        exactly the prompts an uninterrupted one would. With several kinds of prompt (reasoning and
        general, section 2.3.4), every step takes each kind in proportion to its share (at least one)."""
        B = self.cfg.prompts_per_step
        if "kind" not in self.train_df or self.train_df["kind"].nunique() == 1:
            return self.train_df.iloc[self._draw(np.arange(len(self.train_df)), step, B, 0)]
        groups = {k: np.flatnonzero(self.train_df["kind"].to_numpy() == k) for k in sorted(set(self.train_df["kind"]))}
        quota = {k: max(1, round(B * len(ix) / len(self.train_df))) for k, ix in groups.items()}
        largest = max(quota, key=lambda k: len(groups[k]))
        quota[largest] = max(1, B - sum(q for k, q in quota.items() if k != largest))
        idx = []
        for j, (k, ix) in enumerate(groups.items()):
            idx.extend(ix[self._draw(ix, step, quota[k], j)].tolist())
        return self.train_df.iloc[idx]

    def _draw(self, pool: np.ndarray, step: int, b: int, stream: int) -> list[int]:
        """Positions in `pool` of step `step`'s b prompts: walk a per-epoch permutation of the pool."""
        n, start, out = len(pool), (step - 1) * b, []
        while len(out) < b:
            epoch, offset = divmod(start + len(out), n)
            perm = np.random.RandomState(self.cfg.seed * 100003 + epoch + 7919 * stream).permutation(n)
            out.extend(perm[offset : offset + b - len(out)].tolist())
        return out

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> dict:
        c, G = self.cfg, self.cfg.num_generations
        self.step_no += 1
        batch = self._batch(self.step_no)
        prompts = [self._prompt(q) for q in batch["question"]]

        t0 = time.perf_counter()
        out = self.generator.generate(prompts, SamplingParams(G, c.temperature, c.top_p, c.max_completion_length))
        t_gen = time.perf_counter() - t0

        total, per = self._score(batch, out.texts, G)
        rewards = torch.tensor(total, dtype=torch.float32)
        advantages = group_advantages(rewards, G, c.scale_rewards)
        mask = loss_mask(out.completion_mask, out.truncated, c.mask_truncated_completions)
        norm = Normalizer.of(mask, c.max_completion_length)
        N = len(out.texts)
        # this rank's whole groups (all of them in one process); micro-batches within them
        mine = shard(N, self.rank, self.world_size, G)
        mb = c.micro_batch_size or (mine.stop - mine.start)
        chunks = [slice(i, min(i + mb, mine.stop)) for i in range(mine.start, mine.stop, mb)]

        def logps(model, sl, with_entropy=False):
            return completion_logprobs(model, out.prompt_ids[sl], out.prompt_mask[sl], out.completion_ids[sl],
                                       out.completion_mask[sl], G, c.temperature, with_entropy, c.fast_path)

        with torch.no_grad():
            ref = [logps(self.ref_model, sl)[0] for sl in chunks] if (c.beta and self.ref_model is not None) else None
            # with mu = 1 the old policy is the current one: its log-probs are the detached current ones
            old = [logps(self.model, sl)[0] for sl in chunks] if c.num_iterations > 1 else None

        self.model.train()
        stats = {"tokens": 0.0, "clipped_tokens": 0.0, "kl_sum": 0.0}
        entropy_sum, loss_sum = 0.0, 0.0
        for it in range(c.num_iterations):
            self.engine.zero_grad()
            for j, sl in enumerate(chunks):
                lp, ent = logps(self.model, sl, with_entropy=it == 0)
                loss, st = grpo_loss(
                    lp, old[j] if old is not None else lp.detach(), ref[j] if ref is not None else None,
                    advantages[sl], mask[sl], epsilon=c.epsilon, epsilon_high=c.epsilon_high, beta=c.beta,
                    loss_type=c.loss_type, importance_sampling_level=c.importance_sampling_level, normalizer=norm)
                # the normalizer is batch-wide, so this is the chunk's part of the full-batch loss;
                # x W because DeepSpeed averages gradients over the W ranks
                self.engine.backward(loss * self.engine.loss_scale)
                loss_sum += loss.item() / c.num_iterations
                for k in stats:
                    stats[k] += st[k]
                if ent is not None:
                    entropy_sum += (ent * out.completion_mask[sl]).sum().item()
            self.engine.step()  # clip the global gradient norm, update
        if hasattr(self.generator, "sync_weights"):  # an external engine (vLLM) samples the next batch
            self.generator.sync_weights(self.model)
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        self.model.eval()
        t_train = time.perf_counter() - t0 - t_gen
        # each rank saw its share of the batch: sum the sums
        loss_sum, entropy_sum, *vals = self.engine.all_sum([loss_sum, entropy_sum, *stats.values()])
        stats = dict(zip(stats, vals))

        n_tok = max(1.0, float(out.completion_mask.sum()))
        row = {
            "step": self.step_no,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "accuracy": _mean_score(per.get("accuracy")),
            "format_rate": _mean_score(per.get("format", per.get("format_readable"))),
            "kl": stats["kl_sum"] / max(1.0, stats["tokens"]) if ref is not None else None,
            "clip_fraction": stats["clipped_tokens"] / max(1.0, stats["tokens"]),
            "entropy": entropy_sum / n_tok,
            "completion_length": float(out.lengths.float().mean()),
            "truncated_fraction": float(out.truncated.float().mean()),
            "learning_rate": lr,
            "loss": loss_sum,
            "time_generation": t_gen,
            "time_training": t_train,
        }
        for name, rs in per.items():
            s = np.array([r.score for r in rs if r is not None])
            row[f"reward/{name}_mean"], row[f"reward/{name}_std"] = float(s.mean()), float(s.std())
        return row

    def _prompt(self, question: str) -> str:
        # "chat": the tokenizer's chat template (models after the cold start); else a named template
        return chat_prompt(self.tok, question) if self.cfg.template == "chat" else render(question, self.cfg.template)

    def _score(self, batch: pd.DataFrame, texts: list[str], G: int):
        """Weighted reward sums, each prompt with the rewards of its kind; per[name] has None where a
        reward does not apply. Reward models also see the question (section 2.3.4)."""
        kinds = list(batch["kind"]) if "kind" in batch else ["reasoning"] * len(batch)
        total, per = [0.0] * len(texts), {}
        for kind, weights in self.weights_by_kind.items():
            idx = [i for i in range(len(texts)) if kinds[i // G] == kind]
            if not idx:
                continue
            t, p = R.score_batch([texts[i] for i in idx], [str(batch["answer"].iloc[i // G]) for i in idx], weights,
                                 self.cfg.reward_options, prompts=[batch["question"].iloc[i // G] for i in idx])
            for j, i in enumerate(idx):
                total[i] = t[j]
            for name, rs in p.items():
                col = per.setdefault(name, [None] * len(texts))
                for j, i in enumerate(idx):
                    col[i] = rs[j]
        return total, per

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> dict:
        c = self.cfg
        params = SamplingParams(c.eval_k, c.eval_temperature, c.eval_top_p, c.max_completion_length)
        problems = self.val_df.assign(benchmark="validation", problem_id=self.val_df["prompt_id"])
        prompts = [self._prompt(q) for q in problems["question"]]
        # the accuracy reward, whatever the training rewards, and the same grading as the evaluation stage
        fmt = "format_readable" if c.template == "chat" else "format"
        # validation draws from the sampler's generator but leaves its state as it found it, so when and
        # how often validation runs does not change the training samples (nor the resume fingerprint)
        rng = self.generator.state_dict()
        try:
            s = summarize(sample_and_grade(self.generator, problems, prompts, params, "accuracy", c.reward_options,
                                           format_reward=fmt))
        finally:
            self.generator.load_state_dict(rng)
        return {"val_pass@1": s["pass@1"], "val_format_rate": s["format_rate"], "val_length": s["mean_length"]}

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _save_checkpoint(self):
        tmp, final = self.state_dir / "checkpoint.tmp", self.state_dir / "checkpoint"
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.engine.barrier()
        distributed = self.engine.shards_state
        if distributed:  # each rank writes its shard of the optimiser state
            self.engine.save(tmp / "engine")
            self.engine.barrier()
        if self.is_main:
            save_policy(self.model, self.tok, tmp / "model")
            opt = {} if distributed else {"optimizer": self.opt.state_dict()}
            torch.save({**opt, "scheduler": self.sched.state_dict(),
                        "generator": self.generator.state_dict(), "torch_rng": torch.get_rng_state(),
                        "python_rng": random.getstate()}, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": self.step_no, "best": self.best,
                                                        "history": self.history, "settings": asdict(self.cfg),
                                                        "start": self.start_fingerprint,
                                                        "world_size": self.world_size}))
            old = self.state_dir / "checkpoint.old"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            if old.exists():
                shutil.rmtree(old)
            self._prune_best()  # the checkpoint now names the best; older best folders are not needed
        self.engine.barrier()

    def _best_dir(self, step: int) -> Path:
        # one folder per best step, so a checkpoint's best record always names weights that exist: a new
        # best saved after the last checkpoint (then a crash) cannot replace the one the checkpoint names
        return self.state_dir / f"best-step{step}"

    def _prune_best(self):
        """Remove every best-step folder except the one self.best names."""
        for d in self.state_dir.glob("best-step*"):
            if d != self._best_dir(self.best["step"]):
                shutil.rmtree(d)

    def _try_resume(self) -> bool:
        ck = self.state_dir / "checkpoint"
        if not (ck / "state.json").exists():
            return False
        state = json.loads((ck / "state.json").read_text())
        then, now = state.get("settings", {}), asdict(self.cfg)
        changed = sorted(k for k in set(then) | set(now) if then.get(k, "<unset>") != now.get(k, "<unset>"))
        differs = [k for k in changed if k not in GRPOConfig.NOT_TRAJECTORY]
        if differs:
            log.warning("checkpoint in %s was made with other training settings (%s); starting over from step 0",
                        ck, ", ".join(f"{k}: {then.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}" for k in differs))
            return False
        if state.get("start") != self.start_fingerprint:
            log.warning("checkpoint in %s started from another model; starting over", ck)
            return False
        distributed = self.engine.shards_state
        if distributed != (ck / "engine").exists() or state.get("world_size", 1) != self.world_size:
            log.warning("checkpoint in %s was made with another engine or number of ranks; starting over", ck)
            return False
        if changed:
            log.info("resuming %s; changed settings apply from now on: %s", ck,
                     ", ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed))
        load_weights(self.model, ck / "model")
        tr = torch.load(ck / "trainer.pt", weights_only=False)
        if distributed:
            self.engine.load(ck / "engine")
        else:
            self.opt.load_state_dict(tr["optimizer"])
        self.sched.load_state_dict(tr["scheduler"])
        self.generator.load_state_dict(tr["generator"])
        torch.set_rng_state(tr["torch_rng"])
        random.setstate(tr["python_rng"])
        self.step_no, self.best, self.history = state["step"], state["best"], state["history"]
        if self.is_main:  # bests found after this checkpoint are found again as the run repeats those steps
            self._prune_best()
        if hasattr(self.generator, "sync_weights"):
            self.generator.sync_weights(self.model)
        return True

    # -- the loop ----------------------------------------------------------------------------------
    def train(self, progress: bool = True, stop_after: int | None = None) -> pd.DataFrame:
        """Run to `cfg.steps` (resuming if a checkpoint exists). `stop_after` ends early, for tests
        of resumption."""
        c = self.cfg
        self.state_dir.mkdir(parents=True, exist_ok=True)
        resumed = self._try_resume()
        if resumed:
            log.info("resuming from step %d", self.step_no)
        elif self.val_df is not None and c.eval_every:
            self.history.append({"step": 0, **self.validate()})  # the base model's point on Figure 2
        bar = tqdm(total=c.steps, initial=self.step_no, desc="GRPO", disable=not progress or not self.is_main,
                   mininterval=1.0)
        live = self.state_dir / "metrics_live.csv"
        done_now = 0
        while self.step_no < c.steps:
            row = self.step()
            if self.val_df is not None and c.eval_every and (self.step_no % c.eval_every == 0 or self.step_no == c.steps):
                row.update(self.validate())
                if row["val_pass@1"] > self.best["val_pass@1"]:
                    self.best = {"step": self.step_no, "val_pass@1": row["val_pass@1"]}
                    if self.is_main:
                        save_policy(self.model, self.tok, self._best_dir(self.step_no))
            self.history.append(row)
            if self.is_main:
                pd.DataFrame(self.history).to_csv(live, index=False)  # for watching a run; not an artifact
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.2f}",
                            len=f"{row['completion_length']:.0f}",
                            val=f"{self.best['val_pass@1']:.2f}" if self.best["step"] else "-", refresh=False)
            done_now += 1
            if self.step_no % c.save_every == 0 or self.step_no == c.steps:
                self._save_checkpoint()
            if stop_after is not None and done_now >= stop_after:
                break
        bar.close()
        return self.metrics()

    VAL_COLUMNS = ["val_pass@1", "val_format_rate", "val_length"]

    def metrics(self) -> pd.DataFrame:
        """One row per step; validation columns are empty on steps without a validation (or none at all)."""
        m = pd.DataFrame([h for h in self.history if h["step"] >= 1])
        for col in self.VAL_COLUMNS:
            if col not in m:
                m[col] = float("nan")
        return m

    def validation_curve(self) -> pd.DataFrame:
        return pd.DataFrame([h for h in self.history if "val_pass@1" in h], columns=["step", *self.VAL_COLUMNS])

    def export(self, out_dir: str | os.PathLike) -> int:
        """Write the selected policy (best validation checkpoint or the last) as a HF model folder.
        Returns the step it comes from."""
        best = self._best_dir(self.best["step"])
        if self.cfg.select_checkpoint == "best" and self.best["step"] > 0 and best.exists():
            src, step = best, self.best["step"]
            tmp = Path(out_dir).with_name(f".{Path(out_dir).name}.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
            if Path(out_dir).exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
            return step
        save_policy(self.model, self.tok, out_dir)
        return self.step_no


def _mean_score(rewards) -> float:
    vals = [r.score for r in rewards or [] if r is not None]
    return float(np.mean(vals)) if vals else float("nan")


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """A cheap identity of a model's weights: every tensor's name, shape, first and last values and sum."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1).float().cpu()
        h.update(f"{name}{tuple(p.shape)}{float(flat.double().sum()):.10e}".encode())
        h.update(flat[:64].numpy().tobytes() + flat[-64:].numpy().tobytes())
    return h.hexdigest()[:16]
