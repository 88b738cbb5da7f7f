"""Learning in bfloat16 (base_model.dtype: bfloat16, lr 3e-6 in the cluster config): every trainer steps on
float32 master weights, so a bf16 model follows the float32 run to bf16 rounding, where an optimiser on
the bf16 weights themselves loses most updates (each is below half a bf16 unit of its weight)."""

import copy

import pytest
import torch
from conftest import FAMILIES

from r1flow import rewards as R
from r1flow.data.preferences import make_preferences
from r1flow.data.prompts import R1_CHAT_TEMPLATE
from r1flow.data.tasks import generate_tasks
from r1flow.models import load_policy, save_policy
from r1flow.models.reward_model import load_reward_model
from r1flow.training import engine as E
from r1flow.training.engine import DeepSpeedEngine, DeepSpeedSettings, deepspeed_config, make_engine, master_parameters
from r1flow.training.grpo import GRPOConfig, GRPOTrainer
from r1flow.training.reward_model import train_reward_model
from r1flow.training.sft import chat_pairs, collate, sft_step, train_sft

LR = 3e-6
CONVERSATIONS = [[{"role": "user", "content": f"What is {a}+{b}?"},
                  {"role": "assistant", "content": f"{a}+{b}={a + b}"}] for a in range(4) for b in range(2)]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at each value of x (8 significant bits)."""
    _, e = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), (e - 8).clamp(min=-133))


def bf16_and_fp32_twins(model16):
    """The bf16 model, a float32 copy holding exactly its values, and a second bf16 copy for plain AdamW."""
    return model16, copy.deepcopy(model16).float(), copy.deepcopy(model16)


def assert_follows_fp32(m16, m32, plain, w0, min_moved):
    """After many updates at lr 3e-6: the bf16 model is the float32 run's weights cast to bf16, within one
    bf16 unit, where the float32 run moved them by at least one; plain bf16 AdamW left those unchanged."""
    a, pl, z = flat(m16.parameters()), flat(plain.parameters()), flat(w0)
    f = flat(p.detach().bfloat16() for p in m32.parameters())
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    moved = f != z  # the float32 run crossed at least one bf16 step there
    assert moved.float().mean() > min_moved
    within = (a - f).abs() <= bf16_ulp(f)
    # a few weights whose bf16 and float32 gradients differ in sign drift apart (about 1% for the reward model)
    assert within.float().mean() > 0.98
    assert (a != z)[moved].float().mean() > 0.95
    # the defect guarded against: most of what the float32 run learned never reaches plain bf16 weights
    assert (pl == z)[moved].float().mean() > 0.9
    assert ((pl - f).abs() <= bf16_ulp(f)).float().mean() < 0.9


def assert_one_update_kept(master, m16, m32, plain, w0):
    """After one update at lr 3e-6: the master weights moved as the float32 run's (each by about lr), the
    bf16 model is them rounded; plain bf16 AdamW left almost every weight where it was."""
    m, f, z = flat(master.master), flat(m32.parameters()), flat(w0)
    assert (f != z).float().mean() > 0.5  # the float32 update changed most weights
    assert ((m - z) - (f - z)).abs().le(0.1 * LR).float().mean() > 0.95
    assert torch.equal(flat(m16.parameters()), m.bfloat16().float())
    assert ((flat(m16.parameters()) - f.bfloat16().float()).abs() <= bf16_ulp(f)).float().mean() > 0.999
    assert (flat(plain.parameters()) == z).float().mean() > 0.9


@pytest.fixture
def plain_bf16(monkeypatch):
    """Switches the trainers back to before master weights: their optimiser on the bf16 parameters."""
    return lambda: monkeypatch.setattr(E, "LOW_PRECISION", ())


# -- SFT -----------------------------------------------------------------------------------------------
def test_sft_in_bf16_follows_the_float32_run(tiny_policy, plain_bf16):
    m16, tok = load_policy(str(tiny_policy[0]), "bfloat16")
    tok.chat_template = R1_CHAT_TEMPLATE
    m16, m32, plain = bf16_and_fp32_twins(m16)
    w0 = [p.detach().clone() for p in m16.parameters()]
    prompts, completions = chat_pairs(tok, CONVERSATIONS)
    # one batch of all examples per epoch: 40 updates on the same examples, two micro-batches each
    kw = dict(epochs=40, learning_rate=LR, batch_size=len(prompts), micro_batch_size=4, warmup_steps=0)
    train_sft(m16, tok, prompts, completions, **kw)
    train_sft(m32, tok, prompts, completions, **kw)
    plain_bf16()
    train_sft(plain, tok, prompts, completions, **kw)
    assert_follows_fp32(m16, m32, plain, w0, min_moved=0.5)


def test_one_sft_update_in_bf16_is_the_float32_update(tiny_policy, plain_bf16):
    m16, tok = load_policy(str(tiny_policy[0]), "bfloat16")
    tok.chat_template = R1_CHAT_TEMPLATE
    m16, m32, plain = bf16_and_fp32_twins(m16)
    w0 = [p.detach().clone() for p in m16.parameters()]
    batch = collate(tok, *chat_pairs(tok, CONVERSATIONS))

    def engine(model):  # as train_sft builds it
        params, master = master_parameters(model)
        return make_engine(model, torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95)), 1.0, master=master)

    e16, e32 = engine(m16), engine(m32)
    assert e32.master is None  # float32: the optimiser is on the model's own parameters
    assert [id(p) for g in e32.optimizer.param_groups for p in g["params"]] == [id(p) for p in m32.parameters()]
    # two micro-batches: the gradients meet in float32 (the master's), none is left on the bf16 model
    e16.zero_grad()
    for mb in (batch[:4], batch[4:]):
        e16.backward(torch.nn.functional.softplus(m16(input_ids=mb.input_ids).logits.float().mean()))
    assert all(m.grad.dtype == torch.float32 for m in e16.master.master)
    assert all(p.grad is None for p in m16.parameters())
    e16.zero_grad()
    sft_step(e16, [batch[:4], batch[4:]])
    sft_step(e32, [batch[:4], batch[4:]])
    assert all(v.dtype == torch.float32 for st in e16.optimizer.state.values() for v in st.values() if v.dim())
    plain_bf16()
    sft_step(E.LocalEngine(plain, torch.optim.AdamW(plain.parameters(), lr=LR, betas=(0.9, 0.95)), 1.0),
             [batch[:4], batch[4:]])
    assert_one_update_kept(e16.master, m16, m32, plain, w0)


# -- reward models -------------------------------------------------------------------------------------
def test_reward_model_in_bf16_follows_the_float32_run(tiny_policy, tmp_path, plain_bf16):
    # a reward model folder in bf16, so both runs start from the same score head (bf16 values)
    rm, tok = load_reward_model(tiny_policy[0], dtype="bfloat16")
    save_policy(rm, tok, tmp_path / "rm0")
    pairs = make_preferences(4, 0, seed=0).head(1)  # one pair: every step the same batch
    kw = dict(steps=80, lr=LR, batch_size=4, seed=0)
    m16, _, _ = train_reward_model(tmp_path / "rm0", pairs, "helpfulness", None, dtype="bfloat16", **kw)
    m32, _, _ = train_reward_model(tmp_path / "rm0", pairs, "helpfulness", None, dtype="float32", **kw)
    plain_bf16()
    plain, _, _ = train_reward_model(tmp_path / "rm0", pairs, "helpfulness", None, dtype="bfloat16", **kw)
    w0 = list(load_reward_model(tmp_path / "rm0", dtype="bfloat16")[0].parameters())
    assert_follows_fp32(m16, m32, plain, w0, min_moved=0.3)


# -- GRPO ----------------------------------------------------------------------------------------------
LENGTH_REWARD = "test_bf16_length"
if LENGTH_REWARD not in R.REGISTRY:  # any two outputs of different lengths differ: every group has signal
    R.register(LENGTH_REWARD)(R.per_sample(lambda c, a: R.Reward(len(c) / 10, "len")))


def _grpo(model, tok, state, mu):
    train = generate_tasks(5, FAMILIES, {"train": 8, "validation": 1})["train"]
    cfg = GRPOConfig.from_dict({"prompts_per_step": 2, "num_generations": 4, "max_completion_length": 12,
                                "steps": 1, "eval_every": 0, "save_every": 1, "learning_rate": LR,
                                "warmup_steps": 0, "beta": 0.0, "num_iterations": mu,
                                "rewards": {LENGTH_REWARD: 1.0}})
    return GRPOTrainer(model, None, tok, cfg, train, None, state)


def _grpo_runs(path, tmp_path, plain_bf16, mu):
    """The bf16, float32 and plain-bf16 trainers after one GRPO step, all on the float32 run's completions."""
    m16, tok = load_policy(str(path), "bfloat16")
    m16, m32, plain = bf16_and_fp32_twins(m16)
    w0 = [p.detach().clone() for p in m16.parameters()]
    t32 = _grpo(m32, tok, tmp_path / "f", mu)
    sampled = []
    generate = t32.generator.generate
    t32.generator.generate = lambda *a, **k: sampled.append(generate(*a, **k)) or sampled[-1]
    row = t32.step()
    assert row["groups_with_signal"] == 1.0
    t16 = _grpo(m16, tok, tmp_path / "b", mu)
    t16.generator.generate = lambda *a, **k: sampled[0]
    t16.step()
    plain_bf16()
    tp = _grpo(plain, tok, tmp_path / "p", mu)
    tp.generator.generate = lambda *a, **k: sampled[0]
    tp.step()
    return t16, t32, tp, w0


