"""Experiment tracking (config `tracking`, r1flow.training.tracking), offline, with the real packages: a
tiny GRPO run and a tiny SFT run log every metric of every step to TensorBoard (event files read back with
its own EventAccumulator), W&B (the offline run's .wandb file, read with wandb's own protobuf records) and
trackio (its local SQLite store, read with its own SQLiteStorage). Each backend's test skips, saying why,
where its package is not installed. Also: the schema refuses an unknown backend, a backend not installed
is an error naming tracking.backends, the default tracks nothing (no import, no file), and the workflow
gives every training job, and its provenance record, the run <results folder>/<job>."""

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FAMILIES
from helpers.job_settings import planned_commands

from r1flow.config import ConfigError, validate_config
from r1flow.data.prompts import R1_CHAT_TEMPLATE
from r1flow.data.tasks import generate_tasks
from r1flow.models import load_policy
from r1flow.training import tracking as T
from r1flow.training.grpo import GRPOConfig, GRPOTrainer
from r1flow.training.sft import chat_pairs, train_sft

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
SCRIPTS = ROOT / "scripts"
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3=5, so 5."}],
    [{"role": "user", "content": "What is 7*6?"}, {"role": "assistant", "content": "7*6=42. The answer is 42."}],
]


def installed(backend: str) -> bool:
    try:
        T.check_backends([backend])
        return True
    except ConfigError:
        return False


def need(backend: str) -> None:
    if not installed(backend):
        pytest.skip(f"{backend} is not installed (pip install {T.BACKENDS[backend]}); its readback is not tested")


INSTALLED = [b for b in T.BACKENDS if installed(b)]


def _numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float, np.number))}


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.fixture(scope="module")
def runs(tiny_policy, tmp_path_factory):
    """{stage: (tracking settings, run config, every metrics row)} of a tiny GRPO run (with a validation
    at steps 0 and 2, so rows differ in their columns) and a tiny SFT run, each tracked by every
    installed backend."""
    if not INSTALLED:
        pytest.skip("none of tensorboard, wandb, trackio is installed")
    path = str(tiny_policy[0])
    base = tmp_path_factory.mktemp("tracking")
    out = {}

    tracking = {"backends": INSTALLED, "project": "r1flow-test", "run_name": "results/r1_zero",
                "dir": str(base / "r1_zero")}
    splits = generate_tasks(5, FAMILIES, {"train": 16, "validation": 4})
    policy, tok = load_policy(path)
    cfg = GRPOConfig.from_dict({"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 8, "steps": 3,
                                "eval_every": 2, "eval_prompts": 2, "eval_k": 1, "save_every": 100,
                                "learning_rate": 1e-3, "warmup_steps": 0, "beta": 0.0})
    t = GRPOTrainer(policy, None, tok, cfg, splits["train"], splits["validation"], base / "state")
    config = {"grpo": {"steps": 3, "num_generations": 2}, "model": path}
    t.train(progress=False, tracking=tracking, run_config=config)
    out["grpo"] = (tracking, config, list(t.history))

    tracking = {**tracking, "run_name": "results/cold_start_sft", "dir": str(base / "cold_start_sft")}
    model, tok = load_policy(path)
    tok.chat_template = R1_CHAT_TEMPLATE
    prompts, completions = chat_pairs(tok, CONVERSATIONS * 2)
    config = {"settings": {"epochs": 2, "batch_size": 2}, "stage": "cold_start_sft"}
    rows = train_sft(model, tok, prompts, completions, epochs=2, batch_size=2, warmup_steps=1, tracking=tracking,
                     run_config=config)
    out["sft"] = (tracking, config, rows)
    return out


def test_the_runs_have_rows_to_log(runs):
    grpo, sft = runs["grpo"][2], runs["sft"][2]
    assert [r["step"] for r in grpo] == [0, 1, 2, 3] and "val_pass@1" in grpo[0] and "val_pass@1" not in grpo[1]
    assert [r["step"] for r in sft] == [1, 2, 3, 4]


