"""LoRA adapters (PEFT) on a policy: how most researchers with one GPU run GRPO and SFT.

    model = add_lora(model, {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                     setting="r1_zero.grpo.lora")
    ...train: only the adapter weights require gradients...
    save_policy(model, tok, checkpoint)            # the adapter only (adapter_model.safetensors)
    load_weights(model, checkpoint)                # the adapter back into the same base: resume
    save_policy(model, tok, out, merged=True)      # a plain Hugging Face folder, adapters merged in

The settings are the config's `lora` section of a GRPO or SFT stage; `r: 0` (the default) is off. The
base weights stay frozen, so a checkpoint is the adapter alone: resuming reloads the base from the stage's
input (GRPO checks that it is the same model by its fingerprint) and the adapter on top. The exported
folder is the base with each adapter merged into its linear layer (W + B A x alpha / r: PEFT's
merge_and_unload), loadable without PEFT.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from r1flow.config import ConfigError

__all__ = ["LoraSettings", "add_lora", "is_lora", "merged_copy"]


@dataclass
class LoraSettings:
    r: int = 0  # the adapters' rank; 0 = off
    alpha: float = 16.0  # the update is scaled by alpha / r (LoRA paper, section 4.1)
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"])

    @classmethod
    def from_dict(cls, d: dict | None, setting: str = "lora") -> "LoraSettings":
        d = dict(d or {})
        unknown = set(d) - {"r", "alpha", "dropout", "target_modules"}
        if unknown:
            raise ConfigError(f"{setting}: unknown keys {sorted(unknown)} (known: r, alpha, dropout, target_modules)")
        s = cls(**d)
        if s.r < 0:
            raise ConfigError(f"{setting}.r must be 0 (off) or positive, got {s.r}")
        if s.r and not s.target_modules:
            raise ConfigError(f"{setting}.target_modules is empty: LoRA needs at least one linear layer")
        return s

    @property
    def enabled(self) -> bool:
        return self.r > 0


def is_lora(model) -> bool:
    """Whether `model` carries PEFT adapters (a PeftModel)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _linear_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def add_lora(model, settings: dict | LoraSettings | None, setting: str = "lora"):
    """`model` wrapped with LoRA adapters on `target_modules` (PEFT), or `model` itself when off. Only the
    adapters require gradients. A module name the model lacks is an error naming `setting`."""
    s = settings if isinstance(settings, LoraSettings) else LoraSettings.from_dict(settings, setting)
    if not s.enabled:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ConfigError(f"{setting}.r = {s.r} needs the peft package: pip install 'r1flow[lora]'") from e
    have = _linear_names(model)
    missing = [m for m in s.target_modules if m not in have]
    if missing:
        raise ConfigError(f"{setting}.target_modules: the model has no linear layer named {missing}; its linear "
                          f"layers are {sorted(have)}")
    cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules),
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def merged_copy(model):
    """A plain transformers model with the adapters merged into its weights; `model` is left as it is."""
    return copy.deepcopy(model).merge_and_unload() if is_lora(model) else model
