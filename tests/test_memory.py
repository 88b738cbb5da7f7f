"""Memory at real lengths: log-probs, entropy and the SFT loss a chunk of tokens at a time (never the
(rows, length, vocab) logits), attention without a mask tensor, gradient checkpointing, and GRPO
micro-batches of any size. Each is checked equal (values and gradients) to the plain computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES
from test_fast_llama import MODELS, _case, _completions, _hf_logps, _prompts

from r1flow.models import chunked, fast_llama
from r1flow.models import logprobs as LP
from r1flow.training.sft import IGNORE, SFTBatch, sft_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _grads(model):
    g = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def _assert_grads_close(a, b, rel=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        scale = b[k].abs().max().clamp(min=1e-8)
        assert ((a[k] - b[k]).abs().max() / scale) < rel, k


class _Record:
    """Patches chunked._chunk_logits to record the shape of every logits chunk it makes."""

    def __init__(self, monkeypatch):
        self.shapes = []
        real = chunked._chunk_logits

        def record(h, w, b, t):
            z = real(h, w, b, t)
            self.shapes.append(tuple(z.shape))
            return z

        monkeypatch.setattr(chunked, "_chunk_logits", record)

    @property
    def rows(self):
        return max(s[0] for s in self.shapes)


def _no_full_logits(monkeypatch, model):
    """Calling lm_head as a module (which gives logits for every position) fails the test."""
    def refuse(*a, **k):
        raise AssertionError("lm_head called on the whole sequence")

    monkeypatch.setattr(model.lm_head, "forward", refuse)


@pytest.mark.parametrize("chunk", [1, 3, 7, 11, 64, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_equal_unchunked(chunk, temperature):
    torch.manual_seed(0)
    h = torch.randn(2, 11, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (2, 11))
    up = torch.rand(2, 11)

    lp, ent = chunked.linear_logprobs(h, w, t, bias=b, temperature=temperature, with_entropy=True, chunk_size=chunk)
    g = torch.autograd.grad((lp * up).sum(), (h, w, b))
    logp_all = torch.log_softmax(F.linear(h, w, b).float() / temperature, -1)
    ref = logp_all.gather(-1, t[..., None]).squeeze(-1)
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    r = torch.autograd.grad((ref * up).sum(), (h, w, b))
    assert lp.dtype == torch.float32 and not ent.requires_grad
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=0, atol=1e-5)
    for a, e in zip(g, r):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-5)


def test_linear_logprobs_bfloat16_matches_the_plain_cast():
    """Low-precision weights: logits in the weight's dtype, cast to float32, as before."""
    torch.manual_seed(0)
    h = torch.randn(13, 32).bfloat16().requires_grad_()
    w = torch.randn(40, 32).bfloat16().requires_grad_()
    t = torch.randint(0, 40, (13,))
    lp, _ = chunked.linear_logprobs(h, w, t, chunk_size=4)
    g = torch.autograd.grad(lp.sum(), (h, w))
    ref = torch.log_softmax(F.linear(h, w).float(), -1).gather(-1, t[:, None]).squeeze(-1)
    r = torch.autograd.grad(ref.sum(), (h, w))
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)
    for a, e in zip(g, r):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_fast_forward_in_chunks_equals_transformers_and_never_holds_all_logits(monkeypatch, arch, chunk):
    model = MODELS[arch]()
    p_ids, p_mask, c_ids, c_mask, G = _case()
    up = torch.rand(c_ids.shape, generator=torch.Generator().manual_seed(3))
    ref, ref_ent = _hf_logps(model, p_ids, p_mask, c_ids, c_mask, G, 0.8)
    (ref * c_mask * up).sum().backward()
    want = _grads(model)

    rec = _Record(monkeypatch)
    _no_full_logits(monkeypatch, model)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4 * model.config.vocab_size)  # default: 4 tokens per chunk
    lp, ent = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G, 0.8, with_entropy=True,
                                             chunk_size=chunk)
    (lp * c_mask * up).sum().backward()
    m = c_mask.bool()
    torch.testing.assert_close(lp[m], ref[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[m], ref_ent[m].detach(), rtol=0, atol=1e-5)
    _assert_grads_close(_grads(model), want, 1e-4)
    # forward and backward each went through chunks of at most `chunk` tokens (4 by default here)
    assert rec.rows == (chunk or 4) and rec.rows < c_ids.numel()
    assert sum(s[0] for s in rec.shapes) == 2 * c_ids.numel()
    assert all(s[1] == model.config.vocab_size for s in rec.shapes)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_forward_takes_groups_of_any_size(arch):
    """A micro-batch may cut a group: rows per prompt are counts, equal to the whole batch's rows."""
    model = MODELS[arch]()
    p_ids, p_mask, c_ids, c_mask, G = _case()  # M = 3 prompts x G = 3
    full, full_ent = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G, with_entropy=True)
    rows = torch.arange(9).repeat_interleave(1)
    for lo, hi in [(0, 4), (4, 8), (8, 9), (2, 7)]:
        prompts = sorted({int(r) // G for r in rows[lo:hi]})
        counts = [sum(1 for r in range(lo, hi) if r // G == p) for p in prompts]
        lp, ent = fast_llama.completion_logprobs(model, p_ids[prompts], p_mask[prompts], c_ids[lo:hi],
                                                 c_mask[lo:hi], counts, with_entropy=True)
        m = c_mask[lo:hi].bool()
        torch.testing.assert_close(lp[m], full[lo:hi][m], rtol=0, atol=1e-5)
        torch.testing.assert_close(ent[m], full_ent[lo:hi][m], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="groups of"):
        fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, [3, 3, 2])


@pytest.mark.parametrize("fast", [True, False])
def test_public_logprobs_of_cut_groups_equal_the_whole_batch(monkeypatch, fast):
    """training.logprobs.completion_logprobs finds the prompts of any slice of rows itself (fast path),
    and the transformers path gives the same values from hidden states in chunks."""
    model = MODELS["llama"]()
    p_ids, p_mask, c_ids, c_mask, G = _case()
    P = p_ids.repeat_interleave(G, 0)
    Pm = p_mask.repeat_interleave(G, 0)
    ref, _ = _hf_logps(model, p_ids, p_mask, c_ids, c_mask, G)
    _no_full_logits(monkeypatch, model)
    for lo, hi in [(0, 9), (0, 2), (2, 7), (7, 9)]:
        lp, _ = LP.completion_logprobs(model, P[lo:hi], Pm[lo:hi], c_ids[lo:hi], c_mask[lo:hi], G, fast=fast)
        m = c_mask[lo:hi].bool()
        torch.testing.assert_close(lp[m], ref[lo:hi][m].detach(), rtol=0, atol=1e-5)
    assert LP.prompt_groups(P[2:7], Pm[2:7]) == [1, 3, 1]


def test_transformers_path_equals_full_logits_in_values_and_gradients(monkeypatch):
    model = MODELS["qwen2"]()
    p_ids, p_mask, c_ids, c_mask, G = _case()
    P, Pm = p_ids.repeat_interleave(G, 0), p_mask.repeat_interleave(G, 0)
    up = torch.rand(c_ids.shape, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(chunked, "output_layer", lambda m: None)  # the model's own logits, as before
    monkeypatch.setattr(LP, "output_layer", lambda m: None)
    ref, ref_ent = LP.hf_completion_logprobs(model, P, Pm, c_ids, c_mask, 0.9, with_entropy=True)
    (ref * up).sum().backward()
    want = _grads(model)
    monkeypatch.undo()
    rec = _Record(monkeypatch)
    _no_full_logits(monkeypatch, model)
    lp, ent = LP.hf_completion_logprobs(model, P, Pm, c_ids, c_mask, 0.9, with_entropy=True, chunk_size=5)
    (lp * up).sum().backward()
    torch.testing.assert_close(lp, ref.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-5)
    _assert_grads_close(_grads(model), want)
    assert rec.rows == 5


def _sft_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE  # prompt
    labels[mask == 0] = IGNORE
    return SFTBatch(ids, mask, labels)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sft_loss_equals_full_cross_entropy(monkeypatch, arch):
    model = MODELS[arch]().train()
    batch = _sft_batch()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    want_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                                ignore_index=IGNORE, reduction="sum") / batch.num_tokens
    want_loss.backward()
    want = _grads(model)
    rec = _Record(monkeypatch)
    _no_full_logits(monkeypatch, model)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 3 * model.config.vocab_size)
    loss = sft_loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, want_loss.detach(), rtol=0, atol=1e-5)
    _assert_grads_close(_grads(model), want)
    assert rec.rows == 3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    model = MODELS[arch]().train()
    p_ids, p_mask, c_ids, c_mask, G = _case()
    up = torch.rand(c_ids.shape, generator=torch.Generator().manual_seed(3))
    lp, _ = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G)
    (lp * up).sum().backward()
    want = _grads(model)
    chunked.set_activation_checkpointing(model, True)
    assert chunked.activation_checkpointing(model)
    seen = []
    real = torch.utils.checkpoint.checkpoint

    def spy(*a, **k):
        seen.append(1)
        return real(*a, **k)

    torch.utils.checkpoint.checkpoint = spy
    try:
        lp2, _ = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, G)
    finally:
        torch.utils.checkpoint.checkpoint = real
    assert len(seen) == 2 * model.config.num_hidden_layers  # each layer over the prompts, then over the completions
    (lp2 * up).sum().backward()
    torch.testing.assert_close(lp2, lp.detach(), rtol=0, atol=1e-6)
    _assert_grads_close(_grads(model), want)