# -- TensorBoard -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_tensorboard_event_files_hold_every_metric_of_every_step(runs, stage):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracking, config, rows = runs[stage]
    acc = EventAccumulator(str(Path(tracking["dir"]) / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    expected = {}
    for row in rows:
        for k, v in _numeric(row).items():
            expected.setdefault(k, []).append((row["step"], v))
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert all(_same(float(np.float32(v)), g) for (_, v), (_, g) in zip(points, got)), (tag, points, got)
    text = {tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    assert text["run_name/text_summary"] == tracking["run_name"]
    assert json.loads(text["config/text_summary"].strip("`\n")) == config


# -- Weights & Biases (offline) --------------------------------------------------------------------------
def wandb_records(path: Path):
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB's log format
    (32 KiB blocks of chunks: crc32c, length, type full/first/middle/last), each record a wandb protobuf
    Record (how wandb's own datastore reads it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_wandb_offline_run_holds_every_metric_of_every_step(runs, stage):
    need("wandb")
    tracking, config, rows = runs[stage]
    found = sorted((Path(tracking["dir"]) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(found) == 1, found
    history, run = [], None
    for r in wandb_records(found[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "run":
            run = r.run
    assert run.display_name == tracking["run_name"] and run.project == tracking["project"]
    got_config = {c.key or "/".join(c.nested_key): json.loads(c.value_json) for c in run.config.update}
    got_config.pop("_wandb", None)
    assert got_config == config
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    for h, row in zip(history, rows):
        mine = {k: v for k, v in h.items() if not k.startswith("_")}
        want = _numeric(row)
        assert set(mine) == set(want), row["step"]
        assert all(_same(float(mine[k]), v) for k, v in want.items()), (row, h)


# -- trackio (local store) -------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["grpo", "sft"])
def test_trackio_local_store_holds_every_metric_of_every_step(runs, stage):
    need("trackio")
    from trackio import utils
    from trackio.sqlite_storage import SQLiteStorage

    tracking, config, rows = runs[stage]
    # the store trackio chose when first imported (the first run's folder unless imported before)
    assert (Path(utils.TRACKIO_DIR) / "r1flow-test.db").exists()
    assert tracking["run_name"] in SQLiteStorage.get_runs(tracking["project"])
    logs = SQLiteStorage.get_logs(tracking["project"], tracking["run_name"])
    assert [g["step"] for g in logs] == [r["step"] for r in rows]
    for g, row in zip(logs, rows):
        mine = {k: v for k, v in g.items() if k not in ("step", "timestamp")}
        want = _numeric(row)
        assert set(mine) == set(want), row["step"]
        assert all(_same(float(mine[k]), v) for k, v in want.items()), (row, g)
    stored = SQLiteStorage.get_run_config(tracking["project"], tracking["run_name"])
    assert {k: v for k, v in stored.items() if not k.startswith("_")} == config


# -- a job through the provenance wrapper, in a process of its own ----------------------------------------
def test_reward_model_job_tracks_its_run_and_its_record_names_it(tiny_policy, tmp_path):
    """scripts/provenance.py around scripts/reward_model.py, as a rule runs it: the run is in the job's
    folder (trackio's store too, in a fresh process), every step's row in it, and the record names it."""
    if not INSTALLED:
        pytest.skip("none of tensorboard, wandb, trackio is installed")
    pairs, rm, metrics, record = tmp_path / "pairs.parquet", tmp_path / "rm", tmp_path / "rm.csv", tmp_path / "rec.json"
    subprocess.run([sys.executable, SCRIPTS / "preferences.py", "--out", pairs,
                    "--settings", '{"helpfulness": 10, "harmlessness": 10, "seed": 5}'], check=True)
    tracking = {"backends": INSTALLED, "project": "r1flow", "run_name": "results/reward_model_harmlessness",
                "dir": str(tmp_path / "tracking" / "reward_model_harmlessness")}
    settings = '{"steps": 3, "lr": 1e-3, "batch_size": 4, "seed": 0}'
    subprocess.run([sys.executable, SCRIPTS / "provenance.py", "--record", record, "--rule",
                    "reward_model_harmlessness", "--settings", settings, "--inputs", pairs, "--outputs", rm, metrics,
                    "--tracking", json.dumps(tracking), "--",
                    sys.executable, SCRIPTS / "reward_model.py", "--base", tiny_policy[0], "--pairs", pairs,
                    "--aspect", "harmlessness", "--out", rm, "--metrics", metrics, "--threads", "1",
                    "--settings", settings, "--tracking", json.dumps(tracking)], check=True)
    rec = json.loads(record.read_text())
    assert rec["tracking"] == tracking
    folder = Path(tracking["dir"])
    if "tensorboard" in INSTALLED:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(folder / "tensorboard"))
        acc.Reload()
        assert set(acc.Tags()["scalars"]) == {"loss", "accuracy", "learning_rate"}
        assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    if "wandb" in INSTALLED:
        assert len(list((folder / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    if "trackio" in INSTALLED:
        assert (folder / "trackio" / "r1flow.db").exists()


def test_no_tracking_by_default_imports_nothing_and_writes_nothing(tiny_policy, tmp_path):
    code = f"""
import sys
from r1flow.models import load_policy
from r1flow.data.prompts import R1_CHAT_TEMPLATE
from r1flow.training.sft import chat_pairs, train_sft
model, tok = load_policy({str(tiny_policy[0])!r})
tok.chat_template = R1_CHAT_TEMPLATE
p, c = chat_pairs(tok, {CONVERSATIONS!r})
train_sft(model, tok, p, c, epochs=1, batch_size=2)
loaded = [m for m in ("tensorboard", "torch.utils.tensorboard", "tensorboardX", "wandb", "trackio") if m in sys.modules]
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert T.open_run(None)._runs == {} and T.open_run({"backends": []})._runs == {}
    assert T.open_run({"backends": ["wandb"]}, main=False)._runs == {}  # ranks other than 0 log nothing


# -- bad input -------------------------------------------------------------------------------------------
def test_schema_refuses_an_unknown_backend_and_defaults_to_none():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate_config(cfg, SCHEMA)
    assert cfg["tracking"] == {"backends": [], "project": "r1flow"}
    for bad in (["tensorbord"], ["wandb", "wandb"], "wandb"):
        cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
        cfg["tracking"] = {"backends": bad}
        with pytest.raises(ConfigError, match="tracking.backends"):
            validate_config(cfg, SCHEMA)


def test_backend_not_installed_is_an_error_naming_the_setting(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ConfigError, match=r"tracking\.backends.*wandb.*not installed"):
        T.open_run({"backends": ["wandb"], "run_name": "r", "dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"tracking\.backends.*unknown backend 'mlflow'"):
        T.open_run({"backends": ["mlflow"], "run_name": "r", "dir": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []


# -- the workflow ----------------------------------------------------------------------------------------
def _plan(wd: Path, settings: dict) -> dict:
    """{job: (provenance wrapper words, launcher + script + arguments)} of the smoke DAG's dry run."""
    extra = wd / "settings.yaml"
    extra.write_text(yaml.safe_dump(settings))
    return planned_commands(wd, ROOT / "config" / "smoke.yaml", extra)


TRAINING_JOBS = {"r1_zero", "reasoning_rl", "r1", "rl_only_student", "cold_start_sft", "final_sft",
                 "distill_student", "reward_model_helpfulness", "reward_model_harmlessness"}


def test_workflow_gives_every_training_job_its_run_and_names_it_in_the_record(tmp_path):
    from helpers.job_settings import job_namespace

    jobs = _plan(tmp_path, {"results": "runs/exp1", "tracking": {"backends": ["tensorboard", "wandb"]}})
    assert TRAINING_JOBS <= set(jobs)
    for job, (wrapper, script) in jobs.items():
        if job not in TRAINING_JOBS:
            assert "--tracking" not in script and "--tracking" not in wrapper, job
            continue
        want = {"backends": ["tensorboard", "wandb"], "project": "r1flow", "run_name": f"exp1/{job}",
                "dir": f"runs/exp1/tracking/{job}"}
        assert json.loads(wrapper[wrapper.index("--tracking") + 1]) == want, job
        assert json.loads(script[script.index("--tracking") + 1]) == want, job
        assert job_namespace(script)[1].tracking == want, job  # the script's own argparse takes it


def test_default_workflow_commands_have_no_tracking(tmp_path):
    jobs = _plan(tmp_path, {})
    assert TRAINING_JOBS <= set(jobs)
    assert not any("--tracking" in w or "--tracking" in s for w, s in jobs.values())
