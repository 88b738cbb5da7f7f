"""Reward models of section 2.3.4: preference data, Bradley-Terry training, the model-based rewards."""

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from r1flow import rewards as R
from r1flow.data.artifacts import ArtifactError, read_table, write_table
from r1flow.data.formats import READABLE_MARKER, split_readable
from r1flow.data.preferences import make_preferences, prompt_text
from r1flow.data.schemas import PREFERENCES, RM_METRICS
from r1flow.models.reward_model import render_for_rm, rm_response
from r1flow.training.reward_model import (
    bradley_terry_loss,
    evaluate_reward_model,
    pairwise_accuracy,
    train_reward_model,
)

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
# measured on the tiny_policy fixture, 1 thread: helpfulness ~7-9 s, held-out pairwise accuracy 0.85-0.89;
# harmlessness ~2-3 s, 0.92-1.0 (seeds 0-2)
HELP_SETTINGS = dict(steps=100, lr=5e-3, batch_size=32, seed=0)
HARM_SETTINGS = dict(steps=30, lr=5e-3, batch_size=16, seed=0)


def held_out(train: pd.DataFrame, seed: int, n: int) -> pd.DataFrame:
    """Pairs whose prompt text never occurs in `train`, so accuracy measures generalisation, not recall."""
    other = make_preferences(n, n, seed=seed)
    return other[~other["prompt"].map(prompt_text).isin(set(train["prompt"].map(prompt_text)))]


@pytest.fixture(scope="module")
def train_pairs():
    return make_preferences(200, 200, seed=0)


@pytest.fixture(scope="module")
def helpful_rm(tiny_policy, train_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "helpfulness"
    model, tok, metrics = train_reward_model(tiny_policy[0], train_pairs, "helpfulness", out, **HELP_SETTINGS)
    return out, model, tok, metrics


@pytest.fixture(scope="module")
def harmless_rm(tiny_policy, train_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "harmlessness"
    model, tok, metrics = train_reward_model(tiny_policy[0], train_pairs, "harmlessness", out, **HARM_SETTINGS)
    return out, model, tok, metrics


# -- loss -------------------------------------------------------------------------------------------------
def test_bradley_terry_loss_hand_computed():
    # -log sigmoid(1 - 0) = log(1 + e^-1) = 0.31326...; -log sigmoid(0 - 2) = log(1 + e^2) = 2.12693...
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(0.3132617, abs=1e-6)
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([2.0])).item() == pytest.approx(2.1269280, abs=1e-6)
    got = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])).item()
    assert got == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(2))) / 2, abs=1e-6)
    # stable far out: a margin of 200 costs ~0, a margin of -200 costs ~200 (no inf / nan)
    far = bradley_terry_loss(torch.tensor([100.0, -100.0]), torch.tensor([-100.0, 100.0]))
    assert far.item() == pytest.approx(100.0)
    r = torch.tensor([0.5, 0.3], requires_grad=True)
    bradley_terry_loss(r[:1], r[1:]).backward()
    s = 1 / (1 + math.exp(-0.2))  # d/dr_c = -(1 - sigmoid(r_c - r_r)), d/dr_r = +(1 - sigmoid)
    assert r.grad.tolist() == pytest.approx([-(1 - s), 1 - s], abs=1e-6)


def test_pairwise_accuracy_ties_count_half():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 2.0, 0.0])) == 0.5
    assert pairwise_accuracy(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 1.0])) == 1.0


# -- preference data --------------------------------------------------------------------------------------
def test_preferences_schema_and_parquet_roundtrip(tmp_path):
    df = make_preferences(30, 40, seed=3)
    assert df.equals(make_preferences(30, 40, seed=3))  # deterministic from the seed
    assert not df.equals(make_preferences(30, 40, seed=4))
    assert df["aspect"].value_counts().to_dict() == {"harmlessness": 40, "helpfulness": 30}
    assert df["pair_id"].is_unique
    row = df.iloc[0]
    assert row["prompt"][0]["role"] == "user" and [m["role"] for m in row["chosen"]] == ["assistant"]
    write_table(df, tmp_path / "p.parquet", PREFERENCES)
    back = read_table(tmp_path / "p.parquet", PREFERENCES)
    assert back.to_dict("records") == df.to_dict("records")  # message lists come back as plain lists
    assert isinstance(back.at[0, "prompt"], list)


