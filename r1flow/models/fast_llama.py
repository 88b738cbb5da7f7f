"""A lean functional forward pass over the weights of a transformers Llama / Qwen2 causal LM.

For tiny models on CPU, the transformers forward is dominated by Python overhead: mask construction,
cache bookkeeping (DynamicCache concatenates the whole cache on every decode step) and module dispatch.
GRPO needs exactly two things from the policy, and this module does both without that overhead while
reading the parameters of the Hugging Face module in place (nothing is copied out of it, and gradients
flow to its parameters):

* `sample`: prefill the M unique prompts once and decode all M*n rows one token per step. The prompt
  K/V are kept once per prompt (the n rows of a prompt score against them in one matmul, which is the
  n-fold repeat without its copies and memory traffic); generated K/V go into pre-allocated buffers,
  written in place (no concatenation per step).
* `completion_logprobs`: the training forward. The M prompts run once, their K/V are indexed per
  completion row (with autograd, so the gradient of every completion reaches the shared prompt
  computation), and the completion tokens attend to [prompt keys ; causal completion keys] (through a
  mask tensor while it is small, else a causal SDPA without one). lm_head runs only where a logit is needed, a chunk of tokens at a
  time (`r1flow.models.chunked`): memory is linear in the completion length.

`supports(model)` says whether a model uses only the features implemented here; callers fall back to
the model's own forward otherwise. Rotary cos/sin come from the model's own `rotary_emb`; only rope types
whose frequencies are fixed (`_EXACT_ROPE`) are accepted, since those give the same cos/sin whether a
sequence is run at once (training) or token by token (sampling).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from r1flow.config import require_positive
from r1flow.models.decoding import sample_next
from r1flow.models.chunked import activation_checkpointing, compute_dtype, linear_logprobs

__all__ = ["supports", "sample", "completion_logprobs"]

# Concatenating q/k/v (and gate/up) weights costs one copy of them per call; worth it for the small
# models this is for (fewer, larger matmuls), not for big ones, where separate matmuls are as fast.
_FUSE_MAX_ELEMENTS = 64 * 1024 * 1024
# Training attention with a mask tensor when it has at most this many elements (rows x query heads per
# KV head x completion tokens x keys): then only the completion tokens are queries (2.6x faster than the
# maskless causal layout at 200 prompt + 116 completion tokens, measured on CPU); beyond it (long
# completions) the maskless layout keeps memory linear in the length. (SDPA may expand a boolean mask
# to floats: at most 64 MB here.)
_MASK_MAX_ELEMENTS = 16 * 1024 * 1024
# Rope types whose frequencies are fixed, tested equal to the HF forward past max_position_embeddings.
# `dynamic` and `longrope` rescale with the longest position of the call (transformers'
# `dynamic_rope_update`), so a one-shot forward and incremental decoding disagree (by ~5 nats measured):
# refused, the model's own forward is used instead.
_EXACT_ROPE = ("default", "linear", "yarn", "llama3")


# --------------------------------------------------------------------------------------------------
# support check


def _is_linear(m, bias: bool | None = None) -> bool:
    if type(m) is not nn.Linear:  # LoRA wrappers, quantized linears, ... fall back to transformers
        return False
    return bias is None or (m.bias is not None) == bias


def _is_rmsnorm(m) -> bool:
    return (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and getattr(m, "variance_epsilon", None) is not None)


def supports(model) -> bool:
    """True when `model` is a Llama / Qwen2 causal LM built only from the features implemented here."""
    try:
        cfg = model.config
        if getattr(cfg, "model_type", None) not in ("llama", "qwen2"):
            return False
        if type(model).__name__ not in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
            return False
        if getattr(cfg, "hidden_act", None) != "silu":
            return False
        if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) != 0.0:
            return False
        if cfg.model_type == "qwen2":
            if getattr(cfg, "use_sliding_window", False):
                return False
            if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
                return False
        base = model.model
        if getattr(base.rotary_emb, "rope_type", "default") not in _EXACT_ROPE:
            return False
        if type(base.embed_tokens) is not nn.Embedding or not _is_rmsnorm(base.norm):
            return False
        if not hasattr(base, "rotary_emb") or not _is_linear(model.lm_head, bias=False):
            return False
        layers = base.layers
        if len(layers) != cfg.num_hidden_layers or len(layers) == 0:
            return False
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        if H % Hkv:
            return False
        for layer in layers:
            a, m = layer.self_attn, layer.mlp
            if not all(_is_linear(x) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)):
                return False
            if not all(_is_linear(x) for x in (m.gate_proj, m.up_proj, m.down_proj)):
                return False
            if getattr(a, "sliding_window", None) is not None:
                return False
            if not (_is_rmsnorm(layer.input_layernorm) and _is_rmsnorm(layer.post_attention_layernorm)):
                return False
            D = a.head_dim
            if a.q_proj.out_features != H * D or a.k_proj.out_features != Hkv * D:
                return False
            if a.v_proj.out_features != Hkv * D or D % 2:
                return False
            if abs(a.scaling - D ** -0.5) > 1e-12 * D ** -0.5:
                return False
            inv_freq = getattr(base.rotary_emb, "inv_freq", None)
            if inv_freq is None or 2 * inv_freq.shape[-1] != D:  # rotary over the full head only
                return False
            if not (type(m.act_fn) is nn.SiLU or type(m.act_fn).__name__ == "SiLUActivation"):
                return False
        return True
    except AttributeError:
        return False


# --------------------------------------------------------------------------------------------------
# weights, read in place from the transformers module


class _Layer(NamedTuple):
    ln1: torch.Tensor
    eps1: float
    w_qkv: tuple  # (fused weight, fused bias or None) or three (weight, bias) pairs
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    ln2: torch.Tensor
    eps2: float
    w_gu: tuple  # (fused weight, fused bias or None) or two (weight, bias) pairs
    w_down: torch.Tensor
    b_down: torch.Tensor | None


class _Weights(NamedTuple):
    layers: list
    norm: torch.Tensor
    norm_eps: float
    lm_head: torch.Tensor
    embed: nn.Module
    rotary: nn.Module
    H: int
    Hkv: int
    D: int
    q_prescaled: bool  # q rows of the projection already carry the 1/sqrt(head_dim) softmax scale


def _cat_bias(pairs):
    """Concatenated biases of (weight, bias) pairs, zeros standing in for a missing one; None if none."""
    if all(b is None for _, b in pairs):
        return None
    return torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in pairs])


def _weights(model, prescale_q: bool = False) -> _Weights:
    """Views of the model's parameters (q/k/v and gate/up concatenated when small enough).

    prescale_q folds the attention scale into the q projection: one multiply less per layer and step
    in decoding (rotary embedding is linear, so it commutes with the scale). Under mixed precision
    (torch.autocast) the matmul weights are cast to its dtype here, once per call, with autograd (their
    gradients reach the float32 parameters): autocast itself would recast them at every decoding step.
    The norms and the embedding stay as they are, so the residual stream keeps the parameters' dtype."""
    base, cfg = model.model, model.config
    cd = compute_dtype(model.lm_head.weight.device)

    def cast(t):
        return t if t is None or cd is None or t.dtype == cd else t.to(cd)

    a0 = base.layers[0].self_attn
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, a0.head_dim
    per_layer = sum(m.weight.numel() for m in (a0.q_proj, a0.k_proj, a0.v_proj,
                                                base.layers[0].mlp.gate_proj, base.layers[0].mlp.up_proj))
    # a cast for mixed precision copies the weights anyway: concatenating the copies is then ~free
    fuse = cd is not None or per_layer * len(base.layers) <= _FUSE_MAX_ELEMENTS
    layers = []
    for layer in base.layers:
        a, m = layer.self_attn, layer.mlp
        wq, bq = a.q_proj.weight, a.q_proj.bias
        if prescale_q:
            wq, bq = wq * a.scaling, (bq * a.scaling if bq is not None else None)
        qkv = ((wq, bq), (a.k_proj.weight, a.k_proj.bias), (a.v_proj.weight, a.v_proj.bias))
        gu = ((m.gate_proj.weight, m.gate_proj.bias), (m.up_proj.weight, m.up_proj.bias))
        if fuse:  # torch.cat of the parameters: autograd splits the gradient back onto each of them
            w_qkv = (torch.cat([cast(w) for w, _ in qkv]), cast(_cat_bias(qkv)))
            w_gu = (torch.cat([cast(w) for w, _ in gu]), cast(_cat_bias(gu)))
        else:
            w_qkv = tuple((cast(w), cast(b)) for w, b in qkv)
            w_gu = tuple((cast(w), cast(b)) for w, b in gu)
        layers.append(_Layer(
            layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon), w_qkv,
            cast(a.o_proj.weight), cast(a.o_proj.bias),
            layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon),
            w_gu, cast(m.down_proj.weight), cast(m.down_proj.bias),
        ))
    return _Weights(layers, base.norm.weight, float(base.norm.variance_epsilon), cast(model.lm_head.weight),
                    base.embed_tokens, base.rotary_emb, H, Hkv, D, prescale_q)


