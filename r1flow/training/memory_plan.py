"""Peak GPU memory of a job, planned from the model's shape and the job's settings, before any job starts.

The workflow calls `require_fits` for each GPU job with the settings exactly as the job receives them (the
JSON of its command line: `--grpo`, `--generation`, `--deepspeed`, `--dtype`, `--settings`, ...). A plan
whose peak exceeds the GPU the job's resources ask for is refused with a `ConfigError` naming the setting
to change and the largest value that fits (found by search over the same estimator); so is a vLLM engine
whose KV cache could not hold one sequence of `max_model_len` tokens (vLLM itself refuses to start then).

What is counted, per GPU (one rank), and where the numbers come from:

* Model state. Mixed-precision AdamW keeps 2 + 2 + 12 bytes per parameter (16-bit weights and gradients;
  fp32 master weights, momentum and variance): ZeRO, Rajbhandari et al. 2020, section 3.1 (K = 12). ZeRO
  stage 1 shards the optimizer state and master weights over the N ranks, stage 2 the gradients too
  (same paper, section 5; DeepSpeed's ZeRO docs); `offload_optimizer` keeps master weights and optimizer
  state in CPU memory (ZeRO-Offload). This project accumulates gradients in fp32 (`grad_accum_dtype: fp32`
  in r1flow/training/engine.py `deepspeed_config`, and `MasterWeights.accumulate` in one process), so an
  fp32 gradient buffer (4 bytes per parameter, sharded like the gradients) comes on top of the 16-bit one.
* Activations of one micro-batch (rows x tokens), counted tensor by tensor for the forward that runs
  (r1flow/models/fast_llama.py for GRPO's log-probs; transformers' Llama/Qwen2 forward for SFT and reward
  models), in the manner of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", section 4.1: 34 s b h bytes per GPT layer with 16-bit activations, plus the
  5 a s^2 b of the attention scores, which fused SDPA / FlashAttention kernels do not store; we count none).
  With gradient checkpointing each layer keeps only its input, and one layer is recomputed at a time.
* The log-prob output layer (r1flow/models/chunked.py): logits exist one chunk of 2^24 floats at a time
  (a few such buffers), plus the fp32 accumulator of lm_head's gradient for 16-bit weights.
* vLLM (generation.backend: vllm): its engine takes gpu_memory_utilization x the GPU's memory while awake;
  asleep (sleep_mode) it keeps nothing there (level 1 moves the weights to CPU memory and drops the KV
  cache, level 2 drops both); without sleep mode it keeps its share while the trainer trains.
* A runtime reserve for the CUDA context, NCCL buffers and the caching allocator's fragmentation.

It is an estimate, on the side of more memory where a tensor's life is uncertain; it has not been checked
against a measured peak on a GPU (no GPU was available to this project). All sizes are in bytes; GiB = 2^30.

This module imports neither torch nor transformers (the workflow loads it in Snakemake's process); the
constants it shares with the training code are checked against it by tests/test_memory_plan.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from r1flow.config import ConfigError

GiB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}

# r1flow.models.chunked.CHUNK_ELEMENTS (not imported: that module needs torch): float32 logits per chunk
LOGITS_CHUNK_ELEMENTS = 2 ** 24
# "The backward holds two or three such buffers at once" (r1flow/models/chunked.py): the chunk's logits,
# their exp / gradient and the low-precision cast of the gradient
LOGITS_CHUNK_BUFFERS = 3
# DeepSpeed's ZeRO defaults (reduce_bucket_size 5e8 elements; engine.py's deepspeed_config sets none): the
# gradient reduction bucket, in the model's dtype
ZERO_REDUCE_BUCKET_ELEMENTS = 500_000_000
# CUDA context (~0.5 GiB), NCCL communicators and allocator fragmentation: a margin, not a measurement
RUNTIME_RESERVE = int(1.5 * GiB)
# prompt tokens assumed when the settings do not bound them: R1's prompts (Table 1 template + question)
# are a few hundred tokens; the cluster configs' max_model_len allows 33,792 - 32,768 = 1,024
DEFAULT_PROMPT_TOKENS = 1024
# reward-model texts (a prompt and a response) when `max_length` is unset: they are truncated to the
# model's own limit, which for Qwen2.5 (32k-128k) would say nothing useful; an assumption, in the plan's notes
DEFAULT_RM_TOKENS = 2048
# vLLM's memory profiling (vllm/v1/worker/gpu_worker.py determine_available_memory): the KV cache gets
# gpu_memory_utilization x total memory minus the weights, the peak activations of a dummy batch of
# max_num_batched_tokens tokens, the sampler's logits for max_num_seqs sequences and CUDA graphs. Defaults
# of vLLM's offline LLM class (vllm/engine/arg_utils.py; they vary with the version and GPU).
VLLM_MAX_NUM_BATCHED_TOKENS = 16384
VLLM_MAX_NUM_SEQS = 256
VLLM_CUDA_GRAPHS = GiB // 2
# the GRPO trainer's transformers-backend decoding batch and sampling (r1flow.models.fast_llama.sample,
# r1flow.models.decoding.sample_next): float32 logits, top-p's sorted values (fp32) and indices (int64),
# probabilities and their cumulative sum: ~24 bytes per row per vocabulary entry
SAMPLER_BYTES_PER_LOGIT = 24

# defaults of the settings read here, as the jobs apply them (GRPOConfig, train_sft, make_generator);
# tests/test_memory_plan.py checks them against the dataclass and signatures
GRPO_DEFAULTS = {"prompts_per_step": 16, "num_generations": 8, "max_completion_length": 64, "beta": 0.04,
                 "num_iterations": 1, "micro_batch_size": 0, "gradient_checkpointing": False,
                 "generation_batch_size": 512, "mixed_precision": None, "fast_path": True}
SFT_DEFAULTS = {"batch_size": 32, "micro_batch_size": 0, "max_length": 256, "gradient_checkpointing": False}
GENERATOR_BATCH_SIZE = 256  # make_generator's default (cold start and rejection sampling pass none)


# -- model shape ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama / Qwen2-style decoder (embeddings, GQA attention, gated MLP, RMSNorms)."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v (its attention has no config switch for them)
    torch_dtype: str = "bfloat16"  # the checkpoint's dtype (what vLLM's dtype "auto" loads)
    max_position_embeddings: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden_size, self.q_dim, self.kv_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)  # q, k, v, o (+ biases)
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        return attn + mlp + 2 * h  # two RMSNorm weights

    @property
    def n_params(self) -> int:
        """Embeddings + layers + final RMSNorm + lm_head (when not tied to the embeddings)."""
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_layers * self.layer_params + self.hidden_size + head

    @property
    def largest_param(self) -> int:
        """Elements of the largest single tensor (the embedding matrix)."""
        return max(self.embedding_params, self.hidden_size * self.intermediate_size)

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """K and V of every layer for one token (vLLM's and our decoders' KV cache); KV heads split over
        tensor-parallel ranks, at least one each."""
        heads = max(1, math.ceil(self.num_key_value_heads / tensor_parallel))
        return 2 * self.num_layers * heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelShape":
        """From a transformers config.json dict (Llama, Qwen2, Mistral-like decoders)."""
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return cls(
            hidden_size=h, num_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads), intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            max_position_embeddings=cfg.get("max_position_embeddings"))


def _qwen(h, layers, heads, kv, inter, vocab, tie, max_pos) -> ModelShape:
    return ModelShape(h, layers, heads, kv, h // heads, inter, vocab, tie, True, "bfloat16", max_pos)


def _llama(h, layers, heads, kv, inter, vocab, max_pos) -> ModelShape:
    return ModelShape(h, layers, heads, kv, h // heads, inter, vocab, False, False, "bfloat16", max_pos)


# Shapes of hub models, for planning without a download: the values of each model's config.json on the
# Hugging Face hub (https://huggingface.co/<id>/blob/main/config.json). Written from the published files;
# the cross-checks name copies of them found in public code (this project cannot reach the hub).
KNOWN_SHAPES: dict[str, ModelShape] = {
    # hidden 896, 24 layers, 14/2 heads, 4864, vocab 151936, tied; cross-checked (several Qwen2.5-0.5B copies)
    "Qwen/Qwen2.5-0.5B": _qwen(896, 24, 14, 2, 4864, 151936, True, 32768),
    # hidden 1536, 28 layers, 12/2 heads, 8960, vocab 151936, tied; cross-checked (Qwen2.5-1.5B-Instruct copies)
    "Qwen/Qwen2.5-1.5B": _qwen(1536, 28, 12, 2, 8960, 151936, True, 131072),
    # hidden 3584, 28 layers, 28/4 heads, 18944, vocab 152064, untied; cross-checked (Qwen2.5-7B(-Instruct)
    # config.json copies); 7,615,616,512 parameters, the model card's 7.61B (6.53B non-embedding)
    "Qwen/Qwen2.5-7B": _qwen(3584, 28, 28, 4, 18944, 152064, False, 131072),
    # hidden 5120, 48 layers, 40/8 heads, 13824, vocab 152064, untied; gives 14,770,033,664 parameters, the
    # 14.770B a public table lists (that table's num_key_value_heads 4 would give 14.52B: its typo)
    "Qwen/Qwen2.5-14B": _qwen(5120, 48, 40, 8, 13824, 152064, False, 131072),
    # hidden 5120, 64 layers, 40/8 heads, 27648, vocab 152064, untied; cross-checked (a Qwen2.5-32B config quoted
    # in full), 32,763,876,352 parameters
    "Qwen/Qwen2.5-32B": _qwen(5120, 64, 40, 8, 27648, 152064, False, 131072),
    # the Math models share their size's architecture with a 4,096-token context (rope_theta 10000); NOT
    # cross-checked here (no copy of their config.json found): from the published files as we know them
    "Qwen/Qwen2.5-Math-1.5B": _qwen(1536, 28, 12, 2, 8960, 151936, True, 4096),
    "Qwen/Qwen2.5-Math-7B": _qwen(3584, 28, 28, 4, 18944, 152064, False, 4096),
    # hidden 4096, 32 layers, 32/8 heads, 14336, vocab 128256, untied; cross-checked (Llama-3(.1)-8B copies)
    "meta-llama/Llama-3.1-8B": _llama(4096, 32, 32, 8, 14336, 128256, 131072),
    # hidden 8192, 80 layers, 64/8 heads, 28672, vocab 128256, untied; cross-checked (Llama-3.1-70B copies)
    "meta-llama/Llama-3.1-70B": _llama(8192, 80, 64, 8, 28672, 128256, 131072),
}
# the Instruct variants have the base models' shapes (the Qwen2.5 instruct configs differ in
# max_position_embeddings, 32768, and the EOS token; Llama's in nothing that is counted here)
for _id in list(KNOWN_SHAPES):
    _qwen_chat = _id.startswith("Qwen/Qwen2.5-") and "Math" not in _id
    KNOWN_SHAPES[_id + "-Instruct"] = (replace(KNOWN_SHAPES[_id], max_position_embeddings=32768) if _qwen_chat
                                       else KNOWN_SHAPES[_id])
del _id, _qwen_chat


def model_shape(path: str | Path | None) -> ModelShape | None:
    """The shape of a local model folder (its config.json), else of a hub id from the Hugging Face cache
    (offline, no network), else from KNOWN_SHAPES; None for anything else (the "tiny" model, unknown ids)."""
    if not path:
        return None
    folder = Path(path)
    if (folder / "config.json").is_file():
        return ModelShape.from_hf_config(json.loads((folder / "config.json").read_text()))
    cached = _cached_config(str(path))
    if cached is not None:
        try:
            return ModelShape.from_hf_config(json.loads(Path(cached).read_text()))
        except (KeyError, TypeError, ValueError):
            pass
    return KNOWN_SHAPES.get(str(path))


def _cached_config(repo_id: str) -> str | None:
    if repo_id.count("/") != 1:  # not a hub id ("tiny", a missing local path)
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id=repo_id, filename="config.json")
    except Exception:  # an id the hub's validator refuses
        return None
    return found if isinstance(found, str) else None


# -- plans ---------------------------------------------------------------------------------------------

@dataclass
class MemoryPlan:
    """Planned GPU memory per phase of a job: phase -> ordered {item: bytes}. The peak is the largest
    phase's total; `kv_check` holds the vLLM KV-cache check where the job runs vLLM."""

    kind: str
    phases: dict[str, dict[str, int]]
    notes: list[str] = field(default_factory=list)
    kv_check: dict | None = None

    def total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak_bytes(self) -> int:
        return self.total(self.peak_phase)

    @property
    def items(self) -> dict[str, int]:
        """The items of the peak phase."""
        return self.phases[self.peak_phase]

    def summary(self) -> str:
        """The peak phase's items in GiB on one line: "weights 14.2, reference 14.2, ..."."""
        return ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.items.items() if v)

    def describe(self) -> str:
        """A readable breakdown in GiB, phase by phase, the peak marked."""
        lines = [f"{self.kind}: planned peak {self.peak_bytes / GiB:.1f} GiB ({self.peak_phase})"]
        for phase, items in self.phases.items():
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"  {phase}: {self.total(phase) / GiB:.1f} GiB{mark}")
            lines.extend(f"    {k:<34} {v / GiB:8.2f}" for k, v in items.items() if v)
        if self.kv_check:
            k = self.kv_check
            lines.append(f"  vLLM KV cache: {k['available'] / GiB:.2f} GiB available, {k['needed'] / GiB:.2f} GiB "
                         f"needed for {k['max_model_len']} tokens")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _bytes_of(dtype: str | None) -> int:
    d = str(dtype or "float32").replace("torch.", "")
    if d not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[d]


