"""Loading and saving policies in the Hugging Face format, whatever built them."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import torch

from r1flow.config import ConfigError, gguf_metadata, gguf_supported_architectures
from r1flow.models.lora import is_lora, merged_copy
from r1flow.provenance import cpu_flags

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_KEY = "device"  # the config key every model-running stage gets (auto | cpu | cuda | cuda:N)


def parse_device(setting: str | None, key: str = DEVICE_KEY) -> str:
    """The `device` setting checked for its form only (auto | cpu | cuda | cuda:N), on any host."""
    setting = "auto" if setting is None else str(setting)
    if setting != "auto":
        try:
            ok = torch.device(setting).type in ("cpu", "cuda") and setting.split(":")[0] in ("cpu", "cuda")
        except (RuntimeError, ValueError):
            ok = False
        if not ok or (setting.startswith("cpu") and setting != "cpu"):
            raise ConfigError(f"config key '{key}': expected auto, cpu, cuda or cuda:N, got {setting!r}")
    return setting


def resolve_device(setting: str | None = "auto", key: str = DEVICE_KEY) -> torch.device:
    """The device a job's models run on, from the config's `device` setting, before any model loads.

    auto: CUDA when torch sees a GPU, else the CPU. cuda (or auto on a GPU node) under torchrun: the local
    rank's GPU (cuda:LOCAL_RANK), made current so that collectives and DeepSpeed use it too. cuda:N as
    given. Asking for CUDA on a host without it stops here, naming the key, instead of training on the CPU
    or failing later on a device mismatch."""
    setting = parse_device(setting, key)
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(setting)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise ConfigError(f"config key '{key}': {setting!r} asked but torch.cuda.is_available() is False on host "
                          f"{socket.gethostname()}")
    if dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.index >= torch.cuda.device_count():
        raise ConfigError(f"config key '{key}': {str(dev)!r} asked but host {socket.gethostname()} has "
                          f"{torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(dev)
    return dev


def cpu_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bfloat16 arithmetic in hardware: x86 avx512_bf16 or AMX, Arm's bf16. Without it,
    PyTorch emulates bfloat16 matmuls in float32 with conversions around them, slower than float32 itself
    (a GRPO step on SmolLM2-135M: 165 s in bfloat16 against 51.6 s in float32 on a Xeon without it)."""
    if cpuinfo is None and not Path("/proc/cpuinfo").exists():
        return True  # not Linux: cannot tell, so no warning
    flags = cpu_flags(cpuinfo)
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def warn_if_bf16_emulated(setting: str, device: torch.device, log) -> bool:
    """A warning naming `setting` when it asks for bfloat16 on a CPU that only emulates it."""
    if device.type != "cpu" or cpu_native_bf16():
        return False
    log.warning(f"{setting}: bfloat16 on a CPU without native bfloat16 arithmetic (no avx512_bf16, AMX or "
                f"Arm bf16 in /proc/cpuinfo) is emulated and runs slower than float32 here; set it to null "
                f"(float32) unless you are checking the bfloat16 path itself")
    return True


def model_device(model) -> torch.device:
    """Where a model's weights are (its first parameter's device)."""
    return next(model.parameters()).device