# --------------------------------------------------------------------------------------------------
# building blocks


def _rms_norm(x, w, eps):
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    # transformers' LlamaRMSNorm, bit for bit: normalize in float32, cast back, then scale
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rope_tables(W: _Weights, x, position_ids):
    """cos and sign-folded sin, shaped (B, T, 1, D) to broadcast over heads."""
    cos, sin = W.rotary(x, position_ids)
    if W.lm_head.dtype != cos.dtype:  # mixed precision: q and k come out of the matmuls in its dtype
        cos, sin = cos.to(W.lm_head.dtype), sin.to(W.lm_head.dtype)
    h = cos.shape[-1] // 2
    sin = torch.cat((-sin[..., :h], sin[..., h:]), -1)  # rotate_half(x) * sin == roll(x, D/2) * this
    return cos.unsqueeze(-2), sin.unsqueeze(-2)


def _rope(x, cos, sin):
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin


def _qkv(W: _Weights, L: _Layer, h, cos, sin):
    """Projections with rotary applied; q (B, T, H, D), k and v (B, T, Hkv, D)."""
    B, T, _ = h.shape
    H, Hkv, D = W.H, W.Hkv, W.D
    if isinstance(L.w_qkv[0], torch.Tensor):  # fused
        qkv = F.linear(h, *L.w_qkv)
        qk = _rope(qkv[..., : (H + Hkv) * D].view(B, T, H + Hkv, D), cos, sin)
        q, k = qk.split((H, Hkv), 2)
        v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
    else:
        (wq, bq), (wk, bk), (wv, bv) = L.w_qkv
        q = _rope(F.linear(h, wq, bq).view(B, T, H, D), cos, sin)
        k = _rope(F.linear(h, wk, bk).view(B, T, Hkv, D), cos, sin)
        v = F.linear(h, wv, bv).view(B, T, Hkv, D)
    return q, k, v


