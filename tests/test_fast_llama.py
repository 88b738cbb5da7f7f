"""The lean forward in r1flow.models.fast_llama against transformers' own forward, on tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from r1flow.models import fast_llama
from r1flow.models.decoding import sample_next

VOCAB, PAD = 100, 0
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.1, pad_token_id=PAD)


def _llama(**kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**COMMON, "tie_word_embeddings": True, **kw})
    return LlamaForCausalLM(cfg).float().eval()


def _qwen2(**kw):
    """Untied head, q/k/v biases, and plain multi-head attention (one query head per KV head)."""
    torch.manual_seed(1)
    cfg = Qwen2Config(**{**COMMON, "tie_word_embeddings": False, "num_key_value_heads": 4, **kw})
    return Qwen2ForCausalLM(cfg).float().eval()


MODELS = {"llama": _llama, "qwen2": _qwen2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads, and a multi-threaded pool stalls badly when another
    process holds a core; one thread keeps this file fast on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _prompts(lengths, P=None, seed=0):
    """Left-padded random prompts of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    P = P or max(lengths)
    ids = torch.full((len(lengths), P), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), P), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def _completions(lengths, C, seed=1):
    """Right-padded random completions of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), C), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), C), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def _hf_logps(model, p_ids, p_mask, c_ids, c_mask, G, temperature=1.0):
    ids = torch.cat([p_ids.repeat_interleave(G, 0), c_ids], 1)
    mask = torch.cat([p_mask.repeat_interleave(G, 0), c_mask], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    P, C = p_ids.shape[1], c_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1:P + C - 1]
    logp = torch.log_softmax(logits.float() / temperature, -1)
    ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, c_ids[..., None]).squeeze(-1), ent


def _case():
    p_ids, p_mask = _prompts([5, 9, 1])  # M = 3, P = 9, one prompt of a single token
    G = 3
    c_ids, c_mask = _completions([7, 2, 1, 7, 4, 6, 3, 7, 5], 7)
    return p_ids, p_mask, c_ids, c_mask, G


def test_supports():
    assert fast_llama.supports(_llama())
    assert fast_llama.supports(_qwen2())
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert not fast_llama.supports(gpt2)
    assert not fast_llama.supports(_llama(hidden_act="gelu"))
    assert not fast_llama.supports(_qwen2(num_hidden_layers=2, use_sliding_window=True, sliding_window=4,
                                          max_window_layers=1))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("layout", ["mask", "maskless"])
def test_logprobs_and_gradients_match_transformers(monkeypatch, arch, temperature, layout):
    """Both attention layouts of the training forward: a mask over the completion queries (small batches)
    and the reordered keys under a plain causal mask (long completions)."""
    if layout == "maskless":
        monkeypatch.setattr(fast_llama, "_MASK_MAX_ELEMENTS", 0)
    model = MODELS[arch]()
    p_ids, p_mask, c_ids, c_mask, G = _case()
    weights = torch.rand(c_ids.shape, generator=torch.Generator().manual_seed(3))

    logps, ent = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G, temperature,
                                                with_entropy=True)
    assert logps.shape == c_ids.shape and ent.shape == c_ids.shape
    assert torch.isfinite(logps).all() and torch.isfinite(ent).all()
    (logps * c_mask * weights).sum().backward()
    fast_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    ref, ref_ent = _hf_logps(model, p_ids, p_mask, c_ids, c_mask, G, temperature)
    (ref * c_mask * weights).sum().backward()
    m = c_mask.bool()
    torch.testing.assert_close(logps[m], ref[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[m], ref_ent[m].detach(), rtol=0, atol=1e-5)
    for k, p in model.named_parameters():
        g, r = fast_grads[k], p.grad
        assert g is not None and r is not None, k
        scale = r.abs().max().clamp(min=1e-8)
        assert ((g - r).abs().max() / scale) < 1e-4, k


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logprobs_unfused_and_no_grad(monkeypatch, arch):
    """The separate-matmul path (large models) and the reference-model call under no_grad."""
    model = MODELS[arch]()
    p_ids, p_mask, c_ids, c_mask, G = _case()
    monkeypatch.setattr(fast_llama, "_FUSE_MAX_ELEMENTS", 0)
    logps, ent = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G)
    assert ent is None and logps.requires_grad
    with torch.no_grad():
        ref, _ = _hf_logps(model, p_ids, p_mask, c_ids, c_mask, G)
        nograd, _ = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G)
    assert not nograd.requires_grad
    m = c_mask.bool()
    torch.testing.assert_close(logps[m], ref[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(nograd, logps.detach(), rtol=0, atol=1e-6)


def test_logprobs_rope_scaling_and_single_token():
    model = _llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    p_ids, p_mask, _, _, G = _case()
    c_ids, c_mask = _completions([1] * 9, 1)  # C = 1: only the last prompt position is used
    logps, _ = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G)
    with torch.no_grad():
        ref, _ = _hf_logps(model, p_ids, p_mask, c_ids, c_mask, G)
    torch.testing.assert_close(logps, ref, rtol=0, atol=1e-5)
    p2, m2, c2, cm2, G2 = _case()
    logps2, _ = fast_llama.completion_logprobs(model, p2, m2, c2, cm2, G2)
    with torch.no_grad():
        ref2, _ = _hf_logps(model, p2, m2, c2, cm2, G2)
    torch.testing.assert_close(logps2[cm2.bool()], ref2[cm2.bool()], rtol=0, atol=1e-5)


def _hf_decode(model, p_ids, p_mask, n, max_new, temperature, top_p, stop_ids, generator):
    """Reference: transformers' plain forward on the whole growing sequence (no cache)."""
    ids, mask = p_ids.repeat_interleave(n, 0), p_mask.repeat_interleave(n, 0)
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool)
    toks, all_logits = [], []
    with torch.no_grad():
        for t in range(max_new):
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            all_logits.append(logits)
            nxt = sample_next(logits, temperature, top_p, generator).masked_fill(done, PAD)
            toks.append(nxt)
            done = done | torch.isin(nxt, stop_ids)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype)], 1)
    return torch.stack(toks, 1), all_logits