def test_grpo_in_bf16_follows_the_float32_run(tiny_policy, tmp_path, plain_bf16):
    # mu = 40 passes over one step's completions: 40 updates through LocalEngine
    t16, t32, tp, w0 = _grpo_runs(tiny_policy[0], tmp_path, plain_bf16, mu=40)
    assert all(v.dtype == torch.float32 for st in t16.opt.state.values() for v in st.values() if v.dim())
    assert_follows_fp32(t16.model, t32.model, tp.model, w0, min_moved=0.3)


def test_one_grpo_update_in_bf16_is_the_float32_update(tiny_policy, tmp_path, plain_bf16):
    t16, t32, tp, w0 = _grpo_runs(tiny_policy[0], tmp_path, plain_bf16, mu=1)
    assert isinstance(t16.engine, E.LocalEngine) and t32.engine.master is None
    assert_one_update_kept(t16.engine.master, t16.model, t32.model, tp.model, w0)


def test_grpo_checkpoint_keeps_the_master_weights(tiny_policy, tmp_path):
    """A resumed bf16 run goes on from the float32 master weights, not from their bf16 rounding."""
    model, tok = load_policy(str(tiny_policy[0]), "bfloat16")
    t = _grpo(copy.deepcopy(model), tok, tmp_path / "s", mu=1)
    t.train(progress=False)
    resumed = _grpo(copy.deepcopy(model), tok, tmp_path / "s", mu=1)
    assert resumed._try_resume() and resumed.step_no == 1
    saved, now = flat(t.engine.master.master), flat(resumed.engine.master.master)
    assert torch.equal(saved, now) and not torch.equal(now, flat(resumed.model.parameters()))


