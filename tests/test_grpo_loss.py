"""GRPO (eq. 1-3) against values computed by hand."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from r1flow.training.grpo_loss import Normalizer, group_advantages, grpo_loss, kl_k3, loss_mask


def test_advantages_eq3_population_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4)
    # group 1: mean 0.25, std sqrt(0.1875) = 0.4330127
    assert a[:4].tolist() == pytest.approx([1.7320508, -0.5773503, -0.5773503, -0.5773503], abs=1e-6)
    # group 2: all rewards equal -> no signal, exactly zero, not NaN
    assert a[4:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_advantages_dr_grpo_and_batch_scaling():
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])
    assert group_advantages(r, 2, "none").tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    std = torch.tensor([1.0, 0.0, 3.0, 3.0]).std(unbiased=False).item()  # 1.299038
    assert std == pytest.approx(1.2990381)
    assert group_advantages(r, 2, "batch").tolist() == pytest.approx([0.5 / std, -0.5 / std, 0.0, 0.0])
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(r, 2, "bogus")


def _reward_weights(node):
    """Every reward-weight mapping ({name: weight}) under a `rewards` key of a config tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "rewards" and isinstance(v, dict) and v and all(isinstance(w, (int, float)) for w in v.values()):
                yield v
            else:
                yield from _reward_weights(v)


def _config_weights():
    found = []
    for path in sorted(Path(__file__).resolve().parent.parent.glob("config/**/*.yaml")):
        found += [w for w in _reward_weights(yaml.safe_load(path.read_text())) if w not in found]
    return found


@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("value", [0.1, 1.475, 1 / 3, 0.7, 123.456])
def test_equal_rewards_not_exact_in_float32_carry_no_signal(value, scale):
    """Eight equal rewards of 0.1 (or 1.475) have a float32 std near 1e-8, not 0: dividing by it gave
    every output +1 or -1. A group with one reward value has no signal (advantage 0), whatever scaling."""
    r = torch.tensor([value] * 8 + [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    a = group_advantages(r, 8, scale)
    assert a[:8].tolist() == [0.0] * 8
    assert a[8:].abs().max() > 0  # the other group still learns


def test_equal_weighted_sums_of_every_config_carry_no_signal():
    """Groups whose outputs all get the same per-reward scores, summed with each config's weights as
    score_batch sums them: zero advantage. One output that differs: advantages of mean 0 and std 1."""
    weights = _config_weights()
    assert {"accuracy": 1.0, "format_readable": 0.25, "language_consistency": 0.25} in weights
    scores = [0.0, 1.0, 0.9, 1 / 3, 0.95, 0.5]
    G = 8
    for w in weights:
        for i, s in enumerate(scores):
            same = [sum(w[n] * scores[(i + j) % len(scores)] for j, n in enumerate(w))] * G
            a = group_advantages(torch.tensor(same), G)
            assert a.tolist() == [0.0] * G, (w, s)
            differ = torch.tensor(same[:-1] + [same[0] + 0.25])
            b = group_advantages(differ, G)
            assert b.mean().item() == pytest.approx(0.0, abs=1e-6)
            assert b.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_kl_estimator_eq2():
    # pi = 0.5, pi_ref = 0.25: 0.5 - ln 0.5 - 1 = 0.1931472
    v = kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert v.item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert kl_k3(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0


def _loss(ratio, adv, **kw):
    logp = torch.log(torch.tensor([[ratio]]))
    old = torch.zeros(1, 1)
    return grpo_loss(logp, old, None, torch.tensor([adv]), torch.ones(1, 1), **kw)


@pytest.mark.parametrize(
    "ratio,adv,expected_objective,clipped",
    [
        (1.5, 1.0, 1.2, True),  # above 1 + epsilon with A > 0: clipped
        (0.5, 1.0, 0.5, False),  # below 1 - epsilon with A > 0: min takes the unclipped term
        (0.5, -1.0, -0.8, True),  # below 1 - epsilon with A < 0: clipped
        (1.5, -1.0, -1.5, False),  # above 1 + epsilon with A < 0: unclipped (pessimistic bound)
        (1.1, 2.0, 2.2, False),  # inside the trust region
    ],
)
def test_clipped_objective(ratio, adv, expected_objective, clipped):
    loss, st = _loss(ratio, adv, epsilon=0.2)
    assert loss.item() == pytest.approx(-expected_objective, abs=1e-6)
    assert st["clipped_tokens"] == (1.0 if clipped else 0.0)


def test_dapo_clip_higher():
    loss, _ = _loss(1.5, 1.0, epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-1.28, abs=1e-6)
    loss, _ = _loss(0.5, -1.0, epsilon=0.2, epsilon_high=0.28)  # lower bound unchanged
    assert loss.item() == pytest.approx(0.8, abs=1e-6)


def _two_rows():
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -3.0])
    return logp, mask, adv


@pytest.mark.parametrize("loss_type,expected", [("grpo", 1.0), ("dapo", 1 / 3), ("dr_grpo", 1 / 6)])
def test_aggregation_variants(loss_type, expected):
    # ratio 1 everywhere, beta 0: per-token loss = -A; row 0 has tokens (-1, -1), row 1 has (3)
    logp, mask, adv = _two_rows()
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, loss_type=loss_type)
    # grpo: mean(-1, 3) = 1; dapo: (-2 + 3) / 3 tokens; dr_grpo: 1 / (2 outputs x 3 max length)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_gradient_of_grpo_aggregation():
    logp, mask, adv = _two_rows()
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, loss_type="grpo")
    loss.backward()
    # d loss / d logp_{i,t} = -A_i / |o_i| / rows at ratio 1
    assert logp.grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.0, 1.5, 0.0, 0.0])


