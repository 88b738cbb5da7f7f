"""The one way to read and write a table artifact: always validated, always written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.errors

from r1flow.data.schemas import SCHEMAS


class ArtifactError(ValueError):
    """A table failed its schema; the message names the file, the columns, the checks and some rows."""


def _schema(schema):
    return SCHEMAS[schema] if isinstance(schema, str) else schema


def validate(df: pd.DataFrame, schema, path: str | os.PathLike = "<memory>", max_rows: int = 5) -> pd.DataFrame:
    schema = _schema(schema)
    try:
        return schema.validate(df, lazy=True)
    except pandera.errors.SchemaErrors as err:
        raise ArtifactError(describe_failures(err.failure_cases, schema.name, path, df, max_rows)) from None


def describe_failures(failures: pd.DataFrame, schema_name: str, path, df: pd.DataFrame, max_rows: int) -> str:
    lines = [f"{path}: does not match schema '{schema_name}'"]
    for (column, check), group in failures.groupby(["column", "check"], dropna=False, sort=False):
        if check == "column_in_dataframe":  # pandera reports a missing column under the schema's name
            lines.extend(f"  column '{c}' is missing (check 'column_in_dataframe')" for c in group["failure_case"])
            continue
        column = "<table>" if pd.isna(column) else column
        lines.append(f"  column '{column}' failed check '{check}' on {len(group)} row(s)")
        idx = [i for i in group["index"].tolist() if i is not None and not pd.isna(i)][:max_rows]
        if idx and column in df.columns:
            rows = df.loc[[i for i in idx if i in df.index]]
            for i, row in rows.iterrows():
                shown = {k: _short(v) for k, v in row.items()}
                lines.append(f"    row {i}: {shown}")
        elif len(group):
            cases = ", ".join(_short(v) for v in group["failure_case"].head(max_rows))
            lines.append(f"    failing values: {cases}")
    return "\n".join(lines)


def _short(v, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def read_table(path: str | os.PathLike, schema) -> pd.DataFrame:
    """Read a parquet, CSV or JSON-lines table and validate it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such table")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df = _plain_lists(pd.read_parquet(path))
    elif suffix == ".csv":
        df = pd.read_csv(path)
    elif suffix in (".jsonl", ".json"):
        df = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    else:
        raise ValueError(f"{path}: unknown table format '{suffix}' (expected .parquet, .csv or .jsonl)")
    return validate(df, schema, path)


def _plain(v):
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _plain_lists(df: pd.DataFrame) -> pd.DataFrame:
    """pyarrow reads list columns (e.g. the message lists of PREFERENCES) back as numpy arrays; turn them
    into the Python lists that were written, so a table round-trips unchanged (and stays JSON-able)."""
    for col in df.columns:
        if df[col].dtype == object and any(isinstance(v, np.ndarray) for v in df[col].dropna().head(1)):
            df[col] = df[col].map(_plain)
    return df


def write_table(df: pd.DataFrame, path: str | os.PathLike, schema) -> pd.DataFrame:
    """Validate, then write through a temporary file and rename, so a crash never leaves half a table."""
    path = Path(path)
    df = validate(df.reset_index(drop=True), schema, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif suffix == ".jsonl":
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            raise ValueError(f"{path}: unknown table format '{suffix}'")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return df


def write_text(text: str, path: str | os.PathLike) -> None:
    """Atomic write of a small text artifact (markdown table, JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
