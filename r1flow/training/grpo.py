"""The GRPO training loop of R1-Zero (section 2.2), top to bottom:

    for each step:
        draw `prompts_per_step` questions q and sample G = num_generations outputs each from pi_theta_old
        score every output with the configured rule-based rewards (weighted sum)
        A_i = group-normalised rewards (eq. 3)
        log-probs under pi_theta_old (the sampling policy) and pi_ref (frozen base model, for eq. 2)
        mu = num_iterations times: minimise the negative of eq. 1 over the batch (micro-batched)
        every eval_every steps: pass@1 on held-out validation prompts (Figure 2); keep the best
        every save_every steps: checkpoint to the state folder, from which a killed run resumes

Options off by default (GRPOConfig says where each comes from): offline pass-rate filtering of the prompts
before training (pass_rate_band), DAPO's dynamic sampling (a step draws further batches of prompts until
prompts_per_step groups have a reward spread), the reference model replaced by the
policy every ref_model_sync_steps steps, DAPO's soft overlong penalty (the `overlong` reward term),
several updates per rollout (updates_per_rollout mini-batches, each an optimizer step against the sampling
policy), an entropy bonus (entropy_coeff), the policy gradient on high-entropy tokens only
(top_entropy_quantile) and LoRA adapters (lora).

The state folder lies outside the rule's declared outputs: Snakemake deletes the outputs of a failed
job, and the checkpoint must survive that for the rerun to resume from.

With DeepSpeed (`deepspeed={"enabled": True, "zero_stage": 2, ...}`, launched by torchrun), every rank
samples, scores and computes the loss and gradients on its own share of the step's groups; ZeRO shards
the gradients and optimiser states. Rewards are gathered (advantages need a group's rewards, "batch"
scaling all of them), loss normalisers and metrics summed over the ranks. Each group is sampled with its
own seed (from the run's seed, the step and its index in the batch), so a step on W ranks draws the same
completions as in one process (tests/test_deepspeed.py). Validation is sharded the same way: each rank
samples its share of the prompts (each from its own seed) and the grades are gathered. With the vLLM
backend each rank then drives its own engine on its own GPU (generation.vllm.colocate), sleeping while
the rank trains.
"""

from __future__ import annotations

import contextlib
import copy
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
from r1flow.config import ConfigError, require_positive
from r1flow.data.formats import reflections
from r1flow.data.prompts import chat_prompt, render
from r1flow.generation import Completions, SamplingParams, VLLMGenerator, make_generator
from r1flow.memory import PhasePeaks, rss_mb, trim_allocator
from r1flow.models import (load_weights, model_device, save_policy, sharded_root,
                           warn_if_bf16_emulated)
from r1flow.models.chunked import set_activation_checkpointing
from r1flow.models.lora import LoraSettings, add_lora, merged_copy
from r1flow.models.logprobs import completion_logprobs
from r1flow.rewards.grading import sample_and_grade, summarize
from r1flow.training.engine import DeepSpeedSettings, make_engine, master_parameters, shard, shard_model
from r1flow.training.grpo_loss import (Normalizer, group_advantages, groups_with_signal, grpo_loss, loss_mask,
                                       truncated_importance_weights)
from r1flow.training.stopping import CheckpointSchedule, Stopped, StopRequest, weights_fingerprint
from r1flow.training.tracking import open_run

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
    # truncated importance sampling for a vLLM sampler: weight each token's loss by
    # min(pi_theta_old / pi_sampler, cap); None = off (see grpo_loss.truncated_importance_weights)
    vllm_importance_sampling_cap: float | None = None
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
    # "bfloat16": sampling and the log-prob forward/backward run their matmuls in bfloat16 (torch.autocast)
    # while the weights, gradients and optimizer stay in their own dtype (float32): mixed precision, as
    # GPU training runs, and ~2x faster on CPUs with bfloat16 instructions. None = the weights' dtype.
    mixed_precision: str | None = None
    # held-out validation during training (Figure 2) and checkpoint choice
    eval_every: int = 25
    eval_prompts: int = 128
    eval_k: int = 4
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    select_checkpoint: str = "best"  # best (by validation pass@1) | last
    save_every: int = 50
    # also a checkpoint once this many minutes of wall time have passed since the last one (None: by steps
    # only): a job killed at its time limit and resubmitted (the SLURM profile's retries) then loses at most
    # this much, whatever a step costs; the workflow refuses a job whose runtime is not longer
    save_every_minutes: float | None = None
    seed: int = 0
    fast_path: bool = True
    # each step's peak memory by phase (peak_rss_*_mb); it resets the process's peak mark, which the
    # job's own peak-memory accounting (getrusage) then no longer covers, so it is off unless asked for
    memory_by_phase: bool = False
    generation_batch_size: int = 512
    # steps in a row without any learning signal (every group of G outputs with one reward value, so
    # every advantage of eq. 3 is 0) after which training stops with an error; 0 = never
    stop_without_signal_after: int = 0
    # DAPO's dynamic sampling (arXiv 2503.14476, section 3.2; verl's algorithm.filter_groups): a group
    # whose G rewards are all equal has zero advantage and no gradient (eq. 3), so draw further batches of
    # prompts_per_step prompts, drop such groups and keep the first prompts_per_step groups with a reward
    # spread. At most dynamic_sampling_max_batches batches per step (verl's max_num_gen_batches); a step
    # that cannot fill its batch within them stops with an error naming that setting
    dynamic_sampling: bool = False
    dynamic_sampling_max_batches: int = 4
    # open-r1's pass-rate filtering of the prompt set: before training, sample pass_rate_samples outputs
    # of each (reasoning) prompt from the starting policy and keep the prompts whose share of correct
    # ones lies in [low, high] (too easy or too hard prompts give groups without signal); None = off
    pass_rate_band: list | None = None
    pass_rate_samples: int = 8
    # replace pi_ref (eq. 2) by the current policy every N steps (TRL's sync_ref_model /
    # ref_model_sync_steps; R1-Zero's recipe in the R1 paper, section 2.2 / supplementary: every 400
    # steps); 0 or None = never (the frozen base model throughout)
    ref_model_sync_steps: int | None = 0
    # DAPO's soft overlong punishment (arXiv 2503.14476, section 3.4, eq. 13), the reward term `overlong`
    # of r1flow.rewards: 0 up to max_completion_length - overlong_buffer_length tokens, then linear down to
    # -1 at max_completion_length, times overlong_penalty_factor; 0 = off
    overlong_buffer_length: int = 0
    overlong_penalty_factor: float = 1.0
    # several optimizer updates per rollout: the step's outputs cut into this many mini-batches, each one
    # update against the log-probs of the policy that sampled them (TRL's steps_per_generation, verl's
    # ppo_mini_batch_size): from the second update on pi_theta != pi_theta_old and eq. 1's clip matters.
    # Each update's loss is normalised over its own mini-batch; the learning-rate schedule counts steps
    updates_per_rollout: int = 1
    # the entropy of pi_theta per token in the loss (verl's actor.entropy_coeff): objective + coeff x
    # entropy, a bonus for coeff > 0; 0 = off
    entropy_coeff: float = 0.0
    # only the tokens whose entropy under the sampling policy is in the top q of the step's tokens carry
    # the policy-gradient term (Wang et al., "Beyond the 80/20 rule", arXiv 2506.01939: 0.2; TRL's
    # top_entropy_quantile); the KL term keeps every token, as in TRL. 1.0 = every token
    top_entropy_quantile: float = 1.0
    # LoRA adapters (PEFT) instead of full fine-tuning: {r, alpha, dropout, target_modules}
    # (r1flow.models.lora); None or r = 0 = off. Checkpoints hold the adapter, the export is merged
    lora: dict | None = None

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
        if self.mixed_precision not in (None, "bfloat16"):
            raise ValueError(f"mixed_precision must be null or bfloat16, got {self.mixed_precision!r}")
        if self.vllm_importance_sampling_cap is not None:
            require_positive("vllm_importance_sampling_cap", self.vllm_importance_sampling_cap)
        if self.save_every_minutes is not None:
            require_positive("save_every_minutes", self.save_every_minutes)
        if self.dynamic_sampling_max_batches < 1:
            raise ValueError(f"dynamic_sampling_max_batches must be at least 1, got "
                             f"{self.dynamic_sampling_max_batches}")
        if self.pass_rate_band is not None:
            band = list(self.pass_rate_band)
            if len(band) != 2 or not 0 <= band[0] <= band[1] <= 1:
                raise ValueError(f"pass_rate_band must be [low, high] with 0 <= low <= high <= 1, got {band}")
        if self.pass_rate_samples < 1:
            raise ValueError(f"pass_rate_samples must be at least 1, got {self.pass_rate_samples}")
        if (self.ref_model_sync_steps or 0) < 0:
            raise ValueError(f"ref_model_sync_steps must be 0 / null (never) or positive, got "
                             f"{self.ref_model_sync_steps}")
        if not 0 <= self.overlong_buffer_length <= self.max_completion_length:
            raise ValueError(f"overlong_buffer_length must lie in [0, max_completion_length = "
                             f"{self.max_completion_length}], got {self.overlong_buffer_length}")
        if self.overlong_penalty_factor < 0:
            raise ValueError(f"overlong_penalty_factor must be non-negative, got {self.overlong_penalty_factor}")
        if not 1 <= self.updates_per_rollout <= self.prompts_per_step * self.num_generations:
            raise ValueError(f"updates_per_rollout must lie in [1, prompts_per_step x num_generations = "
                             f"{self.prompts_per_step * self.num_generations}] (one output at least per update), "
                             f"got {self.updates_per_rollout}")
        if not 0 < self.top_entropy_quantile <= 1:
            raise ValueError(f"top_entropy_quantile must lie in (0, 1], got {self.top_entropy_quantile}")

    # Settings that leave the training trajectory as it is: when and how validation runs (it draws from
    # its own random stream), when checkpoints are saved, which one is exported, and how many sequences
    # are decoded at once (each group samples from its own seed), whether layers are recomputed in the
    # backward (gradient checkpointing: same gradients) and when to give up on a run without signal. A
    # checkpoint made with other values of these is resumed.
    NOT_TRAJECTORY = ("eval_every", "eval_prompts", "eval_k", "eval_temperature", "eval_top_p",
                      "select_checkpoint", "save_every", "save_every_minutes", "generation_batch_size",
                      "stop_without_signal_after", "gradient_checkpointing")

    # settings added after checkpoints were first written: a checkpoint that lacks them was made with their
    # defaults (all off), so it resumes while they are still at those defaults
    ADDED_SETTINGS = ("dynamic_sampling", "dynamic_sampling_max_batches", "pass_rate_band", "pass_rate_samples",
                      "ref_model_sync_steps", "overlong_buffer_length", "overlong_penalty_factor",
                      "updates_per_rollout", "entropy_coeff", "top_entropy_quantile", "lora")

    def trajectory(self) -> dict:
        """The settings a checkpoint must share with this run to be resumed."""
        return {k: v for k, v in asdict(self).items() if k not in self.NOT_TRAJECTORY}