# -- refusals and DeepSpeed ----------------------------------------------------------------------------
def test_bf16_weights_without_master_weights_are_refused(tiny_policy):
    model, _ = load_policy(str(tiny_policy[0]), "bfloat16")
    with pytest.raises(ValueError, match="master_parameters"):
        make_engine(model, torch.optim.AdamW(model.parameters(), lr=LR), 1.0)
    # DeepSpeed keeps master weights only in its bf16 mode: refused before DeepSpeed is even imported
    with pytest.raises(ValueError, match="deepspeed.bf16 is false"):
        DeepSpeedEngine(model, torch.optim.AdamW(model.parameters(), lr=LR), 1.0,
                        DeepSpeedSettings.from_dict({"enabled": True, "zero_stage": 2}))
    # and with DeepSpeed the optimiser is on the model's parameters (DeepSpeed makes the fp32 copies)
    params, master = master_parameters(model, {"enabled": True, "zero_stage": 2, "bf16": True})
    assert master is None and [id(p) for p in params] == [id(p) for p in model.parameters()]


def test_deepspeed_bf16_accumulates_gradients_in_fp32():
    bf16 = deepspeed_config(DeepSpeedSettings.from_dict({"enabled": True, "zero_stage": 2, "bf16": True}), 1.0)
    assert bf16["bf16"] == {"enabled": True} and bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = deepspeed_config(DeepSpeedSettings.from_dict({"enabled": True, "zero_stage": 2}), 1.0)
    assert "data_types" not in fp32 and fp32["bf16"] == {"enabled": False}  # the float32 config as it was
    # without ZeRO DeepSpeed accumulates bf16 gradients in bf16 and refuses fp32 accumulation
    with pytest.raises(ValueError, match="zero_stage 1 or 2"):
        DeepSpeedSettings.from_dict({"enabled": True, "zero_stage": 0, "bf16": True})


# -- loading in the configured dtype -------------------------------------------------------------------
def test_rl_reward_models_load_in_the_given_dtype(tiny_policy, tmp_path):
    from r1flow.rewards.model_based import load_cached

    rm, tok = load_reward_model(tiny_policy[0])
    save_policy(rm, tok, tmp_path / "rm")
    out = R.get("helpfulness")(["<answer> 5 </answer>"], ["5"], prompts=["What is 2+3?"], path=str(tmp_path / "rm"),
                               dtype="bfloat16")
    assert isinstance(out[0].score, float)
    assert {p.dtype for p in load_cached(tmp_path / "rm", "cpu", "bfloat16")[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_cached(tmp_path / "rm", "cpu")[0].parameters()} == {torch.float32}


def test_rejection_sampling_with_vllm_holds_no_hf_model(tiny_policy, monkeypatch):
    """vLLM loads the weights itself: sample_completions must not load a second copy of the model."""
    import r1flow.training.sft_data as S

    def no_policy(*a, **k):
        raise AssertionError("load_policy called with the vllm backend")

    seen = {}

    class FakeVLLM:
        def generate(self, prompts, params, **k):
            n = params.n * len(prompts)
            return type("Out", (), {"texts": ["x"] * n, "truncated": torch.zeros(n, dtype=torch.bool)})()

    def fake_make_generator(model, tok, settings, **k):
        seen.update(model=model, tok=tok, path=k.get("model_path"))
        return FakeVLLM()

    monkeypatch.setattr(S, "load_policy", no_policy)
    monkeypatch.setattr(S, "make_generator", fake_make_generator)
    s = {"samples_per_prompt": 2, "temperature": 0.7, "max_new_tokens": 8, "seed": 0}
    texts, cut = S.sample_completions(str(tiny_policy[0]), lambda tok: ["a", "b"], s, {"backend": "vllm"},
                                      dtype="bfloat16")
    assert texts == ["x"] * 4 and cut == [False] * 4
    assert seen["model"] is None and seen["path"] == str(tiny_policy[0]) and seen["tok"].eos_token_id is not None
