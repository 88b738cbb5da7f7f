"""Where the optimiser step happens: in this process (`LocalEngine`) or sharded by DeepSpeed ZeRO
(`DeepSpeedEngine`), behind one small interface the trainers call:

    engine.backward(loss)   once per micro-batch; gradients accumulate
    engine.step()           clip the global gradient norm, optimiser step, zero the gradients

The learning-rate schedule stays with the trainer (a LambdaLR on the same torch optimiser, whose
param_groups ZeRO keeps using), so it steps once per trainer step whatever mu is, as without DeepSpeed.

Data parallelism. With W ranks each rank computes the loss on its own share of the batch, and
DeepSpeed *averages* gradients over ranks. The trainers normalise each loss by batch-wide constants
(token counts, number of outputs), so a rank's loss is its part of the full-batch loss; multiplying it
by W (`engine.loss_scale`) makes the averaged gradient equal the single-process one. The test
(tests/test_deepspeed.py) checks losses and updated weights against one process.

DeepSpeed is imported only when used; settings come from the config's `training.deepspeed` section:
zero_stage (0, 1 or 2; 3 is refused, see DeepSpeedSettings.from_dict), offload_optimizer (optimiser
states in CPU memory), bf16. On CPU it runs with
DS_ACCELERATOR=cpu and the gloo backend, launched by torchrun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from r1flow.models import model_device


@dataclass
class DeepSpeedSettings:
    enabled: bool = False
    zero_stage: int = 2
    offload_optimizer: bool = False  # optimiser states in CPU memory (ZeRO-Offload)
    bf16: bool = False
    nproc_per_node: int = 1  # torchrun ranks per node for the job (the rule's launcher)
    accelerator: str = "auto"  # "cpu" sets DS_ACCELERATOR=cpu for the job (DeepSpeed on CPU, gloo)

    @classmethod
    def from_dict(cls, d: dict | None) -> "DeepSpeedSettings":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown deepspeed settings {sorted(set(d) - known)}; known: {sorted(known)}")
        s = cls(**d)
        if s.zero_stage == 3:
            # Measured (DeepSpeed 0.19.8, 2 CPU ranks, gloo): a ZeRO-3 SFT step with one micro-batch per
            # rank matches one process (weights to 1e-7), but with two micro-batches per rank (gradient
            # accumulation, which the trainers use) the weights differ by up to 2e-3 after a 1e-3 step:
            # with caller-owned accumulation (managed_gradient_accumulation=False), with a manual
            # boundary, and with DeepSpeed's own (gradient_accumulation_steps=2, step() per micro-batch),
            # with tied or untied embeddings. Stages 1-2 agree to 1e-6 either way. Refused until resolved.
            raise ValueError("zero_stage 3 is not supported: its updates disagreed with one process in our test "
                             "(see r1flow/training/engine.py)")
        if s.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {s.zero_stage}")
        if s.accelerator not in ("auto", "cpu", "cuda"):
            raise ValueError(f"accelerator must be auto, cpu or cuda, got {s.accelerator!r}")
        return s


def deepspeed_config(s: DeepSpeedSettings, max_grad_norm: float) -> dict:
    """The DeepSpeed JSON config for a trainer that owns its micro-batching (see module docstring)."""
    zero = {"stage": s.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        # the trainer calls backward() per micro-batch and step() once per update; DeepSpeed's own
        # batch accounting is then only bookkeeping, so it is set to one sample per rank
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": s.bf16},
        # the trainers' own torch.optim.AdamW, so that one process and ZeRO run the same update rule
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class LocalEngine:
    """One process: plain autograd and torch.optim."""

    rank, world_size, loss_scale = 0, 1, 1.0
    shards_state = False  # the optimiser state is the caller's torch optimiser's state_dict

    def __init__(self, model, optimizer, max_grad_norm: float):
        self.model, self.optimizer, self.max_grad_norm = model, optimizer, max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def barrier(self) -> None:
        pass

    def all_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def all_gather(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


def init_distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, initialising DeepSpeed's process group once."""
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=None)  # the accelerator's backend: gloo on CPU
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


class DeepSpeedEngine:
    """ZeRO through deepspeed.initialize; the model and optimiser are the caller's."""

    shards_state = True  # each rank holds part of the optimiser state: save() / load() on every rank

    def __init__(self, model, optimizer, max_grad_norm: float, settings: DeepSpeedSettings):
        import deepspeed

        self.rank, self.world_size = init_distributed()
        self.loss_scale = float(self.world_size)
        self.settings = settings
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(settings, max_grad_norm))
        self.model = model  # the engine's module is this same object (parameters updated in place)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.engine.step()  # reduce (scatter) gradients, clip, update, all-gather, LR step, zero grads

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def barrier(self) -> None:
        torch.distributed.barrier()

    @property
    def comm_device(self) -> torch.device:
        """Where collectives' tensors must live: the model's device (NCCL only moves GPU tensors; gloo, on
        CPU ranks, CPU ones)."""
        return model_device(self.model)

    def all_sum(self, values: list[float]) -> list[float]:
        """Sums over ranks (metrics that each rank computed on its share of the batch)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def all_gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's `rows` (the same shape on all ranks) concatenated along dim 0 in rank order: with
        `shard`'s contiguous shares, the whole batch in its original order. Returned on the CPU."""
        t = rows.to(self.comm_device)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts).cpu()

    def save(self, folder: str | os.PathLike, tag: str = "engine") -> None:
        """Every rank writes its shard of the optimiser state (collective: call on all ranks)."""
        self.engine.save_checkpoint(str(folder), tag=tag)

    def load(self, folder: str | os.PathLike, tag: str = "engine") -> None:
        self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)


def make_engine(model, optimizer, max_grad_norm: float, settings: DeepSpeedSettings | dict | None = None):
    settings = settings if isinstance(settings, DeepSpeedSettings) else DeepSpeedSettings.from_dict(settings)
    if settings.enabled:
        return DeepSpeedEngine(model, optimizer, max_grad_norm, settings)
    return LocalEngine(model, optimizer, max_grad_norm)


def shard(n: int, rank: int, world_size: int, unit: int = 1) -> slice:
    """This rank's contiguous share of n rows, in whole units (GRPO: whole groups of G outputs, whose
    advantages depend on each other). n / unit must divide evenly among the ranks."""
    if n % unit or (n // unit) % world_size:
        raise ValueError(f"{n // unit} units of {unit} rows do not divide among {world_size} ranks")
    per = n // world_size
    return slice(rank * per, (rank + 1) * per)