def _fast_decode(monkeypatch, model, *args):
    seen = []

    def recording(logits, temperature, top_p, generator=None):
        seen.append(logits.clone())
        return sample_next(logits, temperature, top_p, generator)

    monkeypatch.setattr(fast_llama, "sample_next", recording)
    return fast_llama.sample(model, *args), seen


@pytest.mark.parametrize("arch,temperature,top_p,fuse", [
    ("llama", 0.0, 1.0, True), ("qwen2", 0.0, 1.0, True), ("llama", 1.0, 0.9, True),
    ("qwen2", 1.0, 0.9, True), ("llama", 0.0, 1.0, False), ("qwen2", 0.7, 1.0, False),
])
def test_decode_matches_transformers(monkeypatch, arch, temperature, top_p, fuse):
    if not fuse:
        monkeypatch.setattr(fast_llama, "_FUSE_MAX_ELEMENTS", 0)
    model = MODELS[arch]()
    p_ids, p_mask = _prompts([4, 7, 2])
    n, max_new = 3, 10
    stop = torch.tensor([VOCAB + 5])  # never emitted: every row runs to max_new_tokens
    (ids, cmask, trunc), seen = _fast_decode(monkeypatch, model, p_ids, p_mask, n, max_new, temperature,
                                            top_p, stop, PAD, torch.Generator().manual_seed(7))
    ref, ref_logits = _hf_decode(model, p_ids, p_mask, n, max_new, temperature, top_p, stop,
                                 torch.Generator().manual_seed(7))
    assert ids.shape == (9, max_new) and torch.equal(ids, ref)
    assert len(seen) == len(ref_logits) == max_new
    for a, b in zip(seen, ref_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert cmask.dtype == torch.long and bool((cmask == 1).all()) and bool(trunc.all())


def test_stop_tokens(monkeypatch):
    model = _llama()
    p_ids, p_mask = _prompts([4, 7, 2])
    n, max_new = 2, 12
    free = fast_llama.sample(model, p_ids, p_mask, n, max_new, 0.0, 1.0, torch.tensor([VOCAB + 5]), PAD)[0]
    # a stop token that some rows emit part-way (not first) and, preferably, others never emit
    counts, first = {}, {}
    for row in free.tolist():
        for t, tok in enumerate(row[:-1]):
            first[tok] = min(first.get(tok, t), t)
        for tok in set(row[:-1]):
            counts[tok] = counts.get(tok, 0) + 1
    stop_tok = max(counts, key=lambda k: (0 < counts[k] < free.shape[0], first[k] > 0, counts[k]))
    stop = torch.tensor([stop_tok, VOCAB + 7])
    (ids, cmask, trunc), _ = _fast_decode(monkeypatch, model, p_ids, p_mask, n, max_new, 0.0, 1.0, stop,
                                         PAD, None)
    ref, _ = _hf_decode(model, p_ids, p_mask, n, max_new, 0.0, 1.0, stop, None)
    assert torch.equal(ids, ref)
    C = ids.shape[1]
    for r, row in enumerate(free.tolist()):
        hits = [t for t, tok in enumerate(row) if tok == stop_tok]
        if hits:
            s = hits[0]
            assert ids[r, : s + 1].tolist() == row[: s + 1]
            assert (ids[r, s + 1:] == PAD).all()
            assert cmask[r].tolist() == [1] * (s + 1) + [0] * (C - s - 1)
            assert not trunc[r]
        else:
            assert C == max_new and ids[r].tolist() == row and bool((cmask[r] == 1).all()) and trunc[r]
    assert (~trunc).any()


def test_stop_all_rows_early():
    """When every row has stopped the loop ends: C < max_new_tokens."""
    model = _qwen2()
    p_ids, p_mask = _prompts([3, 5])
    free, _, _ = fast_llama.sample(model, p_ids, p_mask, 2, 8, 0.0, 1.0, torch.tensor([VOCAB + 5]), PAD)
    first = torch.tensor(sorted(set(free[:, 0].tolist())))  # every row stops at its first token
    ids, cmask, trunc = fast_llama.sample(model, p_ids, p_mask, 2, 8, 0.0, 1.0, first, PAD)
    assert ids.shape == (4, 1) and torch.equal(ids[:, 0], free[:, 0])
    assert bool((cmask == 1).all()) and not trunc.any()


_HALF_D = COMMON["hidden_size"] // COMMON["num_attention_heads"] // 2
ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
                 "short_factor": [1.0] * _HALF_D, "long_factor": [1.0 + i / 4 for i in range(_HALF_D)]},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "rope_theta": 10000.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
}