def test_long_prompt_padding_and_single_token_completions():
    """Rows whose prompts differ most in padding, completions of length 1 and full length."""
    model = MODELS["llama"]()
    p_ids, p_mask = _prompts([1, 30], seed=4)
    c_ids, c_mask = _completions([1, 40, 40, 2], 40, seed=5)
    lp, ent = fast_llama.completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, 2, with_entropy=True,
                                             chunk_size=7)
    ref, ref_ent = _hf_logps(model, p_ids, p_mask, c_ids, c_mask, 2)
    m = c_mask.bool()
    torch.testing.assert_close(lp[m], ref[m].detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[m], ref_ent[m].detach(), rtol=0, atol=1e-5)


# -- GRPO trainer -----------------------------------------------------------------------------------


def _trainer(path, state, **over):
    from r1flow.data.tasks import generate_tasks
    from r1flow.models import load_policy
    from r1flow.training.grpo import GRPOConfig, GRPOTrainer

    splits = generate_tasks(5, FAMILIES, {"train": 64})
    policy, tok = load_policy(str(path))
    ref, _ = load_policy(str(path))
    cfg = GRPOConfig.from_dict({"prompts_per_step": 3, "num_generations": 4, "max_completion_length": 16,
                                "steps": 2, "eval_every": 0, "save_every": 100, "learning_rate": 1e-3,
                                "warmup_steps": 0, "beta": 0.04, **over})
    return GRPOTrainer(policy, ref, tok, cfg, splits["train"], None, state)


def _weights_after_one_step(path, state, **over):
    t = _trainer(path, state, **over)
    row = t.step()
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}, row


@pytest.mark.parametrize("over", [{"fast_path": True}, {"fast_path": False},
                                  {"fast_path": True, "num_iterations": 2, "loss_type": "dapo"}])
def test_micro_batches_of_any_size_and_checkpointing_give_the_full_batch_step(tiny_policy, tmp_path, over):
    """Micro-batches of 3 and 5 rows with G = 4 (groups cut across micro-batches), and gradient
    checkpointing, update the weights as one batch of all 12 rows does."""
    path, _ = tiny_policy
    want, row = _weights_after_one_step(path, tmp_path / "full", **over)
    for i, extra in enumerate([{"micro_batch_size": 3}, {"micro_batch_size": 5},
                               {"micro_batch_size": 3, "gradient_checkpointing": True}]):
        got, r = _weights_after_one_step(path, tmp_path / f"mb{i}", **over, **extra)
        assert r["loss"] == pytest.approx(row["loss"], abs=1e-6)
        assert r["entropy"] == pytest.approx(row["entropy"], rel=1e-5)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