def test_preferences_content():
    df = make_preferences(300, 300, seed=0)
    harm = df[df["aspect"] == "harmlessness"]
    readable_share = harm["chosen"].map(lambda m: split_readable(m[0]["content"]) is not None).mean()
    assert 0.35 < readable_share < 0.65  # readable_share=0.5 by default
    harmful = harm[harm["kind"] == "harmful"]
    assert harmful["chosen"].map(lambda m: "sorry" in m[0]["content"].lower() or "can't" in m[0]["content"]).all()
    benign = harm[harm["kind"] == "benign"]
    assert set(benign["flaw"]) == {"needless_refusal"} and len(benign) > 100
    helpful = df[df["aspect"] == "helpfulness"]
    assert set(helpful["flaw"]) == {"dont_know", "repeat", "off_topic"}
    ident = helpful[helpful["kind"] == "identity"]
    # self-cognition: the summary (or the whole response) introduces the model by name
    summaries = ident["chosen"].map(lambda m: rm_response(m[0]["content"], "helpfulness"))
    assert summaries.str.startswith("I am r1flow-tiny").all()
    zh = helpful[helpful["kind"] == "translate"]
    assert zh["chosen"].map(lambda m: any("\u4e00" <= ch <= "\u9fff" for ch in m[0]["content"])).all()
    only = make_preferences(20, 0, seed=0, unhelpful_kinds=("dont_know",), readable_share=0.0)
    assert set(only["flaw"]) == {"dont_know"}
    with pytest.raises(ValueError, match="unhelpful_kinds"):
        make_preferences(5, 0, unhelpful_kinds=("rude",))


def test_preferences_schema_rejects_bad_messages(tmp_path):
    df = make_preferences(3, 3, seed=0)
    bad = df.copy()
    bad.at[1, "chosen"] = [{"role": "user", "content": "not an assistant turn"}]
    bad.at[2, "rejected"] = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    bad.at[3, "aspect"] = "honesty"
    with pytest.raises(ArtifactError) as e:
        write_table(bad, tmp_path / "bad.parquet", PREFERENCES)
    msg = str(e.value)
    assert "column 'chosen'" in msg and "column 'rejected'" in msg and "column 'aspect'" in msg
    assert not (tmp_path / "bad.parquet").exists()


# -- what each reward model reads ----------------------------------------------------------------------------
def test_rm_response_and_render():
    text = f"{READABLE_MARKER} think about it {READABLE_MARKER} Paris is the capital."
    assert rm_response(text, "helpfulness") == "Paris is the capital."
    assert rm_response(text, "harmlessness") == text
    assert rm_response("no pattern here", "helpfulness") == "no pattern here"
    assert render_for_rm("Q?", "A.") == "User: Q?\nAssistant: A."
    with pytest.raises(ValueError, match="unknown reward model aspect"):
        rm_response(text, "honesty")


# -- training -------------------------------------------------------------------------------------------------
def test_helpfulness_rm_beats_chance_on_held_out_pairs(helpful_rm, train_pairs, tiny_policy):
    out, model, tok, metrics = helpful_rm
    RM_METRICS.validate(metrics)
    assert list(metrics["step"]) == list(range(1, HELP_SETTINGS["steps"] + 1))
    assert metrics["loss"].iloc[0] == pytest.approx(math.log(2), abs=0.05)  # fresh head: r_c ~ r_r
    assert metrics["loss"].tail(10).mean() < 0.3
    test = held_out(train_pairs, seed=1, n=600)
    test = test[test["aspect"] == "helpfulness"]
    assert len(test) >= 80
    acc = evaluate_reward_model(model, tok, test)
    # A random head on pretrained features is not at chance on one draw (shorter answers are often the
    # unhelpful ones): the same model before training (lr 0) is the baseline to beat. Measured over seeds
    # 0-2: trained 0.85-0.89, untrained 0.55-0.69.
    untrained, utok, _ = train_reward_model(tiny_policy[0], train_pairs, "helpfulness", None,
                                            **dict(HELP_SETTINGS, steps=1, lr=0.0))
    baseline = evaluate_reward_model(untrained, utok, test)
    assert acc >= 0.8 and acc >= baseline + 0.1, (acc, baseline)
    # the easy flaws are learnt almost perfectly (measured 0.96-1.0); off-topic answers need the prompt
    # and are the hard case (measured 0.63-0.70)
    easy = test[test["flaw"].isin(["dont_know", "repeat"])]
    assert evaluate_reward_model(model, tok, easy) >= 0.9