def _ranks(deepspeed: dict | None) -> int:
    ds = deepspeed or {}
    return int(ds.get("nproc_per_node", 1)) if ds.get("enabled") else 1


def model_state(shape: ModelShape, dtype: str, deepspeed: dict | None = None, trainable: int | None = None) -> dict:
    """Weights, fp32 master weights, AdamW state and gradients of a trained model on one rank.

    Without DeepSpeed (r1flow/training/engine.py LocalEngine): 16-bit weights get fp32 master copies
    (`master_parameters`) whose fp32 gradients accumulate each micro-batch's 16-bit ones; fp32 weights are
    their own master. With DeepSpeed ZeRO stage s on N ranks: stage >= 1 shards master weights and AdamW's
    m and v (ZeRO's P_os), stage 2 also the gradients (P_os+g); offload_optimizer moves master weights and
    optimizer state to CPU memory and the gradient partitions with them (ZeRO-Offload)."""
    P = shape.n_params if trainable is None else trainable
    a = _bytes_of(dtype)
    ds = deepspeed or {}
    low = a < 4
    if not ds.get("enabled"):
        return {"weights": a * P, "master weights (fp32)": 4 * P if low else 0, "optimizer state (AdamW m, v)": 8 * P,
                "gradients": (a + 4) * P if low else 4 * P}
    N, stage, offload = _ranks(ds), int(ds.get("zero_stage", 2)), bool(ds.get("offload_optimizer"))
    if ds.get("engine") == "fsdp2":
        # FSDP2 (r1flow.training.engine.shard_model): float32 shards of every parameter (the master weights),
        # AdamW state and gradients sharded over N; a forward or backward holds whole copies (compute dtype)
        # of the unit it runs and the one it prefetches (two decoder layers) and of the root (embeddings,
        # lm_head, final norm: gathered for the whole forward)
        c = 2 if ds.get("bf16") else 4
        root = shape.embedding_params * (1 if shape.tie_word_embeddings else 2) + shape.hidden_size
        return {"weights": 4 * P // N, "master weights (fp32)": 0, "optimizer state (AdamW m, v)": 8 * P // N,
                "gathered units (FSDP2: 2 layers + root)": c * (2 * shape.layer_params + root),
                "gradients": 4 * P // N + c * (2 * shape.layer_params + root)}
    shard = N if stage >= 1 else 1
    on_gpu = 0 if offload else 1
    # 16-bit training keeps fp32 master copies; an fp32 model steps on its own weights
    master = (4 * P // shard) * on_gpu if low else 0
    optim = (8 * P // shard) * on_gpu
    bucket = a * (ZERO_REDUCE_BUCKET_ELEMENTS + shape.largest_param)  # reduce bucket + an extra-large grad
    if stage >= 2:
        # the 16-bit partition (grads_in_partition) and its fp32 accumulation (grad_accum_dtype fp32)
        grads = (0 if offload else ((a + (4 if low else 0)) * P // N)) + bucket
    else:
        grads = a * P + (4 * P if low else 0)  # every gradient, and their fp32 accumulators, unsharded
    return {"weights": a * P, "master weights (fp32)": master, "optimizer state (AdamW m, v)": optim,
            "gradients": grads}


def _update_temporaries(shape: ModelShape, dtype: str, deepspeed: dict | None, trainable: int | None = None) -> int:
    """The optimizer step's transient memory: torch's foreach AdamW allocates sqrt(v) for every parameter
    it steps (4 bytes each); ZeRO flattens the gradient partition into an fp32 copy first."""
    P = shape.n_params if trainable is None else trainable
    ds = deepspeed or {}
    if not ds.get("enabled"):
        return 4 * P
    if ds.get("offload_optimizer"):
        return 0  # the step runs on the CPU
    N = _ranks(ds) if int(ds.get("zero_stage", 2)) >= 1 else 1
    return 2 * 4 * P // N


# per-token, per-layer activation bytes saved for the backward (a = the activations' bytes per element)

def layer_activation_bytes_fast(shape: ModelShape, a: int) -> int:
    """r1flow.models.fast_llama's training layer (the maskless layout of long completions), per token:
    each RMSNorm keeps its float32 input (4 h, as transformers' LlamaRMSNorm computes) and its output
    (a h, the next matmul's input); q after rotary (a h), K and V over prompt + completion (2 a kv) and their
    gathered copies (2 a kv); the zero-filled query layout (a h), SDPA's output (a h) and its gathered copy,
    o_proj's input (a h); the gated MLP keeps gate and up (`_SiluMul`, 2 a I) and their product (a I).
    Total 8 h + a (6 h + 4 kv + 3 I): for Qwen2.5-7B in bf16 52.9 h per token per layer, against the 34 h
    of Korthikanti et al.'s GPT layer (whose MLP is 4 h wide, with no gate and no fp32 norm copies)."""
    h, kv, inter = shape.hidden_size, shape.kv_dim, shape.intermediate_size
    return 8 * h + a * (6 * h + 4 * kv + 3 * inter)


def layer_activation_bytes_hf(shape: ModelShape, a: int) -> int:
    """transformers' Llama / Qwen2 decoder layer, per token: the two RMSNorms as above (4 h + a h each);
    q (a h), K and V repeated to every query head for SDPA (2 a h, the conservative case), SDPA's output and
    o_proj's input (2 a h); the MLP keeps gate, act(gate), up and their product (4 a I). 8 h + a (7 h + 4 I)."""
    h, inter = shape.hidden_size, shape.intermediate_size
    return 8 * h + a * (7 * h + 4 * inter)


def layer_inference_bytes(shape: ModelShape, a: int) -> int:
    """Live tensors of one layer in a no-grad forward, per token: the residual, normed input, q, K and V
    (with the gathered copies of the maskless layout), attention output, gate, up and their product."""
    h, kv, inter = shape.hidden_size, shape.kv_dim, shape.intermediate_size
    return 4 * h + a * (4 * h + 4 * kv + 3 * inter)


def activation_bytes(shape: ModelShape, rows: int, tokens: int, a: int, checkpointing: bool,
                     forward: str = "fast") -> int:
    """Saved activations of `rows` sequences of `tokens` tokens through every layer, for the backward.

    Without checkpointing every layer keeps its saved tensors (`layer_activation_bytes_*`). With it
    (torch.utils.checkpoint around each layer, r1flow.models.chunked.set_activation_checkpointing), each
    layer keeps only its input (a h per token), and in the backward one layer at a time is recomputed,
    its saved tensors alive, with the incoming and outgoing gradients (2 a h) and SDPA's dq, dk, dv
    (a (h + 2 kv))."""
    per_layer = (layer_activation_bytes_fast if forward == "fast" else layer_activation_bytes_hf)(shape, a)
    n = rows * tokens
    h, kv, L = shape.hidden_size, shape.kv_dim, shape.num_layers
    if not checkpointing:
        return n * L * per_layer
    return n * (L * a * h + per_layer + 2 * a * h + a * (h + 2 * kv))


def output_layer_bytes(shape: ModelShape, rows: int, tokens: int, a: int, training: bool) -> dict:
    """The final RMSNorm and the chunked log-probs (r1flow.models.chunked.linear_logprobs) over `tokens`
    per row: the norm's fp32 input and its output, the concatenated hidden states that lm_head reads and,
    in the backward, their gradient (4 h + 3 a h per token); the logits of one chunk at a time (a few
    buffers of 2^24 floats); for 16-bit weights the float32 accumulator of lm_head's gradient and its cast."""
    h = shape.hidden_size
    out = {"final norm + lm_head input": rows * tokens * ((4 + 3 * a) * h if training else (4 + a) * h),
           "logits chunk": LOGITS_CHUNK_BUFFERS * LOGITS_CHUNK_ELEMENTS * 4}
    if training and a < 4:
        out["lm_head gradient accumulator"] = shape.embedding_params * (4 + a)
    return out


# -- GRPO --------------------------------------------------------------------------------------------------

def _grpo(settings: dict) -> dict:
    return {**GRPO_DEFAULTS, **(settings.get("grpo") or {})}


def _rows_per_rank(g: dict, ranks: int) -> int:
    return max(1, g["prompts_per_step"] * g["num_generations"] // ranks)


def _model_rewards(g: dict, settings: dict) -> list[str]:
    """The reward models the GRPO job loads on its GPU (section 2.3.4's helpfulness and harmlessness)."""
    weights = g.get("rewards") or {}
    names = set()
    for k, v in weights.items():
        names |= set(v) if isinstance(v, dict) else {k}
    return sorted(n for n in names if n in ("helpfulness", "harmlessness"))


def vllm_reserve(shape: ModelShape, a: int, vllm: dict) -> int:
    """What vLLM's profiling takes from its share besides weights and KV cache (see the constants)."""
    tokens = int(vllm.get("max_num_batched_tokens") or VLLM_MAX_NUM_BATCHED_TOKENS)
    seqs = int(vllm.get("max_num_seqs") or VLLM_MAX_NUM_SEQS)
    tp = int(vllm.get("tensor_parallel_size") or 1)
    h, inter = shape.hidden_size, shape.intermediate_size
    act = tokens * a * (4 * h + 3 * inter // tp)  # the MLP's gate/up output and product dominate
    return act + seqs * shape.vocab_size * 4 * 2 + VLLM_CUDA_GRAPHS


def _vllm_dtype_bytes(shape: ModelShape, vllm: dict, job_dtype: str | None) -> int:
    d = vllm.get("dtype", "auto")
    if d in (None, "auto"):
        d = shape.torch_dtype if shape.torch_dtype in DTYPE_BYTES else (job_dtype or "bfloat16")
    return _bytes_of(d)


def vllm_kv_check(shape: ModelShape, vllm: dict, gpu_bytes: int, job_dtype: str | None = None) -> dict:
    """Whether vLLM's share (gpu_memory_utilization x the GPU) holds its weights, its profiled activations
    and the KV cache of one sequence of max_model_len tokens: vLLM refuses to start otherwise ("To serve at
    least one request with the model's max seq len ... larger than the available KV cache memory"). Returns
    {available, needed, max_model_len, fits, smallest_utilization}."""
    a = _vllm_dtype_bytes(shape, vllm, job_dtype)
    tp = int(vllm.get("tensor_parallel_size") or 1)
    util = float(vllm.get("gpu_memory_utilization", 0.9))
    max_len = int(vllm.get("max_model_len") or shape.max_position_embeddings or 0)
    weights = a * shape.n_params // tp
    fixed = weights + vllm_reserve(shape, a, vllm)
    needed = max_len * shape.kv_bytes_per_token(a, tp)
    available = int(util * gpu_bytes) - fixed
    smallest = math.ceil((fixed + needed) / gpu_bytes * 100) / 100
    return {"available": available, "needed": needed, "max_model_len": max_len, "fits": available >= needed,
            "utilization": util, "smallest_utilization": smallest, "weights": weights}


def plan_grpo(settings: dict, shape: ModelShape, gpu_bytes: int, reward_shapes: dict | None = None) -> MemoryPlan:
    """A GRPO job's rank (scripts/grpo.py): settings {"grpo", "generation", "deepspeed", "dtype",
    optionally "rewards" and "max_prompt_length"}, as the job's --grpo/--generation/--deepspeed/--dtype/--rewards.

    Phases: sampling (vLLM's share, or the in-process decoder's KV cache, beside the training state),
    log-probs (the reference model's and, with num_iterations > 1, the old policy's no-grad forward per
    micro-batch), training (forward and backward of one micro-batch) and update (the optimizer step)."""
    g = _grpo(settings)
    dtype = settings.get("dtype") or "float32"
    w = _bytes_of(dtype)
    # activations are in the matmuls' dtype: the weights', or bfloat16 under mixed precision
    a = 2 if g["mixed_precision"] == "bfloat16" else w
    ds = settings.get("deepspeed") or {}
    gen = settings.get("generation") or {}
    vllm = gen.get("vllm") or {}
    N = _ranks(ds)
    G = g["num_generations"]
    rows_rank = _rows_per_rank(g, N)
    mb = min(g["micro_batch_size"] or rows_rank, rows_rank)
    C = int(g["max_completion_length"])
    P = int(settings.get("max_prompt_length") or DEFAULT_PROMPT_TOKENS)
    fsdp = bool(ds.get("enabled")) and ds.get("engine") == "fsdp2"
    # Llama / Qwen2 run r1flow.models.fast_llama (supported for every shape here); sharded weights (FSDP2)
    # run transformers' forward, which gathers them a layer at a time
    fast = g["fast_path"] and not fsdp

    state = model_state(shape, dtype, ds)
    resident = {k: v for k, v in state.items() if k != "gradients"}
    if ds.get("enabled") and not fsdp and int(ds.get("zero_stage", 2)) >= 2 and not ds.get("offload_optimizer"):
        # ZeRO-2's 16-bit gradient partition stays allocated between steps
        resident["gradient partition (kept)"] = w * shape.n_params // N
    if g["beta"] and g["beta"] > 0:
        # pi_ref: a full no-grad copy (scripts/grpo.py); float32 shards under FSDP2
        resident["reference model"] = 4 * shape.n_params // N if fsdp else w * shape.n_params
    if fsdp and gen.get("backend", "transformers") != "vllm":
        # the in-process sampler's own whole copy (r1flow.generation.SyncedGenerator), as vLLM would hold
        resident["sampler copy (whole weights)"] = w * shape.n_params
    for name in _model_rewards(g, settings):
        rs = (reward_shapes or {}).get(name, shape)
        resident[f"reward model ({name})"] = w * (rs.n_params - (0 if rs.tie_word_embeddings else rs.embedding_params)
                                                  + rs.hidden_size)
    resident["runtime reserve"] = RUNTIME_RESERVE
    notes = []

    phases: dict[str, dict[str, int]] = {}
    kv = None
    backend = gen.get("backend", "transformers")
    if backend == "vllm":
        share = int(float(vllm.get("gpu_memory_utilization", 0.9)) * gpu_bytes)
        phases["sampling"] = {**resident, "vLLM (gpu_memory_utilization)": share}
        kv = vllm_kv_check(shape, vllm, gpu_bytes, dtype)
        awake_while_training = not vllm.get("sleep_mode")
        vllm_training = share if awake_while_training else 0
        if not awake_while_training:
            notes.append(f"vLLM sleeps at level {vllm.get('sleep_level') or 2} while the rank trains: nothing of it "
                         "stays on the GPU")
    else:
        # the trainer's own decoder (r1flow.generation.Generator -> fast_llama.sample): prompts per decoding
        # batch = generation_batch_size // G, each with G rows; K/V pre-allocated for max_completion_length
        per_chunk = max(1, g["generation_batch_size"] // G)
        rows = min(rows_rank, per_chunk * G)
        phases["sampling"] = {**resident,
                              "KV cache (sampling)": rows * C * shape.kv_bytes_per_token(a)
                              + per_chunk * P * shape.kv_bytes_per_token(a),
                              "sampler logits": rows * shape.vocab_size * SAMPLER_BYTES_PER_LOGIT}
        vllm_training = 0
    if vllm_training:
        resident = {**resident, "vLLM (awake, no sleep_mode)": vllm_training}

    T = P + C
    prompts_mb = min(mb, math.ceil(mb / G) + 1)  # unique prompts a micro-batch can span
    if (g["beta"] and g["beta"] > 0) or g["num_iterations"] > 1 or _model_rewards(g, settings):
        logp = {**resident,
                "forward (no grad)": mb * T * layer_inference_bytes(shape, a)
                + shape.num_layers * prompts_mb * P * 2 * shape.kv_dim * a,
                **output_layer_bytes(shape, mb, C, a, training=False)}
        phases["log-probs"] = logp
    # the gradients beyond the partition that stays allocated (counted above)
    grads = state["gradients"] - resident.get("gradient partition (kept)", 0)
    train = {**resident, "gradients": grads}
    if g["mixed_precision"] == "bfloat16" and w == 4:
        train["autocast weight copies (bf16)"] = 2 * shape.n_params  # torch.autocast caches each cast weight
    train["activations"] = activation_bytes(shape, mb, T, a, bool(g["gradient_checkpointing"]),
                                            "fast" if fast else "hf")
    if g["gradient_checkpointing"]:
        # the prompts' K/V of every layer come out of the (checkpointed) prefill and stay for the completions
        train["activations"] += shape.num_layers * prompts_mb * P * 2 * shape.kv_dim * a
    train.update(output_layer_bytes(shape, mb, C, a, training=True))
    phases["training"] = train
    phases["update"] = {**resident, "gradients": grads,
                        "optimizer step temporaries": _update_temporaries(shape, dtype, ds)}
    return MemoryPlan("grpo", phases, notes, kv)


# -- SFT and reward models ---------------------------------------------------------------------------------

def plan_sft(settings: dict, shape: ModelShape, gpu_bytes: int) -> MemoryPlan:
    """An SFT job (scripts/sft.py -> r1flow.training.sft.train_sft): settings {"settings": the SFT section,
    "dtype", optionally "deepspeed"}. Each rank's share of a batch (ceil(batch_size / W) rows), transformers'
    forward over micro_batch_size rows padded to their longest, at most max_length tokens."""
    s = {**SFT_DEFAULTS, **(settings.get("settings") or {})}
    dtype = settings.get("dtype") or "float32"
    a = _bytes_of(dtype)
    ds = settings.get("deepspeed")
    N = _ranks(ds)
    rows = min(s["micro_batch_size"] or s["batch_size"], max(1, math.ceil(s["batch_size"] / N)))
    T = int(s["max_length"])
    state = model_state(shape, dtype, ds)
    resident = {k: v for k, v in state.items() if k != "gradients"}
    resident["runtime reserve"] = RUNTIME_RESERVE
    train = {**resident, "gradients": state["gradients"],
             "activations": activation_bytes(shape, rows, T, a, bool(s["gradient_checkpointing"]), "hf"),
             **output_layer_bytes(shape, rows, T, a, training=True)}
    update = {**resident, "gradients": state["gradients"],
              "optimizer step temporaries": _update_temporaries(shape, dtype, ds)}
    return MemoryPlan("sft", {"training": train, "update": update})


def plan_reward_model(settings: dict, shape: ModelShape, gpu_bytes: int) -> MemoryPlan:
    """Reward-model training (scripts/reward_model.py -> r1flow.training.reward_model): the LM with a
    scalar head instead of lm_head, chosen and rejected scored in one batch (2 x the rank's share of
    batch_size rows), no checkpointing; settings {"settings": {"batch_size", "max_length", ...}, "dtype",
    optionally "deepspeed"}."""
    s = settings.get("settings") or {}
    dtype = settings.get("dtype") or "float32"
    a = _bytes_of(dtype)
    ds = settings.get("deepspeed")
    # every pair of the rank's share (train_reward_model shards a step's pairs over the ranks, ceil(n / W)
    # each) scored chosen and rejected in one forward (score_texts(..., batch_size=len(texts)))
    rows = 2 * math.ceil(int(s.get("batch_size", 16)) / _ranks(ds))
    T = int(s.get("max_length") or DEFAULT_RM_TOKENS)
    notes = [] if s.get("max_length") else [f"texts assumed {DEFAULT_RM_TOKENS} tokens long (max_length unset)"]
    trainable = shape.n_params - (0 if shape.tie_word_embeddings else shape.embedding_params) + shape.hidden_size
    state = model_state(shape, dtype, ds, trainable)
    resident = {k: v for k, v in state.items() if k != "gradients"}
    resident["runtime reserve"] = RUNTIME_RESERVE
    train = {**resident, "gradients": state["gradients"],
             "activations": activation_bytes(shape, rows, T, a, False, "hf"),
             "final norm": rows * T * (4 + a) * shape.hidden_size}
    update = {**resident, "gradients": state["gradients"],
              "optimizer step temporaries": _update_temporaries(shape, dtype, ds, trainable)}
    return MemoryPlan("reward_model", {"training": train, "update": update}, notes)


# -- generation and evaluation -----------------------------------------------------------------------------

def _sampling_of(kind: str, settings: dict) -> tuple[int, int, int]:
    """(samples per prompt, max new tokens, sequences per decoding batch) of a generation job."""
    if kind == "evaluation":  # scripts/evaluate.py: the evaluation section, the benchmark's spec over it
        e = {**(settings.get("evaluation") or {}),
             **{k: v for k, v in (settings.get("spec") or {}).items() if v is not None}}
        return int(e.get("n", 1)), int(e.get("max_new_tokens", 64)), int(e.get("batch_size", GENERATOR_BATCH_SIZE))
    s = settings.get("settings") or {}  # cold start, rejection sampling: sft_data.sample_completions
    return (int(s.get("samples_per_prompt", 1)), int(s.get("max_new_tokens", 64)),
            int(s.get("batch_size", GENERATOR_BATCH_SIZE)))


def plan_generation(kind: str, settings: dict, shape: ModelShape, gpu_bytes: int) -> MemoryPlan:
    """A sampling job (evaluation, cold start, rejection sampling). vLLM: its gpu_memory_utilization share
    (and the KV check); the transformers backend: the weights, the KV cache of a decoding batch
    (batch_size // n prompts x n rows, prompt + max_new_tokens) and the sampler's logits."""
    gen = settings.get("generation") or {}
    dtype = settings.get("dtype") or "float32"
    a = _bytes_of(dtype)
    n, new, batch = _sampling_of(kind, settings)
    P = int(settings.get("max_prompt_length") or DEFAULT_PROMPT_TOKENS)
    if gen.get("backend") == "vllm":
        vllm = gen.get("vllm") or {}
        share = int(float(vllm.get("gpu_memory_utilization", 0.9)) * gpu_bytes)
        return MemoryPlan(kind, {"sampling": {"vLLM (gpu_memory_utilization)": share}},
                          kv_check=vllm_kv_check(shape, vllm, gpu_bytes, dtype))
    per_chunk = max(1, batch // n)
    rows = per_chunk * n
    items = {"weights": a * shape.n_params, "runtime reserve": RUNTIME_RESERVE,
             "KV cache": rows * new * shape.kv_bytes_per_token(a) + per_chunk * P * shape.kv_bytes_per_token(a),
             "sampler logits": rows * shape.vocab_size * SAMPLER_BYTES_PER_LOGIT,
             "prefill (one layer)": per_chunk * P * layer_inference_bytes(shape, a)}
    return MemoryPlan(kind, {"sampling": items})


# -- the entry points --------------------------------------------------------------------------------------

KINDS = ("grpo", "sft", "reward_model", "evaluation", "sampling")


def plan_job(kind: str, settings: dict, shape: ModelShape, gpu_memory_gib: float,
             reward_shapes: dict | None = None) -> MemoryPlan:
    """The memory plan of one GPU (rank) of a job. `kind`: "grpo" (scripts/grpo.py), "sft", "reward_model",
    "evaluation" (scripts/evaluate.py) or "sampling" (cold start, rejection sampling); `settings`: the
    job's JSON arguments by name (see each plan_*); `gpu_memory_gib`: the memory of the GPU it asks for."""
    gpu = int(gpu_memory_gib * GiB)
    if kind == "grpo":
        return plan_grpo(settings, shape, gpu, reward_shapes)
    if kind == "sft":
        return plan_sft(settings, shape, gpu)
    if kind == "reward_model":
        return plan_reward_model(settings, shape, gpu)
    if kind in ("evaluation", "sampling"):
        return plan_generation(kind, settings, shape, gpu)
    raise ValueError(f"unknown job kind {kind!r}; known: {KINDS}")


def check_fits(plan: MemoryPlan, gpu_bytes: int, setting: str | None = None, largest=None,
               job: str | None = None, direction: str = "lower") -> str | None:
    """None if the plan's peak fits `gpu_bytes`; else the refusal: the peak and its items, and the config
    key `setting` to change with `largest`, the largest value that fits (None: no value of it fits)."""
    if plan.peak_bytes <= gpu_bytes:
        return None
    msg = (f"{job or plan.kind}: planned peak {plan.peak_bytes / GiB:.1f} GiB on a {gpu_bytes / GiB:g} GiB GPU "
           f"({plan.peak_phase}: {plan.summary()})")
    if setting is not None:
        msg += (f"; {direction} config key '{setting}' (largest that fits: {largest})" if largest is not None
                else f"; no value of config key '{setting}' fits")
    return msg


def _with(settings: dict, section: str, key: str, value, sub: str | None = None) -> dict:
    """A copy of `settings` with settings[section][key] (or settings[section][sub][key]) = value."""
    out = {**settings, section: {**(settings.get(section) or {})}}
    if sub is None:
        out[section][key] = value
    else:
        out[section][sub] = {**(out[section].get(sub) or {}), key: value}
    return out


def _largest(fits, hi: int, lo: int = 1) -> int | None:
    """The largest integer v in [lo, hi] with fits(v) (fits is monotone: true up to some value), or None."""
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def across_nodes(settings: dict, nodes: int) -> dict:
    """The settings of a job on `nodes` nodes as the plan reads them: its ranks are nodes x nproc_per_node
    (scripts/launch_nodes.py), over which ZeRO and FSDP2 shard and each step's rows divide."""
    ds = settings.get("deepspeed") or {}
    if nodes <= 1 or not ds.get("enabled"):
        return settings
    return {**settings, "deepspeed": {**ds, "nproc_per_node": int(ds.get("nproc_per_node", 1)) * nodes}}


def require_fits(job: str, kind: str, settings: dict, shape: ModelShape | None, gpu_memory_gib: float,
                 key_prefix: str, reward_shapes: dict | None = None, nodes: int = 1) -> MemoryPlan | None:
    """Plan the job and raise ConfigError when it cannot run on its GPU; returns the plan (None when the
    shape is unknown: nothing to plan). `job` names it in the message (e.g. "r1_zero"); `key_prefix` is the
    config section of its settings (e.g. "r1_zero.grpo", "r1.sft", "evaluation"), so that the message names
    the key to change: micro_batch_size for training (max_completion_length / max_length when not even one
    row fits), generation.vllm.gpu_memory_utilization for vLLM, the batch size of in-process sampling.
    `nodes`: the job's node count (resources.<rule>.nodes; see across_nodes)."""
    if shape is None:
        return None
    settings = across_nodes(settings, nodes)
    gpu = int(gpu_memory_gib * GiB)

    def plan(s):
        return plan_job(kind, s, shape, gpu_memory_gib, reward_shapes)

    def fits(s):
        p = plan(s)
        return p.peak_bytes <= gpu and (p.kv_check is None or p.kv_check["fits"])

    p = plan(settings)
    vkey = "generation.vllm.gpu_memory_utilization"
    if p.kv_check is not None and not p.kv_check["fits"]:
        k = p.kv_check
        smallest = k["smallest_utilization"]
        hint = (f"raise config key '{vkey}' (smallest that works: {smallest:.2f})" if smallest <= 1
                else f"no {vkey} is enough: lower generation.vllm.max_model_len or use a larger GPU")
        raise ConfigError(f"{job}: vLLM's share of the {gpu_memory_gib:g} GiB GPU ({k['utilization']:.2f}) leaves "
                          f"{k['available'] / GiB:.2f} GiB for the KV cache after its weights "
                          f"({k['weights'] / GiB:.1f} GiB) and activations, but one sequence of "
                          f"{k['max_model_len']} tokens (generation.vllm.max_model_len) needs "
                          f"{k['needed'] / GiB:.2f} GiB; {hint}")
    if p.peak_bytes <= gpu:
        return p

    def largest_share():
        """The largest gpu_memory_utilization (in hundredths) with which the whole plan fits; fitting is
        true from the KV check's smallest share up to some value, so the search starts there."""
        lo = max(1, round(p.kv_check["smallest_utilization"] * 100)) if p.kv_check else 1
        v = _largest(lambda v: fits(_with(settings, "generation", "gpu_memory_utilization", v / 100, "vllm")), 99, lo)
        return None if v is None else v / 100

    def over(plan_, phases):  # whether any of `phases` exceeds the GPU
        return any(plan_.total(ph) > gpu for ph in plan_.phases if ph in phases)

    training_phases = ("log-probs", "training", "update")
    if kind in ("grpo", "sft", "reward_model") and over(p, training_phases):
        section = {"grpo": "grpo", "sft": "settings", "reward_model": "settings"}[kind]
        key = "batch_size" if kind == "reward_model" else "micro_batch_size"
        if kind == "grpo":
            hi = _rows_per_rank(_grpo(settings), _ranks(settings.get("deepspeed")))
        elif kind == "sft":
            hi = int({**SFT_DEFAULTS, **(settings.get("settings") or {})}["batch_size"])
        else:
            hi = int((settings.get("settings") or {}).get("batch_size", 16))
        current = (settings.get(section) or {}).get(key) or hi  # 0: the whole batch

        def trains(s):  # the sampling phase is the other settings' business (below)
            return not over(plan(s), training_phases)

        largest = _largest(lambda v: trains(_with(settings, section, key, v)), min(hi, current) - 1)
        if largest is not None:
            raise ConfigError(check_fits(p, gpu, f"{key_prefix}.{key}", largest, job))
        awake = "vLLM (awake, no sleep_mode)"
        if any(awake in p.phases[ph] for ph in training_phases if ph in p.phases):
            # vLLM keeps its share while the rank trains: a smaller share (or sleep_mode) is the way
            largest = largest_share()
            raise ConfigError(check_fits(p, gpu, vkey, largest, job)
                              + "; vLLM keeps it while the rank trains: or set generation.vllm.sleep_mode: true")
        # not even one row: the length, at one row, or the model state itself
        one = _with(settings, section, key, 1)
        lkey = {"grpo": "max_completion_length", "sft": "max_length", "reward_model": "max_length"}[kind]
        longest = _largest(lambda v: trains(_with(one, section, lkey, v)), 1 << 20)
        base = check_fits(p, gpu, job=job)
        if longest is not None:
            raise ConfigError(f"{base}; even {key_prefix}.{key} 1 does not fit: set it to 1 and lower config key "
                              f"'{key_prefix}.{lkey}' (largest that fits: {longest})")
        tiny = plan(_with(one, section, lkey, 1))
        worst = max((ph for ph in training_phases if ph in tiny.phases), key=tiny.total)
        big = [k for k, v in sorted(tiny.phases[worst].items(), key=lambda kv: -kv[1]) if v > gpu // 20]
        raise ConfigError(f"{base}; even one row of one token does not fit: what stays on the GPU ({', '.join(big)}) "
                          f"needs {tiny.total(worst) / GiB:.1f} GiB in the {worst} phase (fewer models on the GPU, "
                          "more ranks with ZeRO, training.deepspeed.offload_optimizer, a smaller model or a larger "
                          "GPU)")
    if "vLLM (gpu_memory_utilization)" in p.phases.get("sampling", {}):
        # vLLM's share beside the training state: the largest share (in hundredths) that fits and still
        # holds its KV cache
        raise ConfigError(check_fits(p, gpu, vkey, largest_share(), job))
    # in-process sampling (the transformers backend): the sequences decoded at once
    if kind == "grpo":
        g = _grpo(settings)
        section, key, lo, hi = "grpo", "generation_batch_size", g["num_generations"], g["generation_batch_size"] - 1
    elif kind == "evaluation":
        n, _, batch = _sampling_of(kind, settings)
        section, key, lo, hi = "evaluation", "batch_size", n, batch - 1
    else:  # cold start and rejection sampling decode make_generator's default batch: only the length is theirs
        _, new, _ = _sampling_of(kind, settings)
        section, key, lo, hi = "settings", "max_new_tokens", 1, new - 1
    largest = _largest(lambda v: fits(_with(settings, section, key, v)), hi, lo=lo)
    raise ConfigError(check_fits(p, gpu, f"{key_prefix}.{key}", largest, job))