def _hub_kwargs(name_or_path: str, gguf_file: str | None) -> dict:
    """Keyword arguments of from_pretrained for a folder, a hub id or a GGUF file in either; refuses a hub
    id offline and a GGUF file of an architecture transformers cannot load, before any weight is read."""
    if not os.path.exists(name_or_path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model '{name_or_path}' is not a local path and HF_HUB_OFFLINE=1")
    if not gguf_file:
        return {}
    local = Path(name_or_path, gguf_file)
    if os.path.exists(name_or_path) and not local.exists():
        raise FileNotFoundError(f"GGUF file '{gguf_file}' not found in {name_or_path}")
    if local.exists():
        arch = gguf_architecture(local)
        supported = gguf_supported_architectures()
        if arch is not None and supported and arch not in supported:
            raise ValueError(f"GGUF file {local} holds a '{arch}' model, which transformers cannot load from GGUF "
                             f"(it can: {', '.join(sorted(supported))})")
    return {"gguf_file": gguf_file}


def gguf_architecture(path: str | os.PathLike) -> str | None:
    """The `general.architecture` of a GGUF file (read from its header, no weights loaded)."""
    return gguf_metadata(path, "general.architecture")


def plain_model(model):
    """A model loaded from a GGUF file is dequantized to `dtype` but still marked as GGUF-quantized, and
    save_pretrained refuses it ('quantized with gguf and is not serializable'): drop the marks, so it
    trains and saves as the plain Hugging Face model it now is."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and "gguf" in str(getattr(qc, "quant_method", qc)).lower():
        del model.config.quantization_config
        model.hf_quantizer = None
        for attr in ("is_quantized", "quantization_method"):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    return model


def load_tokenizer(name_or_path: str, gguf_file: str | None = None):
    """The tokenizer of a local folder or hub id, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, **_hub_kwargs(name_or_path, gguf_file))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(auto_class, name_or_path: str, dtype: str = "float32", gguf_file: str | None = None, **kw):
    """The one way every stage loads a model (policy, reward model, student, evaluated model): a local
    folder, a hub id, or a GGUF file (`gguf_file`) in either, as a plain model in `dtype`."""
    model = auto_class.from_pretrained(name_or_path, dtype=DTYPES[dtype], **_hub_kwargs(name_or_path, gguf_file), **kw)
    return plain_model(model)