def check_run(cfg: GRPOConfig, deepspeed: dict | None = None, generation: dict | None = None,
              world_size: int = 1) -> None:
    """What GRPOTrainer refuses in its settings, without a model: called by the trainer, and by the test
    that builds every cluster config's job settings (tests/test_cluster_configs.py)."""
    if cfg.micro_batch_size < 0:  # any positive size: a group of G may be cut across micro-batches
        raise ValueError(f"micro_batch_size must be 0 (the whole batch) or positive, got {cfg.micro_batch_size}")
    DeepSpeedSettings.from_dict(deepspeed)
    gen = generation or {}
    vllm = gen.get("vllm") or {}
    if world_size > 1 and gen.get("backend") == "vllm" and not vllm.get("colocate"):
        # each rank samples its own groups, so each needs its own engine: colocated mode
        raise ValueError("the vllm generation backend with several DeepSpeed ranks needs generation.vllm.colocate: "
                         "true (one vLLM engine per rank, on its own GPU)")
    tp = int(vllm.get("tensor_parallel_size") or 1)
    if gen.get("backend") == "vllm" and tp > 1 and vllm.get("colocate"):
        # one engine per tp ranks: sampling is a collective of the group, which every rank must enter as often
        if world_size % tp:
            raise ValueError(f"generation.vllm.tensor_parallel_size {tp} does not divide the {world_size} training "
                             "ranks (each group of that many ranks shares one colocated engine)")
        if cfg.dynamic_sampling:
            # a rank samples again the kept groups other ranks drew: ranks of one engine would call it unevenly
            raise ValueError("grpo.dynamic_sampling with colocated vLLM at generation.vllm.tensor_parallel_size > 1 "
                             "is not supported; turn one of them off")


class NoLearningSignal(RuntimeError):
    """Every group of every step in a stretch had a single reward value: nothing can be learned."""


