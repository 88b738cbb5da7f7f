"""GRPO options of issue 28 that change the update, each off by default: several updates per rollout
(mini-batches of one batch of samples), an entropy bonus, and training only on high-entropy tokens.
The loss of each update is recomputed by hand from what the trainer passed to it."""

import pytest
import torch
from test_grpo_options import _params, _tasks, _trainer, marked_reward  # noqa: F401

from r1flow.models.chunked import linear_logprobs
from r1flow.models.logprobs import completion_logprobs
from r1flow.training import grpo as grpo_module
from r1flow.training.grpo import GRPOConfig
from r1flow.training.grpo_loss import Normalizer, grpo_loss


def _spy_loss(monkeypatch):
    """Every grpo_loss call of the trainer: its inputs (detached) and the loss it returned."""
    calls = []

    def spy(logp, old_logp, ref_logp, advantages, mask, **kw):
        loss, st = grpo_loss(logp, old_logp, ref_logp, advantages, mask, **kw)
        calls.append({"logp": logp.detach().clone(), "old": old_logp.detach().clone(), "adv": advantages.clone(),
                      "mask": mask.clone(), "loss": loss.item(), **kw})
        return loss, st

    monkeypatch.setattr(grpo_module, "grpo_loss", spy)
    return calls


def _count_updates(t, monkeypatch):
    n, step = [0], t.engine.step

    def counted():
        n[0] += 1
        return step()

    monkeypatch.setattr(t.engine, "step", counted)
    return n


def _hand_loss(call, epsilon=0.2):
    """The negative of eq. 1 (loss_type grpo, beta 0): per output the mean over its tokens of
    min(r A, clip(r, 1 - eps, 1 + eps) A), summed and divided by the rows of the update's mini-batch."""
    total = 0.0
    for i in range(call["mask"].shape[0]):
        toks = call["mask"][i].nonzero().flatten().tolist()
        if not toks:
            continue
        terms = []
        for t in toks:
            r = float(torch.exp(call["logp"][i, t] - call["old"][i, t]))
            a = float(call["adv"][i])
            keep = 1.0 if call.get("pg_mask") is None else float(call["pg_mask"][i, t])
            terms.append(keep * min(r * a, min(max(r, 1 - epsilon), 1 + epsilon) * a))
        total += -sum(terms) / len(toks)
    return total / call["normalizer"].rows


# -- several updates per rollout ---------------------------------------------------------------------------
def test_mini_batches_are_updates_whose_first_ratio_is_one(tiny_policy, tmp_path, monkeypatch, marked_reward):
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "u", _tasks(8, lambda i: True), prompts_per_step=2, num_generations=4,
                 updates_per_rollout=2, learning_rate=5e-3)
    calls, updates = _spy_loss(monkeypatch), _count_updates(t, monkeypatch)
    t.step()
    assert updates[0] == 2 and len(calls) == 2  # two mini-batches of 4 outputs, one update each
    first, second = calls
    m1, m2 = first["mask"].bool(), second["mask"].bool()
    # the first update runs on the policy that sampled: ratio 1 on every token
    assert torch.equal(first["logp"][m1], first["old"][m1])
    # the second runs after the first update, against the same sampling policy: ratios away from 1
    assert (second["logp"][m2] - second["old"][m2]).abs().max() > 1e-5
    for call in calls:  # each update's loss over its own mini-batch, as computed by hand
        assert call["normalizer"].rows == float((call["mask"].sum(1) > 0).sum())
        assert call["loss"] == pytest.approx(_hand_loss(call), rel=1e-5, abs=1e-7)
    assert calls[0]["adv"].shape == (4,) and calls[1]["adv"].shape == (4,)


def test_mini_batches_split_into_micro_batches_give_the_same_update(tiny_policy, tmp_path, marked_reward):
    """micro_batch_size cuts each update's mini-batch further (gradient accumulation): same weights."""
    path, _ = tiny_policy
    train = _tasks(8, lambda i: True)
    runs = []
    for mb in (0, 1):
        t = _trainer(path, tmp_path / f"m{mb}", train, prompts_per_step=2, num_generations=4, updates_per_rollout=2,
                     micro_batch_size=mb, learning_rate=5e-3)
        t.step()
        runs.append(_params(t.model))
    # two Adam updates of lr 5e-3 each: the summation order moves the weights by ~4e-6, the updates by > 1e-3
    assert all(torch.allclose(runs[0][k], runs[1][k], atol=2e-5) for k in runs[0])
    start = _params(_trainer(path, tmp_path / "s", train).model)
    assert max(float((runs[0][k] - start[k]).abs().max()) for k in start) > 1e-3


@pytest.mark.parametrize("over, forwards", [({}, 1), ({"updates_per_rollout": 2}, 4),
                                             ({"top_entropy_quantile": 0.5}, 2), ({"entropy_coeff": 0.1}, 1)])