def test_truncated_completions_masked():
    logp, mask, adv = _two_rows()
    m = loss_mask(mask, torch.tensor([False, True]), mask_truncated=True)
    assert m.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, m, loss_type="grpo")
    assert loss.item() == pytest.approx(-1.0)  # the masked row is not averaged in
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, m, loss_type="dapo")
    assert loss.item() == pytest.approx(-1.0)
    assert loss_mask(mask, torch.tensor([False, True]), mask_truncated=False).tolist() == mask.tolist()


def test_kl_penalty_weighted_by_beta():
    logp = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    loss, st = grpo_loss(logp, logp, ref, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)
    assert loss.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1), abs=1e-6)
    assert st["kl_sum"] == pytest.approx(2 * (0.5 + math.log(2) - 1), abs=1e-6)


def test_sequence_level_ratio():
    # token log-ratios 0.1 and 0.3 -> sequence ratio exp(0.2) = 1.2214 for every token -> clipped at 1.2
    logp = torch.tensor([[0.1, 0.3]], requires_grad=True)
    loss, st = grpo_loss(logp, torch.zeros(1, 2), None, torch.tensor([1.0]), torch.ones(1, 2),
                         importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)
    assert st["clipped_tokens"] == 2
    loss, _ = grpo_loss(logp, torch.zeros(1, 2), None, torch.tensor([1.0]), torch.ones(1, 2),
                        importance_sampling_level="token")
    assert loss.item() == pytest.approx(-(math.exp(0.1) + 1.2) / 2, abs=1e-6)


