"""Bad input fails early and says where: schemas on tables, the JSON schema on the config."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from r1flow.config import ConfigError, validate_config
from r1flow.data.artifacts import ArtifactError, read_table, write_table
from r1flow.data.schemas import TASKS

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def _tasks(n=4):
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(n)], "task": "chain", "question": [f"q{i}" for i in range(n)],
                         "answer": [str(i) for i in range(n)], "difficulty": [1] * n})


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_roundtrip(tmp_path, suffix):
    p = tmp_path / f"t{suffix}"
    write_table(_tasks(), p, TASKS)
    back = read_table(p, TASKS)
    assert back["answer"].tolist() == ["0", "1", "2", "3"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_bad_table_message_names_file_column_check_rows(tmp_path):
    df = _tasks(6)
    df.loc[[1, 4], "difficulty"] = -1
    df.loc[2, "question"] = ""
    p = tmp_path / "bad.parquet"
    df.to_parquet(p)
    with pytest.raises(ArtifactError) as e:
        read_table(p, TASKS)
    msg = str(e.value)
    assert str(p) in msg and "'tasks'" in msg
    assert "column 'difficulty'" in msg and "greater_than_or_equal_to(0)" in msg and "2 row(s)" in msg
    assert "row 1:" in msg and "row 4:" in msg
    assert "column 'question'" in msg and "str_length" in msg


def test_missing_column_and_no_output_on_failure(tmp_path):
    out = tmp_path / "out.parquet"
    with pytest.raises(ArtifactError, match="column 'answer'"):
        write_table(_tasks().drop(columns="answer"), out, TASKS)
    assert not out.exists()


def test_duplicate_ids_rejected(tmp_path):
    df = _tasks()
    df.loc[3, "prompt_id"] = "p0"
    with pytest.raises(ArtifactError, match="column 'prompt_id' failed check 'field_uniqueness'"):
        write_table(df, tmp_path / "x.parquet", TASKS)


def test_default_config_is_valid_and_defaults_fill_in():
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate_config(cfg, SCHEMA)
    assert cfg["r1_zero"]["grpo"]["num_generations"] == 8
    assert cfg["r1_zero"]["grpo"]["loss_type"] == "grpo"  # filled from the schema
    assert cfg["evaluation"]["temperature"] == 0.6 and cfg["evaluation"]["top_p"] == 0.95
    empty = {}
    validate_config(empty, SCHEMA)
    assert empty["base_model"]["path"] == "tiny" and empty["data"]["synthetic"]["sizes"]["train"] == 2000


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"r1_zero": {"grpo": {"beta": "high"}}}, "config key 'r1_zero.grpo.beta': expected number, got 'high'"),
        ({"r1_zero": {"grpo": {"num_generations": 1}}}, "config key 'r1_zero.grpo.num_generations': expected a value >= 2"),
        ({"r1_zero": {"grpo": {"loss_type": "ppo"}}}, "config key 'r1_zero.grpo.loss_type': expected one of ['grpo', 'dapo', 'dr_grpo']"),
        ({"evaluation": {"top_p": 0}}, "config key 'evaluation.top_p': expected a value > 0"),
        ({"r1_zero": {"grpo": {"epsilonn": 0.2}}}, "config key 'r1_zero.grpo': unknown key(s)"),
    ],
)
def test_invalid_config_names_key_and_expectation(patch, needle):
    with pytest.raises(ConfigError) as e:
        validate_config(patch, SCHEMA)
    assert needle in str(e.value)


def test_grpo_defaults_agree_with_the_schema():
    """GRPO's defaults are written twice, in the config schema (what a run gets) and in GRPOConfig (what a
    test or notebook gets); they must be the same, key by key."""
    import dataclasses

    from r1flow.training.grpo import GRPOConfig

    props = yaml.safe_load(SCHEMA.read_text())["$defs"]["grpo"]["properties"]
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    # set by scripts/grpo.py from other config sections (the stage's template, the `rewards` section)
    assert set(fields) - set(props) == {"template", "reward_options"}
    assert set(props) <= set(fields)
    config = GRPOConfig()
    differ = {k: (p.get("default"), getattr(config, k)) for k, p in props.items()
              if p.get("default") != getattr(config, k) or type(p.get("default")) is not type(getattr(config, k))}
    assert not differ, f"schema default vs GRPOConfig default: {differ}"