# how many steps in a row without signal before the log warns (and again every as many steps)
NO_SIGNAL_WARN_AFTER = 5


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
        # every tensor of a step is made on the policy's device (the config's `device`; cuda:LOCAL_RANK
        # under DeepSpeed); the reference model must be there too
        self.device = model_device(model)
        if cfg.mixed_precision == "bfloat16":
            warn_if_bf16_emulated("grpo.mixed_precision", self.device, log)
        if cfg.gradient_checkpointing:  # transformers' flag, which the fast forward follows too
            set_activation_checkpointing(model, True)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            if model_device(ref_model) != self.device:
                raise ValueError(f"the reference model is on {model_device(ref_model)}, the policy on {self.device}")
        torch.manual_seed(cfg.seed)
        # DeepSpeed's ZeRO-3 is refused by DeepSpeedSettings; FSDP2 (engine fsdp2) shards the weights below
        ds = DeepSpeedSettings.from_dict(deepspeed)
        self.lora = LoraSettings.from_dict(cfg.lora, "grpo.lora")
        if self.lora.enabled:
            if ds.enabled:
                raise ConfigError("grpo.lora with training.deepspeed.enabled is not supported yet (tested in one "
                                  "process only); turn one of them off")
            if (generation or {}).get("backend") == "vllm":
                raise ConfigError("grpo.lora with the vllm generation backend is not supported (the engine would "
                                  "need the merged weights after every update); use the transformers backend")
            # after torch.manual_seed: the adapters' initialisation is the run's (and a resumed run's)
            self.model = model = add_lora(model, self.lora, "grpo.lora")
        # which policy training started from: a checkpoint made from another starting model (an upstream
        # stage was rerun) must not be resumed, even when the GRPO settings are the same
        self.start_fingerprint = weights_fingerprint(model)
        sampler_model = None
        if ds.shards_parameters:  # FSDP2: each rank keeps shards; the sampler gets its own whole copy
            if (generation or {}).get("backend", "transformers") == "transformers":
                sampler_model = copy.deepcopy(model).eval()
            shard_model(model, ds)
            if ref_model is not None:  # sharded too: its forward gathers a layer at a time
                shard_model(ref_model, ds)
        # float32 master weights for a bf16 / fp16 policy in one process (r1flow.training.engine)
        params, master = master_parameters(model, ds)
        if self.lora.enabled:  # the frozen base takes no optimiser state
            params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.engine = make_engine(model, self.opt, cfg.max_grad_norm, ds, master=master)
        self.rank, self.world_size = self.engine.rank, self.engine.world_size
        check_run(cfg, deepspeed, generation, self.world_size)
        self.peaks = PhasePeaks(cfg.memory_by_phase)
        self.gpu_peaks = GPUPhasePeaks(self.device)  # the same phases' peak CUDA memory (on a GPU only)
        self.generator = make_generator(sampler_model or model, tokenizer, generation, model_path=model_path,
                                        batch_size=cfg.generation_batch_size, seed=cfg.seed, fast=cfg.fast_path,
                                        own_copy=sampler_model is not None)
        # an engine of its own (vLLM) samples, with its own copy of the weights, synced after each update
        self.samples_externally = hasattr(self.generator, "sync_weights")
        if cfg.vllm_importance_sampling_cap is not None and not self.samples_externally:
            log.info("vllm_importance_sampling_cap has no effect: the %s sampler is the trained model itself",
                     (generation or {}).get("backend", "transformers"))
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
        if any("overlong" in w for w in self.weights_by_kind.values()):
            raise ValueError("the overlong reward is set by overlong_buffer_length and overlong_penalty_factor "
                             "(its weight) in the GRPO section, not named in `rewards`")
        self.reward_options = cfg.reward_options
        if cfg.overlong_buffer_length:  # DAPO's soft overlong punishment, a reward term for every kind of prompt
            self.weights_by_kind = {k: {**w, "overlong": float(cfg.overlong_penalty_factor)}
                                    for k, w in self.weights_by_kind.items()}
            self.reward_options = {**cfg.reward_options, "overlong": {
                "max_length": cfg.max_completion_length, "buffer_length": cfg.overlong_buffer_length}}
        # batches of prompts_per_step prompts drawn so far: the step number, unless dynamic sampling draws
        # more than one batch in a step
        self.batches_drawn = 0
        self.ref_synced_at = 0  # the step whose policy the reference model is (0: the starting model)
        if cfg.ref_model_sync_steps and ref_model is None:
            log.info("ref_model_sync_steps has no effect: there is no reference model (beta = 0)")
        if cfg.pass_rate_band is not None:
            self.train_df = self._filter_by_pass_rate(self.train_df)

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
    def _group_seed(self, step: int, group: int) -> int:
        """The sampling seed of one group (prompt) of a step, from the run's seed, the step and the group's
        index in the whole batch: the group's G outputs are then the same whichever rank samples it, and a
        resumed run draws what an uninterrupted one would."""
        h = hashlib.sha256(f"grpo-sample:{self.cfg.seed}:{step}:{group}".encode()).digest()
        return int.from_bytes(h[:8], "little") % (2**31)

    def step(self) -> dict:
        """One GRPO step; its metrics row. `rss_mb` is the process's resident memory after the step, once
        the step's tensors are gone and the allocator's free memory is returned to the system."""
        row = self._step()
        n = self.cfg.ref_model_sync_steps
        if n and self.ref_model is not None and self.step_no % n == 0:
            self._sync_reference()
        # every tensor of the step (completions, logits, graphs) was freed when _step returned
        trim_allocator()
        row["rss_mb"], row["peak_rss_mb"] = rss_mb(), self.peaks.run_peak
        return row

    def _step(self) -> dict:
        c, G = self.cfg, self.cfg.num_generations
        self.step_no += 1
        # the step's batch of prompts and its groups' seeds, by batch number: the step number, unless
        # dynamic sampling drew more than one batch in earlier steps (self.batches_drawn counts them)
        first = self.batches_drawn + 1
        batch = self._batch(first)
        # this rank's whole groups (all of them in one process): each rank samples, scores and trains on
        # its own share; rewards and metrics are gathered / summed over the ranks
        groups = shard(len(batch), self.rank, self.world_size)
        local = batch.iloc[groups]
        prompts = [self._prompt(q) for q in local["question"]]
        seeds = [self._group_seed(first, g) for g in range(groups.start, groups.stop)]
        tis = c.vllm_importance_sampling_cap is not None and self.samples_externally

        self.peaks.end()  # what came before this step's sampling is not the step's
        self.gpu_peaks.end(None)
        t0 = time.perf_counter()
        out = self._generate(prompts, seeds, tis)
        t_gen = time.perf_counter() - t0
        # (end() also hands the sampler's freed caches back before training allocates gradients)
        peak = {"sampling": self.peaks.end(), "training": float("nan"), "update": float("nan")}
        self.gpu_peaks.end("sampling")

        total, per = self._score(local, out.texts, G, out.lengths.tolist())
        self.batches_drawn = first
        if c.dynamic_sampling:  # DAPO: refill the batch with groups that have a reward spread
            local, out, total, per, drawn, t_more = self._fill_with_signal(first, local, out, total, per, tis)
            t_gen += t_more
            peak["sampling"] = _nanmax(peak["sampling"], self.peaks.end())
            self.gpu_peaks.end("sampling")
        rewards_local = torch.tensor(total, dtype=torch.float32, device=self.device)
        # advantages per group (eq. 3) from the whole batch's rewards ("batch" scaling needs them all)
        rewards = self.engine.all_gather(rewards_local)
        n_local = len(out.texts)
        mine = slice(self.rank * n_local, (self.rank + 1) * n_local)
        advantages = group_advantages(rewards, G, c.scale_rewards)[mine].to(self.device)  # gathered on the CPU
        mask = loss_mask(out.completion_mask, out.truncated, c.mask_truncated_completions)
        # updates_per_rollout mini-batches of the rollout (contiguous rows), one optimizer update each; each
        # cut into micro-batches of micro_batch_size rows (gradient accumulation within the update)
        U = c.updates_per_rollout
        if U > n_local:
            raise ValueError(f"updates_per_rollout = {U} exceeds the {n_local} outputs of this rank's share of "
                             f"the step: every update needs at least one output")
        cuts = [round(u * n_local / U) for u in range(U + 1)]
        chunks, chunk_update = [], []
        for u in range(U):
            lo, hi = cuts[u], cuts[u + 1]
            mb = c.micro_batch_size or (hi - lo)
            for i in range(lo, hi, mb):
                chunks.append(slice(i, min(i + mb, hi)))
                chunk_update.append(u)
        # the loss normalizers are totals over each update's mini-batch on every rank (the whole batch with
        # one update), so that each rank's micro-batch losses add up to its part of that update's loss
        sums = self.engine.all_sum([v for u in range(U) for m in [mask[cuts[u]:cuts[u + 1]]]
                                    for v in (float((m.sum(1) > 0).sum()), float(m.sum()), float(m.shape[0]))])
        norms = [Normalizer(max(1.0, sums[3 * u]), max(1.0, sums[3 * u + 1]), sums[3 * u + 2], c.max_completion_length)
                 for u in range(U)]
        # each micro-batch's completion columns up to its own longest completion (at least one), so that one
        # long output does not pad every micro-batch to the batch's width; the columns cut are padding
        # (mask 0), which adds nothing to the loss, its gradients or the metrics
        width = out.completion_mask.sum(1)
        cols = [slice(0, max(1, int(width[sl].max())) if out.completion_mask.shape[1] else 0) for sl in chunks]

        def logps(model, j, with_entropy=False, entropy_grad=False):  # float32; the backward runs outside autocast
            sl, cs = chunks[j], cols[j]
            with self._mixed_precision():
                return completion_logprobs(model, out.prompt_ids[sl], out.prompt_mask[sl], out.completion_ids[sl, cs],
                                           out.completion_mask[sl, cs], G, c.temperature, with_entropy, c.fast_path,
                                           entropy_grad=entropy_grad)

        by_entropy = c.top_entropy_quantile < 1.0
        with torch.no_grad():
            ref = ([logps(self.ref_model, j)[0] for j in range(len(chunks))] if (c.beta and self.ref_model is not None)
                   else None)
            # with mu = 1 and one update the old policy is the current one: its log-probs are the detached
            # current ones; otherwise (and for the entropy mask) they are taken before any update
            old_ent = ([logps(self.model, j, with_entropy=by_entropy) for j in range(len(chunks))]
                       if (c.num_iterations > 1 or U > 1 or by_entropy) else None)
        old = [lp for lp, _ in old_ent] if old_ent is not None else None
        pg_masks = [None] * len(chunks)
        if by_entropy:  # the tokens of the top q of the step's entropies (under the sampling policy)
            ents = torch.cat([e[mask[sl, cs].bool()] for (_, e), sl, cs in zip(old_ent, chunks, cols)])
            threshold = torch.quantile(ents.float(), 1.0 - c.top_entropy_quantile) if ents.numel() else 0.0
            pg_masks = [(e >= threshold).float() for _, e in old_ent]
        del old_ent

        self.model.train()
        stats = {"tokens": 0.0, "clipped_tokens": 0.0, "kl_sum": 0.0}
        is_stats = {"is_tokens": 0.0, "is_ratio_sum": 0.0, "is_capped_tokens": 0.0}
        is_w = [None] * len(chunks)  # truncated importance-sampling weights per chunk (fixed over the mu passes)
        use_is = tis and out.sampler_logprobs is not None
        entropy_sum, loss_sum = 0.0, 0.0
        for it in range(c.num_iterations):
            for u in range(U):
                self.engine.zero_grad()
                for j in (j for j in range(len(chunks)) if chunk_update[j] == u):
                    sl, cs = chunks[j], cols[j]
                    lp, ent = logps(self.model, j, with_entropy=it == 0, entropy_grad=c.entropy_coeff != 0)
                    old_j = old[j] if old is not None else lp.detach()
                    if use_is and it == 0:
                        is_w[j], st = truncated_importance_weights(old_j, out.sampler_logprobs[sl, cs], mask[sl, cs],
                                                                   c.vllm_importance_sampling_cap)
                        for k in is_stats:
                            is_stats[k] += st[k]
                    loss, st = grpo_loss(
                        lp, old_j, ref[j] if ref is not None else None,
                        advantages[sl], mask[sl, cs], epsilon=c.epsilon, epsilon_high=c.epsilon_high, beta=c.beta,
                        loss_type=c.loss_type, importance_sampling_level=c.importance_sampling_level,
                        normalizer=norms[u], is_weights=is_w[j], pg_mask=pg_masks[j],
                        entropy=ent if c.entropy_coeff != 0 else None, entropy_coeff=c.entropy_coeff)
                    # the normalizer is the update's, so this is the chunk's part of the update's loss;
                    # x W because DeepSpeed averages gradients over the W ranks
                    self.engine.backward(loss * self.engine.loss_scale)
                    loss_sum += loss.item() / (c.num_iterations * U)
                    for k in stats:
                        stats[k] += st[k]
                    if ent is not None and it == 0:
                        entropy_sum += (ent.detach() * out.completion_mask[sl, cs]).sum().item()
                peak["training"] = _nanmax(peak["training"], self.peaks.end())  # log-probs, loss, backward
                self.gpu_peaks.end("training")
                self.engine.step()  # clip the global gradient norm, update
                peak["update"] = _nanmax(peak["update"], self.peaks.end())
                self.gpu_peaks.end("update")
        if self.samples_externally:  # an external engine (vLLM) samples the next batch: new weights, no stale cache
            self.generator.sync_weights(self.model)
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        self.model.eval()
        t_train = time.perf_counter() - t0 - t_gen

        # each rank saw its share of the batch: sum the sums, gather the per-output values
        n_tok_local = float(out.completion_mask.sum())
        loss_sum, entropy_sum, n_tok, *vals = self.engine.all_sum(
            [loss_sum, entropy_sum, n_tok_local, *stats.values(), *is_stats.values()])
        stats = dict(zip([*stats, *is_stats], vals))
        lengths = self.engine.all_gather(out.lengths.double())
        truncated = self.engine.all_gather(out.truncated.double())
        # re-checked steps per completion ("wait"): reflection growing with length, section 2.2.4
        n_reflect = self.engine.all_gather(torch.tensor([float(reflections(t)) for t in out.texts],
                                                        dtype=torch.float64, device=self.device))
        names = sorted({n for w in self.weights_by_kind.values() for n in w})
        present = self.engine.all_sum([float(n in per) for n in names])
        scores = self.engine.all_gather(torch.tensor(
            [[float("nan") if (n not in per or per[n][i] is None) else float(per[n][i].score) for n in names]
             for i in range(n_local)], dtype=torch.float64, device=self.device).reshape(n_local, len(names)))

        def score_list(name):  # the whole batch's scores of one reward (None where it does not apply)
            col = scores[:, names.index(name)]
            return [None if math.isnan(v) else v for v in col.tolist()]

        row = {
            "step": self.step_no,
            # groups whose G rewards differ: only they carry an advantage (eq. 3), hence a gradient
            "groups_with_signal": float(groups_with_signal(rewards, G).float().mean()),
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "accuracy": _mean_of(score_list("accuracy")) if "accuracy" in names else float("nan"),
            "format_rate": float("nan"),
            "kl": stats["kl_sum"] / max(1.0, stats["tokens"]) if ref is not None else None,
            "clip_fraction": stats["clipped_tokens"] / max(1.0, stats["tokens"]),
            "entropy": entropy_sum / max(1.0, n_tok),
            "completion_length": float(lengths.mean()),
            "reflections": float(n_reflect.mean()),
            "truncated_fraction": float(truncated.mean()),
            "learning_rate": lr,
            "loss": loss_sum,
            "time_generation": t_gen,
            "time_training": t_train,
            # each phase's own peak resident memory (MB): where a step's memory goes
            **{f"peak_rss_{k}_mb": v for k, v in peak.items()},
            # and of CUDA memory, allocated and reserved (peak_gpu_*_mb; no columns off CUDA)
            **self.gpu_peaks.take(),
        }
        for fmt in ("format", "format_readable"):  # the first of the two that this step scored
            if fmt in names and present[names.index(fmt)]:
                row["format_rate"] = _mean_of(score_list(fmt))
                break
        if c.dynamic_sampling:  # completions sampled to fill the batch (DAPO's cost of dynamic sampling)
            row["samples_drawn"], row["prompt_batches_drawn"] = float(drawn[0]), float(drawn[1])
        if tis:  # truncated importance sampling: pi_theta_old / pi_sampler over the tokens, before the cap
            row["is_ratio_mean"] = stats["is_ratio_sum"] / max(1.0, stats["is_tokens"])
            row["is_capped_fraction"] = stats["is_capped_tokens"] / max(1.0, stats["is_tokens"])
        for name, there in zip(names, present):
            if not there:
                continue
            s = np.array([v for v in score_list(name) if v is not None])
            row[f"reward/{name}_mean"], row[f"reward/{name}_std"] = float(s.mean()), float(s.std())
        if "code_accuracy" in per:  # only stages that score code get the column
            row["sandbox_errors"] = self._count_sandbox_errors(per["code_accuracy"])
        return row

    @torch.no_grad()
    def _sync_reference(self) -> None:
        """pi_ref := the current policy (ref_model_sync_steps): R1-Zero's recipe replaces the reference
        model by the latest policy every 400 steps (R1 paper, section 2.2 and its supplementary training
        details); TRL's sync_ref_model with ref_model_mixup_alpha = 1. The KL term of eq. 2 then holds the
        policy near where it was N steps ago rather than near the base model."""
        # a LoRA policy's weights are the base with its adapters merged in
        src = merged_copy(self.model) if self.lora.enabled else self.model
        self.ref_model.load_state_dict(src.state_dict())
        self.ref_synced_at = self.step_no
        if self.is_main:
            log.info("step %d: reference model replaced by the current policy (ref_model_sync_steps = %d)",
                     self.step_no, self.cfg.ref_model_sync_steps)

    def _generate(self, prompts: list[str], seeds: list[int], tis: bool):
        """G completions of each prompt, each group from its own seed, on the policy's device."""
        c = self.cfg
        if getattr(self.generator, "asleep", 0) == 2:
            # a vLLM engine asleep at level 2 has no weights (dynamic sampling draws again after the first
            # batch): load the policy's, which are those it sampled from, unchanged since
            self.generator.sync_weights(self.model)
        # an external engine (vLLM) has its own dtype; the in-process sampler runs under mixed precision
        with self._mixed_precision(not isinstance(self.generator, VLLMGenerator)):
            out = self.generator.generate(
                prompts, SamplingParams(c.num_generations, c.temperature, c.top_p, c.max_completion_length,
                                        logprobs=tis), seeds=seeds)
        if hasattr(self.generator, "sleep"):  # a colocated vLLM engine frees its GPU memory for training
            # the step ends with a weight sync, which reloads every weight: they need not survive the sleep
            self.generator.sleep(weights_reloaded=True)
        return out.to(self.device)  # a no-op for the transformers backend, which samples on the policy's device

    def _fill_with_signal(self, first: int, local: pd.DataFrame, out, total: list, per: dict, tis: bool):
        """DAPO's dynamic sampling (arXiv 2503.14476, section 3.2, eq. 11's constraint 0 < |correct| < G,
        here: the G rewards are not all equal, which is exactly when eq. 3 gives a non-zero advantage).
        Keeps the groups of batch `first` (already sampled and scored) that have a reward spread, then
        samples and scores batches first+1, first+2, ... (their own prompts, each group from its own seed)
        until prompts_per_step such groups are found; the step's batch is the first prompts_per_step of
        them in the order drawn. Returns this rank's share of that batch (prompts, completions, totals,
        per-reward scores), (completions, batches) drawn (whole batches, over all ranks) and the time spent
        sampling after the first batch.

        On W ranks each rank samples its share of every batch drawn, and the gathered rewards tell every
        rank which groups are kept: the same groups as in one process. The kept groups are then split among
        the ranks in order; a rank whose share holds groups another rank sampled samples them again from
        their seeds (a group's completions do not depend on which rank samples it: _group_seed). That costs
        up to (W - 1) / W of a batch of extra sampling per step, and no collective."""
        c, G, B = self.cfg, self.cfg.num_generations, self.cfg.prompts_per_step
        kept: list[tuple[int, int]] = []  # (batch number, group index in it) of the groups kept, in order
        have: dict[tuple[int, int], tuple] = {}  # this rank's kept groups: (prompt row, completions, totals, per)
        b, t_more, n_drawn = first, 0.0, 0

        def store(b, local, out, total, per, groups):
            for j, g in enumerate(groups):
                if (b, g) in kept and (b, g) not in have:
                    rows = list(range(j * G, (j + 1) * G))
                    have[(b, g)] = (local.iloc[[j]], _select_rows(out, rows), [total[i] for i in rows],
                                    {n: [v[i] for i in rows] for n, v in per.items()})

        while True:
            full = self._batch(b)  # its prompts: this rank's share of them are `local`
            groups = range(*shard(len(full), self.rank, self.world_size).indices(len(full)))
            n_drawn += len(full) * G
            rewards = self.engine.all_gather(torch.tensor(total, dtype=torch.float32, device=self.device))
            signal = groups_with_signal(rewards, G).tolist()
            kept += [(b, g) for g, s in enumerate(signal) if s][: B - len(kept)]
            store(b, local, out, total, per, groups)
            if len(kept) >= B:
                break
            if b - first + 1 >= c.dynamic_sampling_max_batches:
                raise NoLearningSignal(
                    f"step {self.step_no}: dynamic sampling found {len(kept)} of prompts_per_step = {B} groups with "
                    f"a reward spread in {b - first + 1} batches of {B} prompts (dynamic_sampling_max_batches = "
                    f"{c.dynamic_sampling_max_batches}); raise dynamic_sampling_max_batches, filter the prompt set "
                    "(pass_rate_band), or turn dynamic_sampling off")
            b += 1
            full = self._batch(b)
            groups = range(*shard(len(full), self.rank, self.world_size).indices(len(full)))
            local = full.iloc[list(groups)]
            t0 = time.perf_counter()
            out = self._generate([self._prompt(q) for q in local["question"]],
                                 [self._group_seed(b, g) for g in groups], tis)
            t_more += time.perf_counter() - t0
            total, per = self._score(local, out.texts, G, out.lengths.tolist())
        self.batches_drawn = b
        share = [kept[g] for g in range(*shard(B, self.rank, self.world_size).indices(B))]
        missing = [k for k in share if k not in have]
        if missing:  # kept groups that another rank sampled: this rank samples them again
            rows = pd.concat([self._batch(kb).iloc[[g]] for kb, g in missing])
            t0 = time.perf_counter()
            again = self._generate([self._prompt(q) for q in rows["question"]],
                                   [self._group_seed(kb, g) for kb, g in missing], tis)
            t_more += time.perf_counter() - t0
            t, p = self._score(rows, again.texts, G, again.lengths.tolist())
            for j, k in enumerate(missing):
                ix = list(range(j * G, (j + 1) * G))
                have[k] = (rows.iloc[[j]], _select_rows(again, ix), [t[i] for i in ix],
                           {n: [v[i] for i in ix] for n, v in p.items()})
        parts = [have[k] for k in share]
        names = sorted({n for *_, p in parts for n in p})
        per = {n: [v for _, o, _, p in parts for v in p.get(n, [None] * len(o.texts))] for n in names}
        return (pd.concat([k[0] for k in parts]), _cat_completions([k[1] for k in parts], self.tok.pad_token_id),
                [t for k in parts for t in k[2]], per, (n_drawn, b - first + 1), t_more)

    def _count_sandbox_errors(self, rewards: list) -> float:
        """Samples whose program the sandbox could not start, over every rank: scored 0, but a failure of
        the host, not the policy. Logged with the sandbox's message; a step where every code sample failed
        so stops the run (it would otherwise train on nothing but zeros)."""
        errors = [r.reason for r in rewards if r is not None and r.reason.startswith("sandbox_error")]
        scored = sum(r is not None for r in rewards)
        n_err, n_scored = self.engine.all_sum([float(len(errors)), float(scored)])
        if n_err:
            log.warning(f"step {self.step_no}: {n_err:.0f} of {n_scored:.0f} code samples hit a sandbox error, "
                        f"scored 0 ({errors[0] if errors else 'on another rank'})")
        if n_scored and n_err == n_scored:
            raise RuntimeError(f"step {self.step_no}: the sandbox could not run any of the {n_scored:.0f} programs "
                               f"({errors[0] if errors else 'see the other ranks'}); check rewards.code_accuracy")
        return n_err

    def _mixed_precision(self, on: bool = True):
        """torch.autocast in the configured dtype (GRPOConfig.mixed_precision), or nothing."""
        if not (on and self.cfg.mixed_precision):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.cfg.mixed_precision))

    def _prompt(self, question: str) -> str:
        # "chat": the tokenizer's chat template (models after the cold start); else a named template
        return chat_prompt(self.tok, question) if self.cfg.template == "chat" else render(question, self.cfg.template)

    def _score(self, batch: pd.DataFrame, texts: list[str], G: int, lengths: list[int] | None = None):
        """Weighted reward sums, each prompt with the rewards of its kind; per[name] has None where a
        reward does not apply. Reward models also see the question (section 2.3.4), length-based rewards
        (overlong) each completion's length in tokens."""
        kinds = list(batch["kind"]) if "kind" in batch else ["reasoning"] * len(batch)
        total, per = [0.0] * len(texts), {}
        for kind, weights in self.weights_by_kind.items():
            idx = [i for i in range(len(texts)) if kinds[i // G] == kind]
            if not idx:
                continue
            # lengths in tokens only where a reward judges them (overlong_buffer_length)
            kw = ({"lengths": [lengths[i] for i in idx]}
                  if lengths is not None and any(R.needs_lengths(R.get(n)) for n in weights) else {})
            t, p = R.score_batch([texts[i] for i in idx], [str(batch["answer"].iloc[i // G]) for i in idx], weights,
                                 self.reward_options, prompts=[batch["question"].iloc[i // G] for i in idx], **kw)
            for j, i in enumerate(idx):
                total[i] = t[j]
            for name, rs in p.items():
                col = per.setdefault(name, [None] * len(texts))
                for j, i in enumerate(idx):
                    col[i] = rs[j]
        return total, per

    # -- offline pass-rate filtering ----------------------------------------------------------------
    def _pass_rate_seed(self, prompt: int) -> int:
        """The sampling seed of training prompt `prompt` in the pass-rate estimate (its own stream)."""
        h = hashlib.sha256(f"grpo-pass-rate:{self.cfg.seed}:{prompt}".encode()).digest()
        return int.from_bytes(h[:8], "little") % (2**31)

    def pass_rates(self, train: pd.DataFrame) -> np.ndarray:
        """Each reasoning prompt's pass rate under the current (starting) policy: the share of
        pass_rate_samples outputs, sampled as training samples them (temperature, top-p, length), that the
        accuracy reward grades correct (a truncated one is wrong, as in evaluation); NaN for prompts of
        another kind (general prompts, scored by reward models, have no pass rate). Each prompt samples
        from its own seed; on several ranks each samples its share and the rates are gathered."""
        c = self.cfg
        reasoning = (train["kind"] == "reasoning").to_numpy() if "kind" in train else np.ones(len(train), bool)
        idx = np.flatnonzero(reasoning)
        per = -(-len(idx) // self.world_size)
        mine = idx[self.rank * per: (self.rank + 1) * per]
        rates = torch.full((per,), float("nan"), dtype=torch.float64, device=self.device)
        params = SamplingParams(c.pass_rate_samples, c.temperature, c.top_p, c.max_completion_length)
        if len(mine):
            problems = train.iloc[mine].assign(benchmark="train", problem_id=[str(i) for i in mine])
            prompts = [self._prompt(q) for q in problems["question"]]
            fmt = "format_readable" if c.template == "chat" else "format"
            with self._mixed_precision(not isinstance(self.generator, VLLMGenerator)):
                seeded = _SeededGenerator(self.generator, [self._pass_rate_seed(int(i)) for i in mine])
                graded = sample_and_grade(seeded, problems, prompts, params, "accuracy", c.reward_options,
                                          format_reward=fmt)
            correct = graded["correct"].to_numpy(dtype=float).reshape(len(mine), c.pass_rate_samples)
            rates[: len(mine)] = torch.tensor(correct.mean(1), dtype=torch.float64)
        elif getattr(self.generator, "collective", False):  # a tensor-parallel engine's rank takes part anyway
            self.generator.generate([], params, seeds=[])
        gathered = self.engine.all_gather(rates).cpu().numpy()[: len(idx)]
        out = np.full(len(train), np.nan)
        out[idx] = gathered
        return out

    def _filter_by_pass_rate(self, train: pd.DataFrame) -> pd.DataFrame:
        """open-r1's offline filtering (its pass-rate filter script; also DAPO's motivation for dynamic
        sampling): prompts the starting policy always or never solves give groups with a single reward, hence
        no gradient (eq. 3). Keeps the reasoning prompts whose pass rate lies in pass_rate_band = [low, high]
        (bounds included) and every prompt of another kind."""
        c = self.cfg
        low, high = c.pass_rate_band
        t0 = time.perf_counter()
        rates = self.pass_rates(train)
        keep = np.isnan(rates) | ((rates >= low) & (rates <= high))
        n_reasoning, kept = int((~np.isnan(rates)).sum()), int((~np.isnan(rates) & keep).sum())
        if self.is_main:
            log.info("pass-rate filter: %d of %d reasoning prompts have a pass rate in [%g, %g] over %d samples "
                     "each (mean pass rate %.3f; %.0f s)", kept, n_reasoning, low, high, c.pass_rate_samples,
                     float(np.nanmean(rates)) if n_reasoning else float("nan"), time.perf_counter() - t0)
        if n_reasoning and not kept:
            raise ValueError(f"pass_rate_band = [{low}, {high}] keeps none of the {n_reasoning} training prompts "
                             f"(mean pass rate {float(np.nanmean(rates)):.3f} over pass_rate_samples = "
                             f"{c.pass_rate_samples} samples each); widen the band")
        self.prompt_pass_rates = rates
        return train[keep].reset_index(drop=True)

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> dict:
        c = self.cfg
        params = SamplingParams(c.eval_k, c.eval_temperature, c.eval_top_p, c.max_completion_length)
        problems = self.val_df.assign(benchmark="validation", problem_id=self.val_df["prompt_id"])
        prompts = [self._prompt(q) for q in problems["question"]]
        # the accuracy reward, whatever the training rewards, and the same grading as the evaluation stage
        fmt = "format_readable" if c.template == "chat" else "format"
        # training samples draw from per-group seeds; validation draws from the generator's own stream and
        # puts it back, so a step's validation samples are the same however often validation runs
        rng = self.generator.state_dict()
        try:
            if self.world_size == 1:
                samples = sample_and_grade(self.generator, problems, prompts, params, "accuracy", c.reward_options,
                                           format_reward=fmt)
            else:
                samples = self._sharded_validation(problems, prompts, params, fmt)
        finally:
            self.generator.load_state_dict(rng)
        s = summarize(samples)
        return {"val_pass@1": s["pass@1"], "val_format_rate": s["format_rate"], "val_length": s["mean_length"]}

    # what the validation metrics are computed from, per sample (summarize's pass@1, format rate, mean length)
    VAL_SAMPLE_COLUMNS = ("correct", "truncated", "format", "completion_tokens")

    def _validation_seed(self, prompt: int) -> int:
        """The sampling seed of validation prompt `prompt` on several ranks, from the run's seed and the
        prompt's index only: its samples are the same whichever rank draws them, and at every validation
        (as one process's stream, put back after each validation, is)."""
        h = hashlib.sha256(f"grpo-validate:{self.cfg.seed}:{prompt}".encode()).digest()
        return int.from_bytes(h[:8], "little") % (2**31)

    def _sharded_validation(self, problems: pd.DataFrame, prompts: list[str], params: SamplingParams,
                            fmt: str) -> pd.DataFrame:
        """Validation on W ranks: each samples and grades its contiguous share of the prompts (1/W of the
        work rather than all of it on every rank), each prompt from its own seed; the per-sample grades are
        gathered in prompt order, so every rank computes the metrics of the whole set, those of one process
        grading the same samples (tests/test_grpo_validation_shards.py)."""
        n, k, W, cols = len(problems), params.n, self.world_size, list(self.VAL_SAMPLE_COLUMNS)
        per = -(-n // W)  # prompts per rank; the last ranks' shares are shorter, or empty
        counts = [max(0, min(n, (r + 1) * per) - r * per) for r in range(W)]
        start = min(n, self.rank * per)
        mine = slice(start, start + counts[self.rank])
        # all_gather takes the same shape from every rank: short shares are padded with NaN rows
        rows = torch.full((per * k, len(cols)), float("nan"), dtype=torch.float64, device=self.device)
        if counts[self.rank]:
            seeded = _SeededGenerator(self.generator, [self._validation_seed(i) for i in range(mine.start, mine.stop)])
            local = sample_and_grade(seeded, problems.iloc[mine], prompts[mine], params, "accuracy",
                                     self.cfg.reward_options, format_reward=fmt)
            rows[: len(local)] = torch.tensor(local[cols].to_numpy(dtype=float), dtype=torch.float64)
        elif getattr(self.generator, "collective", False):  # a tensor-parallel engine's rank takes part anyway
            self.generator.generate([], params, seeds=[])
        gathered = self.engine.all_gather(rows).cpu()  # (W * per * k, columns), rank by rank
        full = torch.cat([gathered[r * per * k: r * per * k + counts[r] * k] for r in range(W)]).numpy()
        out = pd.DataFrame(full, columns=cols)
        out["truncated"] = out["truncated"].astype(bool)
        out["completion_tokens"] = out["completion_tokens"].astype(np.int64)
        return out.assign(problem_id=[p for p in problems["problem_id"] for _ in range(k)],
                          sample=[j for _ in range(n) for j in range(k)])

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
        self._save_model(self.model, tmp / "model")
        if self.ref_synced_at and self.ref_synced_at != self.step_no:
            # a refreshed reference (ref_model_sync_steps) is an older policy: kept beside the model; one
            # refreshed at this very step is the saved model itself
            self._save_model(self.ref_model, tmp / "reference")
        if self.is_main:
            opt = {} if distributed else {"optimizer": self.opt.state_dict()}
            master = getattr(self.engine, "master", None)
            if master is not None:  # the float32 weights the bf16 model is rounded from
                opt["master_weights"] = master.state_dict()
            torch.save({**opt, "scheduler": self.sched.state_dict(),
                        "generator": self.generator.state_dict(), "torch_rng": torch.get_rng_state(),
                        "python_rng": random.getstate()}, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": self.step_no, "best": self.best,
                                                        "history": self.history, "settings": asdict(self.cfg),
                                                        "start": self.start_fingerprint,
                                                        "world_size": self.world_size, **self._added_state()}))
            old = self.state_dir / "checkpoint.old"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            if old.exists():
                shutil.rmtree(old)
            self._prune_best()  # the checkpoint now names the best; older best folders are not needed
        self.engine.barrier()

    def _save_model(self, model, path: Path) -> None:
        """A model folder, written by rank 0 (save_policy: collective for a sharded FSDP2 model, which every
        rank gathers a parameter at a time, in the loaded dtype)."""
        if self.is_main or sharded_root(model) is not None:
            save_policy(model, self.tok, path)

    def _added_state(self) -> dict:
        """What dynamic sampling and reference refresh add to a checkpoint's state.json (nothing when off)."""
        extra = {}
        if self.batches_drawn != self.step_no:
            extra["batches_drawn"] = self.batches_drawn
        if self.ref_synced_at:
            extra["ref_synced_at"] = self.ref_synced_at
        return extra

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
        then = {**{k: getattr(GRPOConfig, k) for k in GRPOConfig.ADDED_SETTINGS}, **state.get("settings", {})}
        now = asdict(self.cfg)
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
        if not getattr(self.engine, "holds_model_state", False):  # FSDP2's engine checkpoint has the weights
            load_weights(self.model, ck / "model")
        tr = torch.load(ck / "trainer.pt", weights_only=False)
        if distributed:
            self.engine.load(ck / "engine")
        else:
            self.opt.load_state_dict(tr["optimizer"])
        master = getattr(self.engine, "master", None)
        if master is not None and "master_weights" in tr:
            master.load_state_dict(tr["master_weights"])
        elif master is not None:  # a checkpoint without them: start from the loaded model's weights
            master.from_model()
        self.sched.load_state_dict(tr["scheduler"])
        self.generator.load_state_dict(tr["generator"])
        torch.set_rng_state(tr["torch_rng"])
        random.setstate(tr["python_rng"])
        self.step_no, self.best, self.history = state["step"], state["best"], state["history"]
        # batches of prompts drawn (dynamic sampling) and the step of the reference's last refresh
        self.batches_drawn = state.get("batches_drawn", self.step_no)
        self.ref_synced_at = state.get("ref_synced_at", 0)
        if self.ref_synced_at and self.ref_model is not None:
            ref = ck / "reference" if self.ref_synced_at != self.step_no else ck / "model"
            load_weights(self.ref_model, ref)
        if self.is_main:  # bests found after this checkpoint are found again as the run repeats those steps
            self._prune_best()
        if self.samples_externally:
            self.generator.sync_weights(self.model)
        return True

    # -- the loop ----------------------------------------------------------------------------------
    def train(self, progress: bool = True, stop_after: int | None = None, tracking: dict | None = None,
              run_config: dict | None = None) -> pd.DataFrame:
        """Run to `cfg.steps` (resuming if a checkpoint exists). `stop_after` ends early, for tests
        of resumption. `tracking`: the job's tracking settings (r1flow.training.tracking), which log every
        metrics row (rank 0), with `run_config` recorded in the run."""
        c = self.cfg
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tracker = open_run(tracking, run_config, main=self.is_main)
        resumed = self._try_resume()
        if resumed:
            log.info("resuming from step %d", self.step_no)
        elif self.val_df is not None and c.eval_every:
            self.history.append({"step": 0, **self.validate()})  # the base model's point on Figure 2
            tracker.log(self.history[-1], 0)
        # disable=None: no bar when stderr is not a terminal (a SLURM log); the log lines below say it all
        bar = tqdm(total=c.steps, initial=self.step_no, desc="GRPO", mininterval=1.0,
                   disable=None if progress and self.is_main else True)
        live = self.state_dir / "metrics_live.csv"
        # one log line per validation, or per checkpoint when validation is off
        log_every, logged = c.eval_every or c.save_every, self.step_no
        done_now, self.no_signal_steps = 0, 0
        # every save_every steps, at the end, by wall time and on SIGTERM (SLURM's time limit, a preemption)
        schedule = CheckpointSchedule(c.save_every, c.save_every_minutes, c.steps, self.engine.all_sum, self.is_main)
        with StopRequest() as stop:  # SIGTERM (SLURM's time limit, a preemption): checkpoint, then stop
            while self.step_no < c.steps:
                row = self.step()
                self._check_signal(row)
                if self.val_df is not None and c.eval_every and (self.step_no % c.eval_every == 0 or self.step_no == c.steps):
                    row.update(self.validate())
                    if row["val_pass@1"] > self.best["val_pass@1"]:
                        self.best = {"step": self.step_no, "val_pass@1": row["val_pass@1"]}
                        self._save_model(self.model, self._best_dir(self.step_no))
                self.history.append(row)
                tracker.log(row, self.step_no)
                if self.is_main:
                    pd.DataFrame(self.history).to_csv(live, index=False)  # for watching a run; not an artifact
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.2f}",
                                len=f"{row['completion_length']:.0f}",
                                val=f"{self.best['val_pass@1']:.2f}" if self.best["step"] else "-", refresh=False)
                if self.is_main and (self.step_no % log_every == 0 or self.step_no == c.steps):
                    log.info(progress_line([h for h in self.history if h["step"] > logged], c.steps, self.best))
                    logged = self.step_no
                done_now += 1
                if schedule.due(self.step_no, stop):
                    self._save_checkpoint()
                    if stop.signum is not None:  # resubmitted (the profile's retries), the job resumes here
                        bar.close()
                        tracker.close()
                        raise Stopped(f"stopped by signal {stop.signum} after step {self.step_no}; checkpoint "
                                      f"saved in {self.state_dir / 'checkpoint'}, from which a rerun resumes")
                if stop_after is not None and done_now >= stop_after:
                    break
        bar.close()
        tracker.close()
        return self.metrics()

    def _check_signal(self, row: dict) -> None:
        """Say so when nothing can be learned: after a stretch of steps in which every group had one reward
        value (all advantages 0, section 2.2's eq. 3), warn with the mean reward and format rate; with
        stop_without_signal_after, stop the run with an error rather than burn hours on it."""
        self.no_signal_steps = 0 if row["groups_with_signal"] > 0 else self.no_signal_steps + 1
        n, limit = self.no_signal_steps, self.cfg.stop_without_signal_after
        if not n:
            return
        recent = [h for h in self.history if h.get("step", 0) > self.step_no - n and "reward_mean" in h] + [row]
        reward = float(np.mean([h["reward_mean"] for h in recent]))
        fmts = [h["format_rate"] for h in recent if not math.isnan(h["format_rate"])]
        fmt = float(np.mean(fmts)) if fmts else float("nan")
        what = (f"no learning signal for {n} step(s) in a row (steps {self.step_no - n + 1}-{self.step_no}): every "
                f"group of {self.cfg.num_generations} outputs had a single reward value, so every advantage is 0; "
                f"mean reward {reward:.3f}, format rate {fmt:.3f}, accuracy {row['accuracy']:.3f}")
        if limit and n >= limit:
            if self.is_main:
                log.error(what)
            raise NoLearningSignal(f"{what}. Stopping (stop_without_signal_after = {limit}): the policy never "
                                   "produces a rewarded output to learn from. Choose easier prompts, a stronger "
                                   "model, more samples (num_generations) or longer completions.")
        warn_at = min(NO_SIGNAL_WARN_AFTER, limit) if limit else NO_SIGNAL_WARN_AFTER
        if self.is_main and n % warn_at == 0:
            log.warning(what)

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
        if self.lora.enabled:  # the checkpoints hold adapters: the export merges them into a plain folder
            step = self.step_no
            if self.cfg.select_checkpoint == "best" and self.best["step"] > 0 and best.exists():
                load_weights(self.model, best)
                step = self.best["step"]
            save_policy(self.model, self.tok, out_dir, merged=True)
            return step
        src = None
        if self.cfg.select_checkpoint == "best" and self.best["step"] > 0 and best.exists():
            src, step = best, self.best["step"]
        elif sharded_root(self.model) is not None:
            # rank 0 alone exports, and a sharded model is gathered by all ranks: the last checkpoint (saved
            # at the end of train()) holds the last weights
            src, step = self.state_dir / "checkpoint" / "model", self.step_no
        if src is not None:
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


def progress_line(rows: list[dict], steps: int, best: dict) -> str:
    """One readable line over the steps since the previous one: means of the training signals (section
    2.2.4's accuracy, reward and response length; KL to the reference, clip fraction and entropy for the
    health of eq. 1), the latest validation pass@1, and where the time went."""
    last = rows[-1]

    def mean(key):
        vals = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
        return float(np.mean(vals)) if vals else float("nan")

    t_gen, t_train = sum(r["time_generation"] for r in rows), sum(r["time_training"] for r in rows)
    val = f"{last['val_pass@1']:.3f}" if "val_pass@1" in last else "-"
    if best["step"]:
        val += f" (best {best['val_pass@1']:.3f} at step {best['step']})"
    return (f"step {last['step']}/{steps}: reward {mean('reward_mean'):.3f}, accuracy {mean('accuracy'):.3f}, "
            f"kl {mean('kl'):.4g}, clip fraction {mean('clip_fraction'):.3f}, entropy {mean('entropy'):.3f}, "
            f"length {mean('completion_length'):.1f}, val pass@1 {val}; time {t_gen:.1f}s generating, "
            f"{t_train:.1f}s training over {len(rows)} step(s)")


def _nanmax(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


class GPUPhasePeaks:
    """The peak CUDA memory of each phase of a step (sampling, training, update), as PhasePeaks records
    resident memory: PyTorch's peak counters read at the end of a phase, then reset. Two per phase, in MB:
    allocated (live tensors) and reserved (held by PyTorch's caching allocator, which is what another
    allocator on the GPU, vLLM's, cannot have). The reset touches nothing but these counters. Off CUDA there
    is nothing to read, and no columns."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.step: dict[str, float] = {}

    def end(self, phase: str | None) -> None:
        """Close `phase` (the largest peak over its repeats, e.g. mu training passes); None: what came before
        the step, not recorded."""
        if self.device is None:
            return
        if phase is not None:
            for kind, read in (("allocated", torch.cuda.max_memory_allocated),
                               ("reserved", torch.cuda.max_memory_reserved)):
                key = f"peak_gpu_{kind}_{phase}_mb"
                self.step[key] = max(self.step.get(key, 0.0), read(self.device) / 2**20)
        torch.cuda.reset_peak_memory_stats(self.device)

    def take(self) -> dict[str, float]:
        """This step's columns (none off CUDA), and a fresh start for the next step."""
        out, self.step = self.step, {}
        return out


class _SeededGenerator:
    """A generator whose `generate(prompts, params)` draws each prompt from its own seed (sample_and_grade
    passes none)."""

    def __init__(self, generator, seeds: list[int]):
        self.generator, self.seeds = generator, seeds

    def generate(self, prompts: list[str], params: SamplingParams):
        return self.generator.generate(prompts, params, seeds=self.seeds)


def _select_rows(out: Completions, rows: list[int]) -> Completions:
    """The completions `rows` of `out`, without the padding columns no kept row uses."""
    ix = torch.tensor(rows, dtype=torch.long, device=out.prompt_ids.device)
    pm, cm = out.prompt_mask[ix], out.completion_mask[ix]
    used_p = torch.nonzero(pm.sum(0) > 0).flatten()
    p0 = int(used_p[0]) if len(used_p) else pm.shape[1]  # prompts are left-padded
    used_c = torch.nonzero(cm.sum(0) > 0).flatten()
    c1 = int(used_c[-1]) + 1 if len(used_c) else 0  # completions right-padded
    lp = None if out.sampler_logprobs is None else out.sampler_logprobs[ix][:, :c1]
    return Completions(out.prompt_ids[ix][:, p0:], pm[:, p0:], out.completion_ids[ix][:, :c1], cm[:, :c1],
                       out.truncated[ix], [out.texts[i] for i in rows], sampler_logprobs=lp)


def _cat_completions(parts: list[Completions], pad_id: int) -> Completions:
    """Completions one after another: prompts left-padded, completions right-padded to the widest."""
    if len(parts) == 1:
        return parts[0]
    P, C = max(p.prompt_ids.shape[1] for p in parts), max(p.completion_ids.shape[1] for p in parts)
    pad = torch.nn.functional.pad

    def cat(name, width, value, left):
        return torch.cat([pad(getattr(p, name), (width - getattr(p, name).shape[1], 0) if left else
                              (0, width - getattr(p, name).shape[1]), value=value) for p in parts])

    lp = (cat("sampler_logprobs", C, 0.0, False) if all(p.sampler_logprobs is not None for p in parts) else None)
    return Completions(cat("prompt_ids", P, pad_id, True), cat("prompt_mask", P, 0, True),
                       cat("completion_ids", C, pad_id, False), cat("completion_mask", C, 0, False),
                       torch.cat([p.truncated for p in parts]), [t for p in parts for t in p.texts],
                       sampler_logprobs=lp)


def _mean_of(values) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")