class _SiluMul(torch.autograd.Function):
    """silu(g) * u keeping only g and u for the backward (autograd would also keep silu(g) and the
    product: with the intermediate size ~5x the hidden size, that is the largest activation of a layer)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        if g.dtype != torch.float32 and g.dtype == u.dtype == grad.dtype:
            # low precision (mixed precision's bfloat16): two fused kernels that compute in float32
            # per element, without float32 copies of the three tensors (~5x faster measured)
            return torch.ops.aten.silu_backward(grad * u, g), grad * F.silu(g)
        gf, uf, grad = g.float(), u.float(), grad.float()
        sg = torch.sigmoid(gf)
        dg = grad * uf * sg * (1 + gf * (1 - sg))  # d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g)))
        du = grad * gf * sg
        return dg.to(g.dtype), du.to(u.dtype)


def _mlp(L: _Layer, h):
    if isinstance(L.w_gu[0], torch.Tensor):  # fused
        g, u = F.linear(h, *L.w_gu).chunk(2, -1)
    else:
        (wg, bg), (wu, bu) = L.w_gu
        g, u = F.linear(h, wg, bg), F.linear(h, wu, bu)
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        return F.linear(_SiluMul.apply(g, u), L.w_down, L.b_down)
    return F.linear(F.silu(g) * u, L.w_down, L.b_down)


def _attend(W: _Weights, q, k, v, mask):
    """q (B, T, H, D); k, v (B, Hkv, S, D); mask (B, 1, g*T, S) bool, True = attend.

    Grouped-query attention without repeating K/V: the g query heads sharing a KV head are laid out
    as g*T query rows of that head (the mask was repeated g times to match). Returns (B, T, H*D).
    """
    B, T, H, D = q.shape
    Hkv = W.Hkv
    g = H // Hkv
    if T == 1:
        qh = q.view(B, Hkv, g, D)
    else:
        qh = q.view(B, T, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * T, D)
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=1.0 if W.q_prescaled else None)
    if T == 1:
        return o.reshape(B, 1, H * D)
    return o.view(B, Hkv, g, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)


def _group_mask(mask, g):
    """(B, 1, T, S) -> (B, 1, g*T, S), matching `_attend`'s layout of grouped query heads."""
    if g == 1:
        return mask
    B, _, T, S = mask.shape
    return mask.unsqueeze(2).expand(B, 1, g, T, S).reshape(B, 1, g * T, S)