def test_the_defaults_add_no_forward(tiny_policy, tmp_path, monkeypatch, marked_reward, over, forwards):
    """With every new setting off a step runs the one policy forward it ran before (beta 0: no reference);
    old log-probs are taken before the updates only where an update needs them."""
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "f", _tasks(8, lambda i: True), num_generations=4, **over)
    n, real = [0], grpo_module.completion_logprobs

    def counted(*a, **k):
        n[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(grpo_module, "completion_logprobs", counted)
    t.step()
    assert n[0] == forwards


def test_updates_per_rollout_beyond_the_outputs_is_refused():
    with pytest.raises(ValueError, match=r"updates_per_rollout must lie in \[1, prompts_per_step x num_generations = 8\]"):
        GRPOConfig(prompts_per_step=2, num_generations=4, updates_per_rollout=9)
    with pytest.raises(ValueError, match="updates_per_rollout"):
        GRPOConfig(updates_per_rollout=0)


# -- high-entropy tokens -----------------------------------------------------------------------------------
def test_only_the_top_entropy_tokens_carry_the_policy_gradient(tiny_policy, tmp_path, monkeypatch, marked_reward):
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "e", _tasks(8, lambda i: True), prompts_per_step=2, num_generations=4,
                 top_entropy_quantile=0.25, max_completion_length=12)
    calls = _spy_loss(monkeypatch)
    captured = {}
    generate = t._generate

    def keep(*a, **k):
        captured["out"] = generate(*a, **k)
        return captured["out"]

    monkeypatch.setattr(t, "_generate", keep)
    start = _params(t.model)
    t.step()
    (call,) = calls
    out = captured["out"]
    cs = slice(0, call["mask"].shape[1])
    t.model.load_state_dict(start)
    with torch.no_grad():  # the sampling policy's entropies, recomputed here
        _, ent = completion_logprobs(t.model, out.prompt_ids, out.prompt_mask, out.completion_ids[:, cs],
                                     out.completion_mask[:, cs], 4, t.cfg.temperature, with_entropy=True)
    m = call["mask"].bool()
    kept = call["pg_mask"].bool() & m
    n = int(m.sum())
    # the (1 - q) quantile: about a quarter of the completion tokens kept, every kept one above every dropped one
    assert n // 4 <= int(kept.sum()) <= n // 4 + 2
    assert ent[kept].min() >= ent[m & ~kept].max() - 1e-6
    assert call["loss"] == pytest.approx(_hand_loss(call), rel=1e-5, abs=1e-7)


def test_entropy_mask_and_bonus_in_the_loss_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.5]]))
    old = logp.clone()  # ratio 1
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([2.0])
    norm = Normalizer.of(mask, 3)
    # pg_mask keeps token 0 only: objective (1 x 2 + 0) / 2 tokens = 1, loss -1
    loss, _ = grpo_loss(logp, old, None, adv, mask, pg_mask=torch.tensor([[1.0, 0.0, 1.0]]), normalizer=norm)
    assert loss.item() == pytest.approx(-1.0)
    # an entropy bonus of 0.1 x entropies (3, 1): objective per token 2 + 0.3 and 2 + 0.1, mean 2.2
    ent = torch.tensor([[3.0, 1.0, 7.0]])
    loss, _ = grpo_loss(logp, old, None, adv, mask, entropy=ent, entropy_coeff=0.1, normalizer=norm)
    assert loss.item() == pytest.approx(-2.2)


def test_entropy_gradient_is_exact():
    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=True)
    tok = torch.randint(0, 11, (7,))
    a, b = torch.randn(7), torch.randn(7)
    lp, ent = linear_logprobs(h, w, tok, temperature=0.7, entropy_grad=True, chunk_size=3)
    ((lp * a).sum() + (ent * b).sum()).backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ls = torch.log_softmax(h @ w.t() / 0.7, -1)
    ((ls.gather(-1, tok[:, None]).squeeze(-1) * a).sum() + (-(ls.exp() * ls).sum(-1) * b).sum()).backward()
    assert torch.allclose(got[0], h.grad, atol=1e-5) and torch.allclose(got[1], w.grad, atol=1e-5)
    _, detached = linear_logprobs(h, w, tok, with_entropy=True)
    assert not detached.requires_grad  # without entropy_grad the entropy stays a metric


@pytest.mark.parametrize("coeff", [1.0, -1.0])
def test_entropy_bonus_alone_moves_the_entropy_its_way(tiny_policy, tmp_path, monkeypatch, marked_reward, coeff):
    """With every group flat (advantage 0) only the entropy term has a gradient: a bonus raises the
    policy's entropy on the step's own completions, a penalty lowers it."""
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / f"b{coeff}", _tasks(8, lambda i: False), prompts_per_step=2, num_generations=4,
                 entropy_coeff=coeff, learning_rate=1e-3, max_completion_length=12)
    captured = {}
    generate = t._generate

    def keep(*a, **k):
        captured["out"] = generate(*a, **k)
        return captured["out"]

    monkeypatch.setattr(t, "_generate", keep)

    def mean_entropy():
        out = captured["out"]
        with torch.no_grad():
            _, ent = completion_logprobs(t.model, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                         out.completion_mask, 4, t.cfg.temperature, with_entropy=True)
        return float((ent * out.completion_mask).sum() / out.completion_mask.sum())

    start = _params(t.model)
    t.step()
    after = mean_entropy()
    t.model.load_state_dict(start)
    before = mean_entropy()
    assert (after - before) * coeff > 1e-4
