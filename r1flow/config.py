"""One config tree, validated once against workflow/schemas/config.schema.yaml before any job runs.

Validation fills in the schema's defaults and turns the first violation into a message that names the
key and what was expected, e.g. `config key 'r1_zero.grpo.beta': expected number, got 'high'`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml


class ConfigError(ValueError):
    pass


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def _out_of_bounds(kind: str, bound, value) -> str:
    return f"expected a value {_BOUNDS[kind]} {bound}, got {value!r}"


def require_positive(key: str, value: float) -> None:
    """The schema's `exclusiveMinimum: 0` check, with its message, for callers of the Python API that
    bypass the config (e.g. a sampling temperature, which log-probs divide by)."""
    if not value > 0:
        raise ConfigError(f"config key '{key}': {_out_of_bounds('exclusiveMinimum', 0, value)}")


def _describe(err: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    v, inst = err.validator, err.instance
    if v == "type":
        what = f"expected {err.validator_value}, got {inst!r}"
    elif v == "enum":
        what = f"expected one of {err.validator_value}, got {inst!r}"
    elif v in _BOUNDS:
        what = _out_of_bounds(v, err.validator_value, inst)
    elif v == "additionalProperties":
        what = f"unknown key(s): {err.message}"
    elif v == "required":
        what = err.message
    else:
        what = err.message
    return f"config key '{key}': {what}"


def validate_config(config: dict, schema_path: str | Path) -> dict:
    """Validate in place (filling defaults) and return the config; raise ConfigError on the first problem."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [_describe(e) for e in errors[:5]]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    return config