def _prompt_mask(prompt_mask):
    """(M, 1, P, P): causal, padding keys masked, and every query sees itself (no empty rows)."""
    M, P = prompt_mask.shape
    idx = torch.arange(P, device=prompt_mask.device)
    causal = idx[None, :] <= idx[:, None]
    return ((causal & prompt_mask.bool()[:, None, :]) | torch.eye(P, dtype=torch.bool,
                                                                   device=prompt_mask.device))[:, None]


def _prefill(W: _Weights, prompt_ids, prompt_mask, recompute: bool = False):
    """Run the prompts; returns the final normed hidden state of the last position (M, hidden),
    the per-layer keys and values (M, Hkv, P, D) and the positions (M, P). With `recompute` (training
    under activation checkpointing) each layer keeps only its outputs; the rest is recomputed in the
    backward, as for the completion tokens."""
    pos = (prompt_mask.long().cumsum(1) - 1).clamp(min=0)
    x = W.embed(prompt_ids)
    cos, sin = _rope_tables(W, x, pos)
    full = _prompt_mask(prompt_mask)
    g = W.H // W.Hkv
    mask, last_mask = _group_mask(full, g), _group_mask(full[:, :, -1:], g)

    def layer(x, L, last: bool):
        h = _rms_norm(x, L.ln1, L.eps1)
        q, k, v = _qkv(W, L, h, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        m = mask
        if last:  # the last layer's outputs are only needed at the last position
            x, q, m = x[:, -1:], q[:, -1:], last_mask
        x = x + F.linear(_attend(W, q, k, v, m), L.w_o, L.b_o)
        return x + _mlp(L, _rms_norm(x, L.ln2, L.eps2)), k, v

    kvs = []
    n = len(W.layers)
    for i, L in enumerate(W.layers):
        if recompute:
            x, k, v = torch.utils.checkpoint.checkpoint(layer, x, L, i == n - 1, use_reentrant=False)
        else:
            x, k, v = layer(x, L, i == n - 1)
        kvs.append((k, v))
    return _rms_norm(x[:, -1], W.norm, W.norm_eps), kvs, pos


# --------------------------------------------------------------------------------------------------
# training forward


def _group_counts(group_size, M: int, B: int) -> list[int]:
    """Completion rows per prompt: G for every prompt (an int), or one count per prompt (a sequence)."""
    if isinstance(group_size, int) or (isinstance(group_size, torch.Tensor) and group_size.dim() == 0):
        G = int(group_size)
        if B != M * G:
            raise ValueError(f"{B} completion rows for {M} prompts x group size {G}")
        return [G] * M
    counts = [int(n) for n in group_size]
    if len(counts) != M or sum(counts) != B or min(counts, default=1) < 1:
        raise ValueError(f"{B} completion rows for {M} prompts in groups of {counts}")
    return counts


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, group_size,
                        temperature: float = 1.0, with_entropy: bool = False, chunk_size: int | None = None,
                        entropy_grad: bool = False):
    """Per-token log-probabilities of the completions, with autograd (and of the entropies, with
    `entropy_grad`).

    prompt_ids, prompt_mask: (M, P) left-padded unique prompts. completion_ids, completion_mask:
    (B, C) right-padded, prompt-major: with group_size an int G, B = M*G and rows i*G .. i*G+G-1
    continue prompt i; group_size may also be M counts (rows per prompt, in order, any positive sizes),
    so a micro-batch need not hold whole groups.
    Returns logps (B, C), logps[r, t] = log_softmax(logits / temperature)[completion_ids[r, t]],
    and the (detached) entropy of softmax(logits / temperature) per token, or None.
    Values where completion_mask == 0 are finite but meaningless.

    Memory is linear in the completion length: attention is causal SDPA without a mask tensor (the keys
    of each row are reordered to [prompt tokens ; completion ; prompt padding], for which the plain
    causal mask is exact; while a mask of rows x completion tokens x keys is small, up to
    `_MASK_MAX_ELEMENTS`, only the completion tokens are queries, under that mask), and log-probs and entropy come from `chunked.linear_logprobs`, which never
    holds more than `chunk_size` tokens' logits. When the model has activation checkpointing enabled
    (`chunked.set_activation_checkpointing`) and is training, each decoder layer over the completions
    is recomputed in the backward instead of keeping its activations; so is each layer over the prompts.
    """
    require_positive("temperature", temperature)  # greedy (0) has no log-probs to train on
    W = _weights(model)
    M, P = prompt_ids.shape
    B, C = completion_ids.shape
    counts = _group_counts(group_size, M, B)
    if C == 0:
        empty = completion_ids.new_zeros((B, 0), dtype=torch.float32)
        return empty, (empty.detach() if (with_entropy or entropy_grad) else None)
    dev = completion_ids.device
    rows = torch.repeat_interleave(torch.arange(M, device=dev), torch.tensor(counts, device=dev))  # row -> prompt
    recompute = model.training and torch.is_grad_enabled() and activation_checkpointing(model)
    h0, kvs, ppos = _prefill(W, prompt_ids, prompt_mask, recompute)
    hs = [h0[rows][:, None]]  # predicts completion token 0
    if C > 1:  # completion tokens 0..C-2 predict 1..C-1; the last token is never an input
        T, S, H, Hkv, D = C - 1, P + C - 1, W.H, W.Hkv, W.D
        ids = completion_ids[:, :T]
        pos = ppos[rows, -1:] + 1 + torch.arange(T, device=dev)
        x = W.embed(ids)
        cos, sin = _rope_tables(W, x, pos)
        g = H // Hkv
        if B * g * T * S <= _MASK_MAX_ELEMENTS:
            # keys [prompt (left-padded, as the prefill left them) ; completion]: completion query t sees the
            # prompt's real tokens and completion tokens 0..t
            seen = torch.cat((prompt_mask.bool()[rows][:, None, None, :].expand(B, 1, T, P),
                              torch.ones((T, T), dtype=torch.bool, device=dev).tril().expand(B, 1, T, T)), -1)
            masked = _group_mask(seen, g)

            def attend(q, k, v):
                return _attend(W, q, k, v, masked)
        else:
            # Sequence order of each row: [its prompt tokens ; completion ; its prompt padding] (a stable sort
            # of the keys by padding), so that query i may see keys 0..i: a causal mask, exact, without a
            # mask tensor. The completion queries go to their places in that order; the other query slots
            # are zeros whose outputs are dropped.
            valid = torch.cat((prompt_mask.bool()[rows], torch.ones((B, T), dtype=torch.bool, device=dev)), 1)
            order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # (B, S)
            kidx = order[:, None, :, None].expand(B, Hkv, S, D)
            qpos = (prompt_mask.sum(1)[rows][:, None] + torch.arange(T, device=dev)).to(torch.long)  # (B, T)
            qidx = qpos[:, :, None, None].expand(B, T, H, D)
            scale = 1.0 if W.q_prescaled else None

            def attend(q, k, v):
                k, v = k.gather(2, kidx), v.gather(2, kidx)
                q = q.new_zeros((B, S, H, D)).scatter(1, qidx, q).transpose(1, 2)  # (B, H, S, D)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H, scale=scale)
                return o.transpose(1, 2).gather(1, qidx).reshape(B, T, H * D)

        def layer(x, L, kp, vp):
            h = _rms_norm(x, L.ln1, L.eps1)
            q, k, v = _qkv(W, L, h, cos, sin)
            # the prompt keys/values are indexed per row (their gradients sum back into the shared prompt)
            k = torch.cat((kp[rows], k.transpose(1, 2)), 2)  # (B, Hkv, S, D)
            v = torch.cat((vp[rows], v.transpose(1, 2)), 2)
            x = x + F.linear(attend(q, k, v), L.w_o, L.b_o)
            return x + _mlp(L, _rms_norm(x, L.ln2, L.eps2))

        for L, (kp, vp) in zip(W.layers, kvs):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(layer, x, L, kp, vp, use_reentrant=False)
            else:
                x = layer(x, L, kp, vp)
        hs.append(_rms_norm(x, W.norm, W.norm_eps))
    return linear_logprobs(torch.cat(hs, 1), W.lm_head, completion_ids, temperature=temperature,
                           with_entropy=with_entropy, chunk_size=chunk_size, entropy_grad=entropy_grad)


