"""Token log-probabilities and entropies through the output layer without the whole vocabulary at once.

A causal LM's last step is logits = hidden @ lm_head.T, (rows, length, vocab): at 16 rows x 32,768
tokens x 152k vocabulary that is ~320 GB in float32, and `log_softmax`, its backward and the entropy each
add as much again. Training needs only one number per token (the log-probability of the token that was
sampled or is the label) and, for metrics, the entropy. `linear_logprobs` computes both from the hidden
states in chunks of tokens: each chunk's logits (float32, as before) live only while that chunk is
processed, in the forward and again in the backward, which recomputes them (a custom autograd function:
the idea of the "fused linear cross-entropy" of Liger-Kernel and of verl's chunked log-probs). Peak
memory of this step is one chunk's logits, `chunk` x vocab floats, whatever the length.

Gradients are those of the unchunked computation: d logp[t] / d z = (onehot(token) - softmax(z)) / T for
z = logits / T; they reach the hidden states and lm_head's weight (and bias) like the plain matmul's. The
entropy is detached, as it always was (a metric).

`output_layer(model)` says whether a transformers causal LM computes its logits as lm_head applied to its
decoder's last hidden state, nothing more (no soft-capping or scaling), so that callers may use
`linear_logprobs` on the decoder's output; otherwise they compute the logits the model's own way.

`set_activation_checkpointing` / `activation_checkpointing` turn on and read transformers' per-layer
activation (gradient) checkpointing under whichever name the installed transformers gives it; the
lean forward of `fast_llama` follows the same flag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear_logprobs", "output_layer", "chunk_rows", "CHUNK_ELEMENTS", "set_activation_checkpointing",
           "activation_checkpointing", "compute_dtype"]

# Logits per chunk: 2^24 float32 = 64 MiB (110 tokens of a 152k vocabulary: matmuls still large enough
# to run at full speed). The backward holds two or three such buffers at once.
CHUNK_ELEMENTS = 2 ** 24

# Causal LMs whose logits are exactly lm_head(decoder(...).last_hidden_state): class name -> decoder attribute.
_PLAIN_HEAD = {"LlamaForCausalLM": "model", "Qwen2ForCausalLM": "model", "Qwen3ForCausalLM": "model",
               "MistralForCausalLM": "model", "GPT2LMHeadModel": "transformer"}


def chunk_rows(vocab: int, chunk_size: int | None = None) -> int:
    """Tokens per chunk: `chunk_size` if given, else as many as fit CHUNK_ELEMENTS logits (at least 1)."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return int(chunk_size)
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def compute_dtype(device) -> torch.dtype | None:
    """The dtype of mixed precision (torch.autocast) in force on `device`'s type, or None."""
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _chunk_logits(hidden, weight, bias, temperature: float):
    """float32 logits / temperature of one chunk of tokens (n, vocab): the only vocabulary-wide tensor."""
    z = F.linear(hidden, weight, bias).float()
    return z / temperature if temperature != 1.0 else z


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk, with_entropy, entropy_grad=False):
        N = hidden.shape[0]
        logp = hidden.new_empty(N, dtype=torch.float32)
        lse = hidden.new_empty(N, dtype=torch.float32)
        ent = hidden.new_empty(N if with_entropy else 0, dtype=torch.float32)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            z = _chunk_logits(hidden[s:e], weight, bias, temperature)
            lz = torch.logsumexp(z, -1)
            lse[s:e] = lz
            logp[s:e] = z.gather(-1, tokens[s:e, None]).squeeze(-1) - lz
            if with_entropy:
                lp = z.sub_(lz[:, None])  # log_softmax, in place of the logits
                ent[s:e] = -(lp.exp() * lp).sum(-1)
            del z
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, ent if entropy_grad else None)
        ctx.temperature, ctx.chunk = temperature, chunk
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        # a low-precision weight's gradient is summed over the chunks in float32 (each chunk's product
        # runs in the low precision, as a plain matmul's backward would: a float32 one is ~4x slower), then cast
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if (need_b and bias is not None) else None
        use_ent = ent is not None and g_ent is not None and g_ent.numel() > 0
        none = (None,) * 5
        if (g_logp is None and not use_ent) or not (need_h or need_w or need_b):
            return grad_h, grad_w, grad_b, *none
        N = hidden.shape[0]
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            g = g_logp[s:e].float() if g_logp is not None else hidden.new_zeros(e - s, dtype=torch.float32)
            # d logp / d z = onehot - softmax(z); times the incoming gradient, divided by T for z = logits / T
            lp = _chunk_logits(hidden[s:e], weight, bias, T).sub_(lse[s:e, None])  # log_softmax
            if use_ent:
                # d H / d z = -p (log p + H) for H = -sum p log p (an entropy bonus or penalty in the loss)
                coef = -g[:, None] - g_ent[s:e, None].float() * (lp + ent[s:e, None])
                dz = lp.exp_().mul_(coef)
            else:
                dz = lp.exp_().mul_(-g[:, None])
            dz.scatter_add_(-1, tokens[s:e, None], g[:, None])
            if T != 1.0:
                dz.div_(T)
            dz = dz.to(hidden.dtype)
            if need_h:
                grad_h[s:e] = dz @ weight
            if need_w:
                if acc == dz.dtype:
                    grad_w.addmm_(dz.t(), hidden[s:e])
                else:
                    grad_w += dz.t() @ hidden[s:e]
            if grad_b is not None:
                grad_b += dz.sum(0, dtype=acc)
            del dz
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, *none


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0, with_entropy: bool = False,
                    chunk_size: int | None = None, entropy_grad: bool = False):
    """log_softmax(F.linear(hidden, weight, bias).float() / temperature) at `tokens`, in chunks of tokens.

    hidden (..., H); tokens (...) long; weight (vocab, H). Returns logps (...) float32 with autograd to
    hidden, weight and bias, and the float32 entropy of the same distribution (...) or None: detached,
    unless `entropy_grad` (an entropy term in the loss, verl's entropy_coeff).
    At most `chunk_size` tokens' logits (default: `chunk_rows(vocab)`) exist at any time.
    """
    shape = tokens.shape
    if hidden.shape[:-1] != shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match tokens {tuple(shape)}")
    chunk = chunk_rows(weight.shape[0], chunk_size)
    cd = compute_dtype(hidden.device)
    if cd is not None:
        # mixed precision: autocast would run this function's forward matmuls in its dtype but not its
        # backward's (autograd runs a custom backward outside autocast); cast the inputs here, so both
        # run in that dtype and the weight's gradient flows back to the float32 parameter through the cast
        hidden, weight = hidden.to(cd), weight.to(cd)
        bias = bias.to(cd) if bias is not None else None
    h = hidden.reshape(-1, hidden.shape[-1])
    t = tokens.reshape(-1)
    logp, ent = _LinearLogprobs.apply(h, weight, bias, t, float(temperature), chunk,
                                      bool(with_entropy or entropy_grad), bool(entropy_grad))
    return logp.view(shape), (ent.view(shape) if (with_entropy or entropy_grad) else None)


def output_layer(model):
    """(decoder, lm_head) when `model`'s logits are exactly lm_head(decoder(...).last_hidden_state), else None."""
    attr = _PLAIN_HEAD.get(type(model).__name__)
    head = getattr(model, "lm_head", None)
    if attr is None or type(head) is not nn.Linear:
        return None
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    decoder = getattr(model, attr, None)
    return None if decoder is None else (decoder, head)


def set_activation_checkpointing(model, on: bool = True) -> None:
    """Recompute each decoder layer in the backward (on) or keep its activations (off)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def activation_checkpointing(model) -> bool:
    """Whether `model` has per-layer activation checkpointing turned on."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA (PEFT) wrapper
    if isinstance(getattr(type(model), "is_activation_checkpointing", None), property):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))
