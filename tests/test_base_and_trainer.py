"""The tiny base model and the GRPO trainer: HF-loadable artifacts, learning signal, exact resumption."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import FAMILIES

from r1flow.data.tasks import generate_tasks
from r1flow.models import load_policy
from r1flow.training.grpo import GRPOConfig, GRPOTrainer, progress_line


def test_base_model_is_a_plain_transformers_model(tiny_policy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, log = tiny_policy
    assert log[-1]["loss"] < log[0]["loss"] - 1.0  # pretraining reduced the loss
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    ids = tok("<think> 7+5=12 </think> <answer> 12 </answer>", add_special_tokens=False)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert "<think>" in toks and "</answer>" in toks  # tags are single tokens
    assert [t for t in toks if t.isdigit()] == ["7", "5", "1", "2", "1", "2"]  # one token per digit
    assert tok.decode(ids) == "<think> 7+5=12 </think> <answer> 12 </answer>"


def test_student_built_on_the_base_tokenizer(tiny_policy, tmp_path):
    """A tiny student takes its teacher's tokenizer instead of training its own: same vocabulary, same ids."""
    from transformers import AutoTokenizer

    from r1flow.models.tiny import build_base_model

    path, _ = tiny_policy
    cfg = dict(seed=3, corpus_size=300, corpus_mix={"answer_only": 1.0}, vocab_size=300, hidden_size=16,
               num_layers=1, num_heads=2, max_positions=128, steps=2, batch_size=4, learning_rate=1e-3)
    log = build_base_model(cfg, FAMILIES, "table1", tmp_path / "student", progress=False, tokenizer_from=path)
    teacher, student = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(tmp_path / "student")
    text = "<think> 7+5=12 12*2=24 </think> <answer> 24 </answer>"
    assert student.get_vocab() == teacher.get_vocab() and student(text)["input_ids"] == teacher(text)["input_ids"]
    assert len(log) == 2


def _trainer(path, state, **over):
    splits = generate_tasks(5, FAMILIES, {"train": 64, "validation": 8})
    policy, tok = load_policy(str(path))
    ref, _ = load_policy(str(path))
    cfg = GRPOConfig.from_dict({"prompts_per_step": 4, "num_generations": 4, "max_completion_length": 20,
                                "steps": 6, "eval_every": 3, "eval_prompts": 8, "eval_k": 2, "save_every": 2,
                                "learning_rate": 1e-3, "warmup_steps": 0, **over})
    return GRPOTrainer(policy, ref, tok, cfg, splits["train"], splits["validation"], state)


def test_killed_run_resumes_where_it_stopped(tiny_policy, tmp_path):
    path, _ = tiny_policy
    full = _trainer(path, tmp_path / "a").train(progress=False)

    t = _trainer(path, tmp_path / "b")
    t.train(progress=False, stop_after=3)  # "killed" after step 3; the last checkpoint is at step 2
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    resumed_trainer = _trainer(path, tmp_path / "b")
    resumed = resumed_trainer.train(progress=False)
    assert resumed["step"].tolist() == [1, 2, 3, 4, 5, 6]  # no step lost, none repeated
    cols = ["reward_mean", "accuracy", "completion_length", "loss", "kl"]
    # steps 3..6 after resumption are exactly those of the uninterrupted run
    pd.testing.assert_frame_equal(resumed[cols].reset_index(drop=True), full[cols].reset_index(drop=True))


def test_changed_settings_do_not_resume_and_say_which(tiny_policy, tmp_path, caplog):
    path, _ = tiny_policy
    _trainer(path, tmp_path / "s").train(progress=False, stop_after=2)
    t = _trainer(path, tmp_path / "s", learning_rate=5e-4)
    with caplog.at_level("WARNING", logger="r1flow.training.grpo"):
        assert t._try_resume() is False
    assert "learning_rate: 0.001 -> 0.0005" in caplog.text and "starting over from step 0" in caplog.text


def test_settings_outside_the_trajectory_resume_to_the_same_run(tiny_policy, tmp_path):
    """How often to validate or save, and how many sequences are decoded at once, do not change what is
    trained: a run resumed with other values continues, and (validation drawing from its own stream)
    its training steps equal an uninterrupted run's."""
    path, _ = tiny_policy
    full = _trainer(path, tmp_path / "a").train(progress=False)
    _trainer(path, tmp_path / "b").train(progress=False, stop_after=3)
    t = _trainer(path, tmp_path / "b", eval_every=2, save_every=5, generation_batch_size=256)
    resumed = t.train(progress=False)
    assert resumed["step"].tolist() == [1, 2, 3, 4, 5, 6]
    cols = ["reward_mean", "accuracy", "completion_length", "loss", "kl"]
    pd.testing.assert_frame_equal(resumed[cols], full[cols])
    assert t.validation_curve()["step"].tolist() == [0, 4, 6]  # every 3 up to the checkpoint (step 2), then every 2