# --------------------------------------------------------------------------------------------------
# sampling


@torch.inference_mode()
def sample(model, prompt_ids, prompt_mask, n, max_new_tokens, temperature, top_p, stop_ids, pad_id,
           generator=None):
    """n sampled completions per prompt; rows are prompt-major (i*n .. i*n+n-1 belong to prompt i).

    prompt_ids, prompt_mask: (M, P) left-padded. Returns completion_ids (M*n, C) with C <=
    max_new_tokens (pad_id after a stop token), completion_mask (M*n, C) long, 1 on generated tokens
    up to and including the first stop token, and truncated (M*n,) bool: no stop token was emitted.
    """
    W = _weights(model, prescale_q=True)
    M, P = prompt_ids.shape
    B, dev = M * n, prompt_ids.device
    stop_ids = torch.as_tensor(stop_ids, dtype=torch.long, device=dev).reshape(-1)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    cmask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    if max_new_tokens <= 0 or B == 0:
        return out, cmask, ~done

    h0, kvs, ppos = _prefill(W, prompt_ids, prompt_mask)
    # float32 logits whatever the matmuls' precision: top-p and the draw need a fine-grained distribution
    logits = F.linear(h0, W.lm_head).float().repeat_interleave(n, 0)
    H, Hkv, D = W.H, W.Hkv, W.D
    g = H // Hkv
    T = max_new_tokens - 1  # generated tokens that are fed back (the last one never is)
    # The prompt keys/values stay shared by the n rows of their prompt (M rows, not M*n): each step
    # scores the n*g queries of a prompt against them in one matmul, and each row's query against its
    # own generated keys (pre-allocated buffers, written in place) in another; one softmax spans both.
    kp = [k.contiguous() for k, _ in kvs]  # (M, Hkv, P, D)
    vp = [v.contiguous() for _, v in kvs]
    del kvs
    kv_dtype = kp[0].dtype  # the matmuls' dtype (mixed precision's, if on): no cast of the cache per step
    kc = [h0.new_empty((B, Hkv, T, D), dtype=kv_dtype) for _ in W.layers]  # (B, Hkv, T, D)
    vc = [h0.new_empty((B, Hkv, T, D), dtype=kv_dtype) for _ in W.layers]
    padd = h0.new_zeros((M, Hkv, n * g, P), dtype=kv_dtype)  # additive prompt-padding mask, shaped like the scores
    padd.masked_fill_(~prompt_mask.bool()[:, None, None, :], float("-inf"))
    padd = padd.view(M * Hkv, n * g, P)

    pos0 = ppos[:, -1:].repeat_interleave(n, 0) + 1  # (B, 1) position of the first generated token
    if T > 0:
        cos_all, sin_all = _rope_tables(W, h0[:1, None].expand(B, T, -1), pos0 + torch.arange(T, device=dev))

    C = max_new_tokens
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        nxt = nxt.masked_fill(done, pad_id)
        out[:, t] = nxt
        cmask[:, t] = (~done).long()
        done |= torch.isin(nxt, stop_ids)
        if t == max_new_tokens - 1 or bool(done.all()):
            C = t + 1
            break
        x = W.embed(nxt[:, None])
        cos, sin = cos_all[:, t:t + 1], sin_all[:, t:t + 1]
        for L, kpl, vpl, kcl, vcl in zip(W.layers, kp, vp, kc, vc):
            q, k, v = _qkv(W, L, _rms_norm(x, L.ln1, L.eps1), cos, sin)  # q is prescaled
            kcl[:, :, t] = k[:, 0]
            vcl[:, :, t] = v[:, 0]
            qb = q.reshape(B, Hkv, g, D)
            qg = qb.view(M, n, Hkv, g, D).transpose(1, 2).reshape(M * Hkv, n * g, D)
            sp = torch.baddbmm(padd, qg, kpl.view(M * Hkv, P, D).transpose(1, 2))
            sc = torch.matmul(qb, kcl[:, :, :t + 1].transpose(-1, -2))  # (B, Hkv, g, t+1)
            s = torch.cat((sp.view(M, Hkv, n, g, P).transpose(1, 2), sc.view(M, n, Hkv, g, t + 1)), -1)
            pr = torch.softmax(s, -1)  # (M, n, Hkv, g, P + t + 1)
            pp = pr[..., :P].transpose(1, 2).reshape(M * Hkv, n * g, P)
            o = torch.matmul(pr.view(B, Hkv, g, P + t + 1)[..., P:], vcl[:, :, :t + 1])  # (B, Hkv, g, D)
            o.view(M, n, Hkv, g, D).add_(torch.bmm(pp, vpl.view(M * Hkv, P, D)).view(M, Hkv, n, g, D).transpose(1, 2))
            x = x + F.linear(o.view(B, 1, H * D), L.w_o, L.b_o)
            x = x + _mlp(L, _rms_norm(x, L.ln2, L.eps2))
        logits = F.linear(_rms_norm(x[:, 0], W.norm, W.norm_eps), W.lm_head).float()
    return out[:, :C].clone(), cmask[:, :C].clone(), ~done