def load_policy(name_or_path: str, dtype: str = "float32", device: str | torch.device = "cpu",
                gguf_file: str | None = None):
    """A causal LM and its tokenizer from a local folder, a hub id or a GGUF file (the config's `path`
    and `gguf_file`), on `device` (a resolved device; see resolve_device)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(name_or_path, gguf_file)
    model = load_pretrained(AutoModelForCausalLM, name_or_path, dtype, gguf_file).to(device)
    return model, tok


def add_tokens(model, tokenizer, tokens: list[str]) -> int:
    """Add new tokens (e.g. the readable pattern's marker) to a tokenizer and the model's embeddings.
    Each new row starts at the mean of the existing embeddings (input and, when untied, output): a
    point a trained model can reach and score, unlike a random vector far from every real token."""
    n = tokenizer.add_tokens([t for t in tokens if t not in tokenizer.get_vocab()])
    if not n:
        return 0
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
            w = emb.weight
            if w.shape[0] > old:
                w[old:] = w[:old].mean(dim=0, keepdim=True)
    return n


class ShardedRoot(torch.nn.Module):
    """The outermost unit of a model sharded by FSDP2 (r1flow.training.engine.shard_model). FSDP2 gathers a
    unit's weights in its forward's hooks, but the trainers run the decoder and then the output layer's
    weight themselves (chunked log-probs); so the root's weights (embeddings, final norm, lm_head) are
    gathered around `forward(fn, ...)`, which runs `fn(model, ...)` inside one root forward."""

    def __init__(self, model, loaded_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.lm = model
        # the shards are float32 whatever the model was loaded in; exports go back to the loaded dtype
        self.loaded_dtype = loaded_dtype

    def forward(self, fn, *args, **kwargs):
        return fn(self.lm, *args, **kwargs)


def sharded_root(model) -> ShardedRoot | None:
    """The FSDP2 root a sharded model runs under, or None (kept in __dict__, not as a submodule: the root
    holds the model, and a module cycle would loop named_modules())."""
    return model.__dict__.get("_r1flow_sharded_root")


def call_model(model, fn, *args, **kwargs):
    """fn(model, *args, **kwargs), inside the FSDP2 root's forward when the model is sharded."""
    root = sharded_root(model)
    return fn(model, *args, **kwargs) if root is None else root(fn, *args, **kwargs)


def full_parameters(model, dtype: torch.dtype | None = None, state: bool = True):
    """(name, whole tensor) for each entry of the state dict (`state`; tied weights under each name, as
    a sampler loads them) or each parameter, one at a time: a sharded (DTensor) one is gathered from the
    ranks (a collective: every rank iterates), so that no rank ever holds more than one whole parameter
    beyond its own shards. For weight syncs to a sampler and exports."""
    from torch.distributed.tensor import DTensor

    items = model.state_dict(keep_vars=True).items() if state else model.named_parameters()
    for name, p in items:
        t = p.detach()
        t = t.full_tensor() if isinstance(t, DTensor) else t
        yield name, t if dtype is None else t.to(dtype)


def full_state_dict(model, dtype: torch.dtype | None = None, keep: bool = True) -> dict | None:
    """The whole weights on the CPU, gathered a parameter at a time (collective for a sharded model);
    `keep` False (ranks other than the writer) gathers and drops them, returning None."""
    out = {}
    for name, t in full_parameters(model, dtype, state=False):  # tied weights once, as save_pretrained keeps them
        if keep:
            out[name] = t.to("cpu", copy=True)
    return out if keep else None


def load_weights(model, folder: str | os.PathLike) -> None:
    """Load a saved policy's weights into `model` in place, one file at a time: a single
    model.safetensors, or the shards of a large model's save listed in model.safetensors.index.json
    (read by transformers). A tied lm_head is not stored and may be missing; anything else is an error.
    A LoRA model (r1flow.models.lora) takes an adapter folder (`save_policy` of it): the adapter weights
    go into its adapters, the frozen base weights are left as they are."""
    from safetensors.torch import load_file
    from transformers.trainer_utils import load_sharded_checkpoint

    folder = Path(folder)
    if is_lora(model):
        from peft import set_peft_model_state_dict

        if not (folder / "adapter_model.safetensors").exists():
            raise RuntimeError(f"{folder} holds no LoRA adapter (adapter_model.safetensors) for this LoRA model")
        res = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        if getattr(res, "unexpected_keys", None):
            raise RuntimeError(f"the adapter in {folder} does not fit the model: unexpected {res.unexpected_keys}")
        return
    if sharded_root(model) is not None:  # each rank keeps its shard of every whole tensor read
        missing, unexpected = _load_into_shards(model, folder)
    elif (folder / "model.safetensors.index.json").exists():
        missing, unexpected = load_sharded_checkpoint(model, folder, strict=False)
    else:
        missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if unexpected or any(not (tied and "lm_head" in m) for m in missing):
        raise RuntimeError(f"weights in {folder} do not fit the model: missing {missing}, unexpected {unexpected}")


@torch.no_grad()
def _load_into_shards(model, folder: Path) -> tuple[list, list]:
    """A saved folder into an FSDP2-sharded model: every rank reads the files and keeps its shards."""
    import json

    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor, distribute_tensor

    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    params = dict(model.named_parameters())
    seen, unexpected = set(), []
    for f in files:
        for name, t in load_file(str(folder / f)).items():
            p = params.get(name)
            if p is None:
                unexpected.append(name)
                continue
            t = t.to(p.dtype)
            p.copy_(distribute_tensor(t.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                    if isinstance(p, DTensor) else t)
            seen.add(name)
    return [n for n in params if n not in seen], unexpected


def save_policy(model, tokenizer, path: str | os.PathLike, merged: bool = False, state_dict: dict | None = None) -> None:
    """save_pretrained into a sibling folder, then rename: a crash never leaves half a model.
    A LoRA model saves its adapter only (a checkpoint), or with `merged` a plain Hugging Face folder with
    the adapters merged into the weights (an exported stage).

    An FSDP2-sharded model (r1flow.training.engine.shard_model) is saved collectively: call it on every
    rank; the whole weights are gathered a parameter at a time, in the dtype the model was loaded in,
    and rank 0 writes them."""
    path = Path(path)
    root = sharded_root(model)
    if root is not None and state_dict is None:
        main = torch.distributed.get_rank() == 0
        state_dict = full_state_dict(model, root.loaded_dtype, keep=main)
        if not main:
            return
    if merged:
        model = merged_copy(model)
    plain_model(model)  # a model loaded from GGUF saves as a plain folder
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # a sharded model saves the whole weights its caller gathered (full_state_dict)
    model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