def test_resume_reads_sharded_saves(tiny_policy, tmp_path, monkeypatch):
    """Large models are saved in shards (model-0000i-of-n.safetensors + an index): resume loads them."""
    import r1flow.training.grpo as grpo
    from r1flow.models import save_policy

    path, _ = tiny_policy
    full = _trainer(path, tmp_path / "a").train(progress=False)

    def sharded(model, tok, out):
        save_policy(model, tok, out)
        model.save_pretrained(out, max_shard_size="20KB")  # over the single file: shards and an index
        (Path(out) / "model.safetensors").unlink()

    monkeypatch.setattr(grpo, "save_policy", sharded)
    _trainer(path, tmp_path / "b").train(progress=False, stop_after=3)
    saved = tmp_path / "b" / "checkpoint" / "model"
    assert (saved / "model.safetensors.index.json").exists() and len(list(saved.glob("model-*.safetensors"))) > 2
    resumed = _trainer(path, tmp_path / "b").train(progress=False)
    cols = ["reward_mean", "accuracy", "completion_length", "loss", "kl"]
    pd.testing.assert_frame_equal(resumed[cols], full[cols])


def test_best_weights_never_newer_than_the_restored_best_record(tiny_policy, tmp_path):
    """Killed after a new best (step 3) but before the next checkpoint (step 4): the checkpoint of step 2
    names no best, so the step-3 weights must not stand as the best after resuming from it."""
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "k")
    t.train(progress=False, stop_after=3)
    assert t.best["step"] == 3 and (tmp_path / "k" / "best-step3").exists()
    r = _trainer(path, tmp_path / "k")
    assert r._try_resume() and r.step_no == 2 and r.best["step"] == 0
    assert not list((tmp_path / "k").glob("best*"))
    r.train(progress=False)
    kept = [d.name for d in (tmp_path / "k").glob("best*")]
    assert kept == [f"best-step{r.best['step']}"]
    assert r.export(tmp_path / "out") == r.best["step"]


def test_metrics_and_validation_curve(tiny_policy, tmp_path):
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "m", loss_type="dapo", epsilon_high=0.28, mask_truncated_completions=True,
                 num_iterations=2)
    m = t.train(progress=False)
    assert len(m) == 6
    for col in ("reward_mean", "reward_std", "accuracy", "format_rate", "kl", "clip_fraction", "entropy",
                "completion_length", "time_generation", "time_training", "reward/accuracy_mean", "reward/format_mean"):
        assert m[col].notna().all(), col
    assert (m["kl"] >= 0).all() and (m["entropy"] > 0).all()
    # with mu = 2 the second pass sees ratios != 1, so clipping can happen; with mu = 1 it cannot
    assert m["clip_fraction"].between(0, 1).all()
    curve = t.validation_curve()
    assert curve["step"].tolist() == [0, 3, 6]
    out = tmp_path / "exported"
    step = t.export(out)
    assert step in (3, 6) and (out / "config.json").exists()


@pytest.mark.parametrize("mixed_precision", [None, "bfloat16"])
def test_gradient_step_moves_towards_rewarded_output(tiny_policy, tmp_path, mixed_precision):
    """GRPO steps with a reward that pays for short outputs shorten them, in float32 and under bfloat16
    mixed precision (weights and optimizer state stay float32 there)."""
    path, _ = tiny_policy
    from r1flow import rewards as R

    name = "test_short"
    if name not in R.REGISTRY:
        R.register(name)(R.per_sample(lambda c, a: R.Reward(1.0 if len(c) < 30 else 0.0, "len")))
    t = _trainer(path, tmp_path / "g", rewards={name: 1.0}, beta=0.0, learning_rate=3e-3, steps=12, eval_every=0,
                 mixed_precision=mixed_precision)
    m = t.train(progress=False)
    assert m["completion_length"].iloc[-4:].mean() < m["completion_length"].iloc[:4].mean()
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert all(v.dtype == torch.float32 for st in t.opt.state.values() for v in st.values() if v.dim())


