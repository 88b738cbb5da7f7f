"""benchmarks/bench_default.py --seed-offset shifts the whole default: every seed of the config tree."""

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_default", ROOT / "benchmarks" / "bench_default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _seeds(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "seed":
                yield path + "." + k, v
            else:
                yield from _seeds(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _seeds(v, f"{path}[{i}]")


def test_seed_offset_shifts_every_seed_defaults_included():
    b = _bench()
    cfg = b.validate_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()),
                            ROOT / "workflow" / "schemas" / "config.schema.yaml")
    before = dict(_seeds(cfg))
    after = dict(_seeds(b.shift_seeds(cfg, 7)))
    assert before.keys() == after.keys()
    # the stages that draw random numbers all have a seed, and each one moved by exactly the offset
    for key in (".data.synthetic.seed", ".base_model.tiny.seed", ".r1_zero.grpo.seed", ".r1.cold_start.seed",
                ".r1.sft.seed", ".r1.reasoning_rl.seed", ".r1.rejection_sampling.seed", ".r1.final_sft.seed",
                ".r1.reward_models.train.seed", ".r1.rl_all.grpo.seed", ".distillation.sft.seed",
                ".distillation.rl_only.seed", ".evaluation.seed"):
        assert after[key] == before[key] + 7, key
    assert all(after[k] == v + 7 for k, v in before.items())
    # nothing but seeds changes
    assert b.shift_seeds({"a": [{"seed": 1, "steps": 3}], "seeds": 2}, 5) == {"a": [{"seed": 6, "steps": 3}], "seeds": 2}