@pytest.mark.parametrize("rope", sorted(ROPE_TYPES))
def test_each_rope_type_matches_transformers_or_is_refused(rope):
    """Past max_position_embeddings (8 here; sequences reach 16) a rope type whose frequencies depend on
    the sequence (dynamic, longrope) gives other log-probs than the HF forward: such types must be refused,
    so callers fall back to the model's own forward; every accepted type must match it."""
    model = _llama(rope_parameters=ROPE_TYPES[rope], max_position_embeddings=8)
    assert getattr(model.model.rotary_emb, "rope_type", "default") == rope
    p_ids, p_mask, c_ids, c_mask, G = _case()
    if rope in ("dynamic", "longrope"):
        assert not fast_llama.supports(model)
        return
    assert fast_llama.supports(model)
    with torch.no_grad():
        logps, _ = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G)
        ref, _ = _hf_logps(model, p_ids, p_mask, c_ids, c_mask, G)
    m = c_mask.bool()
    torch.testing.assert_close(logps[m], ref[m], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# mixed precision (GRPOConfig.mixed_precision): bfloat16 matmuls over float32 weights


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_precision_logprobs_and_gradients_near_float32(arch):
    """Under bfloat16 autocast the log-probs and the float32 parameters' gradients stay close to the float32
    ones (bfloat16 keeps 8 bits of mantissa: about 1% relative), on both the fused and the transformers path."""
    model = MODELS[arch]()
    p_ids, p_mask, c_ids, c_mask, G = _case()
    weights = torch.rand(c_ids.shape, generator=torch.Generator().manual_seed(3))
    m = c_mask.bool()

    def run(mixed, fast=True):
        model.zero_grad(set_to_none=True)
        with _bf16() if mixed else torch.autocast("cpu", enabled=False):
            if fast:
                lp, ent = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G, 0.7, with_entropy=True)
            else:
                from r1flow.models.logprobs import hf_completion_logprobs
                lp, ent = hf_completion_logprobs(model, p_ids.repeat_interleave(G, 0), p_mask.repeat_interleave(G, 0),
                                                 c_ids, c_mask, 0.7, with_entropy=True)
        (lp * c_mask * weights).sum().backward()
        return lp.detach(), ent, {k: p.grad.clone() for k, p in model.named_parameters()}

    lp32, ent32, g32 = run(False)
    for fast in (True, False):
        lp16, ent16, g16 = run(True, fast)
        assert lp16.dtype == torch.float32 and ent16.dtype == torch.float32
        diff = (lp16 - lp32)[m].abs()
        assert diff.max() < 0.1 and diff.mean() < 0.03, (fast, diff.max(), diff.mean())
        assert 0 < diff.max()  # it did run in bfloat16
        assert (ent16 - ent32)[m].abs().max() < 0.1
        for k, p in model.named_parameters():
            assert p.dtype == torch.float32 and g16[k].dtype == torch.float32, k
            cos = F.cosine_similarity(g16[k].flatten(), g32[k].flatten(), dim=0)
            assert cos > 0.99, (fast, k, float(cos))