def test_bf16_on_a_cpu_without_it_warns_naming_the_setting(tiny_policy, tmp_path, monkeypatch, caplog):
    import r1flow.models as M

    xeon = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
    sapphire = xeon.replace("avx512_vnni", "avx512_vnni avx512_bf16 amx_bf16 amx_tile")
    graviton = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    assert not M.cpu_native_bf16(xeon) and M.cpu_native_bf16(sapphire) and M.cpu_native_bf16(graviton)
    path, _ = tiny_policy
    for native in (False, True):
        monkeypatch.setattr(M, "cpu_native_bf16", lambda native=native: native)
        caplog.clear()
        with caplog.at_level("WARNING"):
            _trainer(path, tmp_path / f"w{native}", mixed_precision="bfloat16")
            _trainer(path, tmp_path / f"f{native}")  # float32 never warns
        warned = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
        assert len(warned) == (0 if native else 1)
        assert native or warned[0].startswith("grpo.mixed_precision: bfloat16 on a CPU without native")


def test_bad_settings_fail_clearly(tiny_policy, tmp_path):
    path, _ = tiny_policy
    with pytest.raises(ValueError, match="unknown GRPO settings"):
        GRPOConfig.from_dict({"G": 8})
    with pytest.raises(ValueError, match="micro_batch_size"):
        _trainer(path, tmp_path / "x", micro_batch_size=-1)
    with pytest.raises(ValueError, match="mixed_precision"):
        GRPOConfig.from_dict({"mixed_precision": "float16"})
    with pytest.raises(KeyError, match="unknown reward"):
        _trainer(path, tmp_path / "x", rewards={"nope": 1.0})


def test_no_validation_still_writes_valid_metrics(tiny_policy, tmp_path):
    from r1flow.data.artifacts import write_table
    from r1flow.data.schemas import GRPO_METRICS

    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "nv", eval_every=0, steps=2)
    m = t.train(progress=False)
    assert m["val_pass@1"].isna().all()
    write_table(m, tmp_path / "metrics.csv", GRPO_METRICS)  # the rule's artifact validates
    assert t.validation_curve().empty and list(t.validation_curve().columns)[0] == "step"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="resident memory is read from /proc (Linux)")
def test_metrics_report_resident_memory_per_step(tiny_policy, tmp_path):
    """Every step's metrics row carries the trainer's resident memory (rss_mb) and its peak so far, and the
    written metrics.csv keeps both columns (GRPO_METRICS declares them)."""
    from r1flow.data.artifacts import read_table, write_table
    from r1flow.data.schemas import GRPO_METRICS

    path, _ = tiny_policy
    m = _trainer(path, tmp_path / "rss", eval_every=0, steps=2, memory_by_phase=True).train(progress=False)
    assert "rss_mb" in GRPO_METRICS.columns and "peak_rss_mb" in GRPO_METRICS.columns
    write_table(m, tmp_path / "metrics.csv", GRPO_METRICS)
    back = read_table(tmp_path / "metrics.csv", GRPO_METRICS)
    assert len(back) == 2
    assert (back["rss_mb"] > 10).all() and (back["peak_rss_mb"] >= back["rss_mb"]).all()
    # each phase's own peak is a part of the step's: positive, never above the run's peak so far
    phases = back[["peak_rss_sampling_mb", "peak_rss_training_mb", "peak_rss_update_mb"]]
    assert (phases > 10).all().all()
    assert (phases.max(axis=1) <= back["peak_rss_mb"] + 1e-6).all()