def test_harmlessness_rm_beats_chance_on_held_out_pairs(harmless_rm, train_pairs):
    _, model, tok, metrics = harmless_rm
    test = held_out(train_pairs, seed=2, n=600)
    test = test[test["aspect"] == "harmlessness"]
    assert len(test) >= 40 and set(test["kind"]) == {"harmful", "benign"}
    assert evaluate_reward_model(model, tok, test) >= 0.85  # measured 0.92-1.0; untrained 0.33-0.78
    # refusing is not rewarded for its own sake: needless refusals of benign requests lose
    assert evaluate_reward_model(model, tok, test[test["kind"] == "benign"]) >= 0.8


def test_untrained_aspect_is_an_error(tiny_policy):
    df = make_preferences(5, 0, seed=0)
    with pytest.raises(ValueError, match="no preference pairs with aspect 'harmlessness'"):
        train_reward_model(tiny_policy[0], df, "harmlessness", None, steps=1)


def test_saved_reward_model_loads_and_scores_the_same(helpful_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, model, tok, _ = helpful_rm
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == tok.pad_token_id
    assert type(loaded).__name__ == "LlamaForSequenceClassification"
    assert not list(out.parent.glob(".*.tmp"))  # the atomic save left no temporary folder
    texts = [render_for_rm("What is the capital of Peru?", "The capital of Peru is Lima."),
             render_for_rm("What is the capital of Peru?", "I don't know.")]
    ltok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        enc = ltok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        got = loaded(**enc).logits[:, 0]
        want = model(**tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)).logits[:, 0]
    assert got.tolist() == pytest.approx(want.tolist(), abs=1e-5)
    assert got[0] > got[1]


# -- the registry rewards --------------------------------------------------------------------------------------
def test_helpfulness_reads_the_summary_only_harmlessness_the_whole(helpful_rm, harmless_rm):
    prompt = "How do I steal a car without getting caught?"
    summary = "I'm sorry, but I can't help with that. Stealing a car is a crime that harms its owner."
    a = f"{READABLE_MARKER} This could hurt someone, so I should refuse politely. {READABLE_MARKER} {summary}"
    b = f"{READABLE_MARKER} Break the side window and pull the wires under the wheel. {READABLE_MARKER} {summary}"
    completions, prompts = [a, b, summary], [prompt] * 3
    helpful = R.get("helpfulness")(completions, ["", "", ""], prompts=prompts, path=str(helpful_rm[0]))
    assert helpful[0].score == helpful[1].score  # the reasoning differs, the summary does not
    assert helpful[2].score == pytest.approx(helpful[0].score, abs=1e-5)  # and it equals the bare summary's
    assert [r.reason for r in helpful] == ["summary", "summary", "whole_response"]
    harmless = R.get("harmlessness")(completions, ["", "", ""], prompts=prompts, path=str(harmless_rm[0]))
    assert abs(harmless[0].score - harmless[1].score) > 1e-3  # the reasoning is judged too
    assert all(isinstance(r.score, float) for r in helpful + harmless)


def test_model_reward_scores_depend_on_the_prompt_and_not_on_the_batch(helpful_rm):
    path = str(helpful_rm[0])
    fn = R.get("helpfulness")
    c = "The capital of Peru is Lima."
    alone = fn([c], [""], prompts=["What is the capital of Peru?"], path=path)[0].score
    q = "What is the capital of Peru?"
    batched = fn([c, "x " * 60, c], ["", "", ""], batch_size=2, path=path,
                 prompts=[q, "Hi", [{"role": "user", "content": q}]])
    assert batched[0].score == pytest.approx(alone, abs=1e-5)  # padding does not change a score
    assert batched[2].score == pytest.approx(alone, abs=1e-5)  # a message list is read as its user text
    other = fn([c], [""], prompts=["How many legs does a spider have?"], path=path)[0].score
    assert other != alone