def test_mixed_precision_sampling(monkeypatch):
    """Decoding under bfloat16 autocast: the float32 logits it samples from stay close to the float32 model's
    (same tokens at temperature 0 here), with the K/V caches in bfloat16."""
    model = _llama()
    p_ids, p_mask = _prompts([4, 7, 2])
    stop = torch.tensor([VOCAB + 5])

    def run(mixed):
        with _bf16() if mixed else torch.autocast("cpu", enabled=False):
            return _fast_decode(monkeypatch, model, p_ids, p_mask, 2, 6, 0.0, 1.0, stop, PAD)

    (ids32, _, _), l32 = run(False)
    (ids16, _, trunc), l16 = run(True)
    assert torch.equal(ids16, ids32) and bool(trunc.all())
    for a, b in zip(l16, l32):
        assert a.dtype == torch.float32
        assert 0 < (a - b).abs().max() < 0.1


def test_silu_mul_backward_in_low_precision():
    """The bfloat16 backward of silu(g) * u (fused kernels) against the float32 formula."""
    g32, u32, d32 = (torch.randn(64, 48, generator=torch.Generator().manual_seed(s)) for s in range(3))
    g, u = g32.bfloat16().requires_grad_(), u32.bfloat16().requires_grad_()
    fast_llama._SiluMul.apply(g, u).backward(d32.bfloat16())
    gr, ur = g32.bfloat16().float().requires_grad_(), u32.bfloat16().float().requires_grad_()
    (F.silu(gr) * ur).backward(d32.bfloat16().float())
    assert g.grad.dtype == torch.bfloat16
    torch.testing.assert_close(g.grad.float(), gr.grad, rtol=0.02, atol=0.02)
    torch.testing.assert_close(u.grad.float(), ur.grad, rtol=0.02, atol=0.02)