def test_all_equal_rewards_give_zero_loss_and_finite_grads():
    rewards = torch.ones(8)
    adv = group_advantages(rewards, 4)
    logp = torch.randn(8, 5, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, torch.ones(8, 5))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logp.grad).all()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_sum_to_full_batch(loss_type):
    torch.manual_seed(0)
    logp = torch.randn(6, 4) * 0.1
    old = logp + torch.randn(6, 4) * 0.1
    ref = logp + torch.randn(6, 4) * 0.1
    adv = torch.randn(6)
    mask = (torch.rand(6, 4) > 0.3).float()
    mask[:, 0] = 1
    kw = dict(beta=0.04, loss_type=loss_type)
    full, _ = grpo_loss(logp, old, ref, adv, mask, **kw)
    norm = Normalizer.of(mask, 4)
    parts = sum(grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], normalizer=norm, **kw)[0]
                for s in (slice(0, 2), slice(2, 6)))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_temperature_zero_refused_by_the_python_api_with_the_config_message():
    """Greedy sampling has no distribution to take log-probs of (logits / 0 gives NaN): GRPOConfig and
    every log-prob function refuse it, with the message the config check gives."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from r1flow.config import ConfigError, validate_config
    from r1flow.models import fast_llama
    from r1flow.models import logprobs
    from r1flow.training.grpo import GRPOConfig

    schema = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
    with pytest.raises(ConfigError) as from_config:
        validate_config({"r1_zero": {"grpo": {"temperature": 0}}}, schema)
    expected = "expected a value > 0, got 0"
    assert f"'r1_zero.grpo.temperature': {expected}" in str(from_config.value)

    with pytest.raises(ConfigError, match=f"config key 'temperature': {expected}"):
        GRPOConfig(temperature=0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    p, pm = torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long)
    c, cm = torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long)
    calls = {
        "token_logprobs": lambda: logprobs.token_logprobs(torch.zeros(1, 2, 16), c, temperature=0),
        "hf": lambda: logprobs.completion_logprobs(model, p, pm, c, cm, 1, temperature=0, fast=False),
        "fast": lambda: logprobs.completion_logprobs(model, p, pm, c, cm, 1, temperature=0, fast=True),
        "fast_llama": lambda: fast_llama.completion_logprobs(model, p, pm, c, cm, 1, temperature=0),
    }
    for name, call in calls.items():
        with pytest.raises(ConfigError, match=f"config key 'temperature': {expected}"):
            call()
    assert torch.isfinite(logprobs.completion_logprobs(model, p, pm, c, cm, 1, temperature=0.5)[0]).all()


def test_truncated_importance_weights_by_hand():
    """w = min(exp(old - sampler), cap) per token; 1 where the sampler gave no log-prob or off the mask;
    it scales the policy-gradient term only, not the KL term."""
    import math

    from r1flow.training.grpo_loss import truncated_importance_weights

    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.5, -0.5, float("nan")], [-4.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w, st = truncated_importance_weights(old, sampler, mask, cap=2.0)
    want = [[math.exp(0.5), math.exp(-1.5), 1.0], [2.0, 1.0, 1.0]]  # exp(3) capped at 2
    assert w.tolist() == [pytest.approx(r) for r in want]
    assert st["is_tokens"] == 4 and st["is_capped_tokens"] == 1
    assert st["is_ratio_sum"] == pytest.approx(math.exp(0.5) + math.exp(-1.5) + math.exp(3.0) + 1.0)
    with pytest.raises(ValueError):
        truncated_importance_weights(old, sampler, mask, cap=0.0)

    # in the loss: per token -min(rho A, clip(rho) A) * w, plus beta * kl unweighted
    logp = torch.tensor([[-0.9, -2.1, -0.5], [-1.2, -0.8, -1.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, _ = grpo_loss(logp, old, ref, adv, mask.float(), epsilon=0.2, beta=0.1, loss_type="dapo", is_weights=w)
    total = 0.0
    for i in range(2):
        for t in range(3):
            if not mask[i, t]:
                continue
            rho, a = math.exp(logp[i, t].item() - old[i, t].item()), adv[i].item()
            obj = min(rho * a, min(max(rho, 0.8), 1.2) * a) * w[i, t].item()
            d = ref[i, t].item() - logp[i, t].item()
            total += -(obj - 0.1 * (math.exp(d) - d - 1))
    assert loss.item() == pytest.approx(total / 5, rel=1e-5)