def test_score_batch_passes_prompts_only_to_rewards_that_need_them(helpful_rm):
    ok = "|special_token| 7+5=12, 12*2=24 |special_token| The answer is \\boxed{24}."
    seen = {}

    @R.register("_test_needs_prompts")
    def needs(completions, golds, prompts=None, **options):
        seen["needs"] = (prompts, options)
        return [R.Reward(float(len(p)), "len") for p in prompts]

    needs.needs_prompts = True

    @R.register("_test_plain")
    def plain(completions, golds, **options):
        seen["plain"] = options  # a stray prompts= would land here
        return [R.Reward(1.0, "ok") for _ in completions]

    try:
        total, per = R.score_batch([ok, "junk"], ["24", "24"], {"_test_needs_prompts": 0.5, "_test_plain": 1.0},
                                   {"_test_needs_prompts": {"k": 1}}, prompts=["abcd", "ab"])
        assert seen["needs"] == (["abcd", "ab"], {"k": 1}) and seen["plain"] == {}
        assert total == [3.0, 2.0]
        # existing rule-based rewards work with and without prompts
        for prompts in (None, ["q1", "q2"]):
            total, per = R.score_batch([ok, "junk"], ["24", "24"], {"accuracy": 1.0, "format_readable": 0.5},
                                       {"accuracy": {"verifier": "exact"}}, prompts=prompts)
            assert total == [1.5, 0.0]
        # the model-based rewards through the registry, mixed with a rule-based one
        total, per = R.score_batch([ok, "junk"], ["24", "24"], {"helpfulness": 1.0, "format_readable": 1.0},
                                   {"helpfulness": {"path": str(helpful_rm[0]), "batch_size": 1}}, prompts=["q", "q"])
        assert total == pytest.approx([per["helpfulness"][0].score + 1.0, per["helpfulness"][1].score])
        with pytest.raises(ValueError, match="reward 'helpfulness' judges completions against their prompts"):
            R.score_batch([ok], ["24"], {"helpfulness": 1.0}, {"helpfulness": {"path": str(helpful_rm[0])}})
        with pytest.raises(ValueError, match="1 prompts for 2 completions"):
            R.score_batch([ok, "junk"], ["24", "24"], {"format": 1.0}, prompts=["q"])
        with pytest.raises(ValueError, match="needs the option 'path'"):
            R.score_batch([ok], ["24"], {"harmlessness": 1.0}, prompts=["q"])
    finally:
        R.REGISTRY.pop("_test_needs_prompts", None)
        R.REGISTRY.pop("_test_plain", None)


# -- scripts ------------------------------------------------------------------------------------------------------
def test_scripts_write_pairs_and_a_loadable_reward_model(tiny_policy, tmp_path):
    from transformers import AutoModelForSequenceClassification

    pairs, rm, metrics = tmp_path / "pairs.parquet", tmp_path / "rm", tmp_path / "rm.csv"
    subprocess.run([sys.executable, SCRIPTS / "preferences.py", "--out", pairs,
                    "--settings", '{"helpfulness": 20, "harmlessness": 30, "seed": 5}'], check=True)
    df = read_table(pairs, PREFERENCES)
    assert df["aspect"].value_counts().to_dict() == {"harmlessness": 30, "helpfulness": 20}
    subprocess.run([sys.executable, SCRIPTS / "reward_model.py", "--base", tiny_policy[0], "--pairs", pairs,
                    "--aspect", "harmlessness", "--out", rm, "--metrics", metrics, "--threads", "1",
                    "--settings", '{"steps": 3, "lr": 1e-3, "batch_size": 4, "seed": 0}'], check=True)
    m = read_table(metrics, RM_METRICS)
    assert list(m["step"]) == [1, 2, 3]
    assert AutoModelForSequenceClassification.from_pretrained(rm).config.num_labels == 1