def test_phase_peaks_see_each_phase_alone():
    """A phase that allocates 200 MB shows it in its own peak; the next phase, which allocates nothing,
    does not; the run's peak keeps it."""
    from r1flow.memory import PhasePeaks

    assert not PhasePeaks(enabled=False).can_reset and math.isnan(PhasePeaks(enabled=False).end())
    p = PhasePeaks()
    if not p.can_reset:
        pytest.skip("/proc/self/clear_refs cannot be written here")
    p.end()
    x = torch.ones(200 * 2**20 // 4)  # 200 MB, touched
    del x
    big = p.end()
    small = p.end()
    assert big - small > 150
    assert p.run_peak >= big


def test_batches_mix_kinds_in_proportion_and_are_deterministic():
    """RL for all scenarios (section 2.3.4): every step holds reasoning and general prompts."""
    from r1flow.training.grpo import GRPOConfig, GRPOTrainer, progress_line

    t = GRPOTrainer.__new__(GRPOTrainer)
    t.cfg = GRPOConfig(prompts_per_step=10)
    t.train_df = pd.DataFrame({"question": [f"q{i}" for i in range(100)],
                               "kind": ["reasoning"] * 95 + ["general"] * 5})
    seen = set()
    for step in range(1, 11):
        b = t._batch(step)
        assert len(b) == 10 and (b["kind"] == "general").sum() == 1
        assert b.index.tolist() == t._batch(step).index.tolist()  # a resumed run draws the same prompts
        seen |= set(b.index[b["kind"] == "general"])
    assert seen == set(range(95, 100))  # every general prompt comes round
    single = t.train_df.iloc[:95].drop(columns="kind")
    t.train_df = single
    assert len(t._batch(3)) == 10


def test_checkpoint_from_another_starting_model_is_not_resumed(tiny_policy, tmp_path):
    """An upstream stage rerun (a new starting model) must start GRPO over, not resume its old state."""
    import torch

    from r1flow.models import load_policy
    from r1flow.training.stopping import weights_fingerprint

    model, _ = load_policy(str(tiny_policy[0]))
    other, _ = load_policy(str(tiny_policy[0]))
    assert weights_fingerprint(model) == weights_fingerprint(other)
    with torch.no_grad():
        next(other.parameters())[0, 0] += 1e-3
    assert weights_fingerprint(model) != weights_fingerprint(other)


def test_progress_line_reads_in_a_log_file():
    """One line per validation: means since the previous line, the latest validation, the time split."""
    row = dict(reward_mean=0.5, accuracy=0.25, kl=None, clip_fraction=0.1, entropy=1.5, completion_length=20.0,
               time_generation=3.0, time_training=1.0)
    rows = [{"step": 3, **row}, {"step": 4, **row, "accuracy": 0.75, "kl": 0.002, "val_pass@1": 0.4}]
    line = progress_line(rows, 10, {"step": 4, "val_pass@1": 0.4})
    assert line == ("step 4/10: reward 0.500, accuracy 0.500, kl 0.002, clip fraction 0.100, entropy 1.500, "
                    "length 20.0, val pass@1 0.400 (best 0.400 at step 4); time 6.0s generating, 2.0s training "
                    "over 2 step(s)")
    assert "\r" not in line and "\n" not in line


def _live_tensors():
    """(count, bytes) of the tensors alive in this process (parameters, optimiser state, anything kept)."""
    import gc
    import warnings

    import torch

    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore")
        ts = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(ts), sum(t.untyped_storage().nbytes() for t in ts if t.device.type != "meta")


def test_steps_keep_no_tensors(tiny_policy, tmp_path):
    """Memory flat over steps: after the first steps (which create the optimiser state), a GRPO step leaves
    no tensor behind (no kept completions, graphs, logits or caches keyed by step), and the process's
    resident memory after a step does not climb with the step count."""
    path, _ = tiny_policy
    t = _trainer(path, tmp_path / "flat", eval_every=0, steps=10, save_every=100)
    rows = [t.step() for _ in range(2)]
    before = _live_tensors()
    rows += [t.step() for _ in range(6)]
    assert _live_tensors() == before
    # a tiny model: the whole process is a few hundred MB; a step's worth of kept tensors is far below
    # noise, so this bound only catches gross growth (e.g. the allocator holding every step's buffers)
    assert rows[-1]["rss_mb"] - rows[2]["rss_mb"] < 50


def test_length_buckets_cut_sorted_runs_of_equal_size():
    from r1flow.models.tiny import length_buckets

    # lengths 5 1 4 1 9 2: sorted (ties by index) 1 3 5 2 0 4; three runs of two
    assert length_buckets([5, 1, 4, 1, 9, 2], 3) == [[1, 3], [5, 2], [0, 4]]
    assert length_buckets([3, 2], 5) == [[1], [0]]  # never an empty run
    assert length_buckets([3, 2, 1], 1) == [[2, 1, 0]]


def test_pretraining_in_length_buckets_is_the_same_update():
    """Micro-batches of similar lengths, their losses over the batch's token count: the loss log and the
    weights after a few updates equal the one-batch run's up to summation order."""
    import yaml

    from r1flow.models import tiny as TT

    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "config" / "config.yaml").read_text())
    fam = cfg["base_model"]["tiny"]["corpus_families"]
    docs = TT.build_corpus(0, 400, fam, {"worked": 0.5, "answer_only": 0.5}, "table1", set(), textbook_share=0.5)
    tok = TT.train_tokenizer(docs, 320)
    runs = []
    for buckets in (1, 4):
        model = TT.build_model(tok, 32, 2, 2, 256, 0)
        log = TT.pretrain(model, tok, docs, 4, 16, 0.003, 0, warmup=1, progress=False, length_buckets_per_batch=buckets)
        runs.append(([r["loss"] for r in log], torch.cat([p.detach().flatten() for p in model.parameters()])))
    (l1, w1), (l4, w4) = runs
    assert l1 == pytest.approx(l4, rel=1e-5) and l1[-1] < l1[0]
    assert torch.allclose(w1, w4, atol=1e-5)
    fresh = torch.cat([p.detach().flatten() for p in TT.build_model(tok, 32, 2, 2, 256, 0).parameters()])
    assert (w1 - fresh).abs().max() > 1e-3  # the updates moved the weights: the equality is not vacuous
