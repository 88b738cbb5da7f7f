"""Tables like the paper's and the miniature Figures 2 (accuracy during training) and 3 (length)."""

from __future__ import annotations

import re

import pandas as pd

from r1flow.data.artifacts import write_table, write_text
from r1flow.data.schemas import EVAL_SUMMARY

COLUMNS = ["model", "benchmark", "num_problems", "n", "pass@1", "pass@1_se", "cons@k", "cons@k_lo", "cons@k_hi",
           "cons_k", "format_rate", "mean_length", "reflections", "language_consistency", "truncated_rate",
           "sandbox_errors", "temperature", "top_p", "max_new_tokens"]
PASS_K = re.compile(r"pass@(\d+)$")


def pass_k_columns(columns) -> list[int]:
    """The k of every pass@k column but pass@1, in increasing order."""
    return sorted({int(m.group(1)) for c in columns if (m := PASS_K.match(c)) and m.group(1) != "1"})


def results_table(summaries: list[pd.DataFrame]) -> pd.DataFrame:
    """All (model, benchmark) rows, with any pass@k columns (and their intervals) after the fixed ones."""
    table = pd.concat(summaries, ignore_index=True)
    extra = [c for k in pass_k_columns(table.columns) for c in (f"pass@{k}", f"pass@{k}_lo", f"pass@{k}_hi")]
    return table[COLUMNS + extra]


def format_cell(row: pd.Series, key: str) -> str:
    """A table cell: pass@1 as mean +- standard error, cons@k and pass@k with their 95% bootstrap
    interval, in percent as in the paper; lengths as tokens, re-checks per completion."""
    v = row[key]
    if pd.isna(v):
        return "-"
    v = float(v)
    if key == "mean_length":
        return f"{v:.1f}"
    if key == "reflections":
        return f"{v:.2f}"
    if key == "pass@1" and pd.notna(row.get("pass@1_se")):
        return f"{100 * v:.1f} ± {100 * float(row['pass@1_se']):.1f}"
    if (key == "cons@k" or PASS_K.match(key)) and pd.notna(row.get(f"{key}_lo")):
        return f"{100 * v:.1f} [{100 * float(row[f'{key}_lo']):.1f}, {100 * float(row[f'{key}_hi']):.1f}]"
    return f"{100 * v:.1f}"


def paper_layout(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Rows = models, columns = (benchmark, metric), as in the paper's Tables 2, 5 and 6."""
    benches = list(dict.fromkeys(table["benchmark"]))
    head, cols = ["Model"], []
    for b in benches:
        t = table[table["benchmark"] == b]
        metrics = [("pass@1", "pass@1")]
        if t["cons@k"].notna().any():
            metrics.append(("cons@k", f"cons@{int(t['cons_k'].dropna().iloc[0])}"))
        metrics += [(f"pass@{k}", f"pass@{k}") for k in pass_k_columns(t.columns) if t[f"pass@{k}"].notna().any()]
        metrics += [("format_rate", "format"), ("language_consistency", "language"), ("mean_length", "length")]
        if "reflections" in t and t["reflections"].notna().any() and (t["reflections"] > 0).any():
            metrics.append(("reflections", "re-checks"))
        for key, label in metrics:
            head.append(f"{b} {label}")
            cols.append((b, key))
    rows = []
    for m in dict.fromkeys(table["model"]):
        row = [m]
        for b, key in cols:
            hit = table[(table["model"] == m) & (table["benchmark"] == b)]
            row.append("-" if hit.empty else format_cell(hit.iloc[0], key))
        rows.append(row)
    return head, rows


def to_markdown(table: pd.DataFrame, title: str) -> str:
    """A plain markdown table (no extra dependency), percentages as in the paper, with the sampling
    settings of every benchmark stated under it."""
    head, rows = paper_layout(table)
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    for b in dict.fromkeys(table["benchmark"]):
        r = table[table["benchmark"] == b].iloc[0]
        lines.append(f"- {b}: {int(r['num_problems'])} problems, n = {int(r['n'])} samples each, temperature "
                     f"{r['temperature']}, top-p {r['top_p']}, at most {int(r['max_new_tokens'])} new tokens; "
                     "pass@1 is the mean correctness over the n samples, truncated samples count as wrong.")
    lines.append("- pass@1 is given as mean ± its standard error over problems (the per-problem mean over n "
                 "samples, then the spread across problems); cons@k and pass@k with a 95% bootstrap interval over "
                 "problems. Two models whose pass@1 differ by less than twice the standard error are not shown "
                 "apart by this table.")
    errors = table[table["sandbox_errors"].fillna(0) > 0] if "sandbox_errors" in table else table.iloc[:0]
    for _, r in errors.iterrows():  # programs the sandbox could not start: scored 0, but not the model's fault
        lines.append(f"- **{r['model']} on {r['benchmark']}: {int(r['sandbox_errors'])} samples hit a sandbox error** "
                     "(scored as wrong; see the job log).")
    return "\n".join(lines) + "\n"


def write_tables(summaries: list[pd.DataFrame], csv_path, md_path, title: str) -> pd.DataFrame:
    table = results_table(summaries)
    write_table(table, csv_path, EVAL_SUMMARY)
    write_text(to_markdown(table, title), md_path)
    return table


def plot_training(metrics: pd.DataFrame, curve: pd.DataFrame, accuracy_png, length_png, title: str = "R1-Zero") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(metrics["step"], metrics["accuracy"], color="0.75", lw=1, label="training batch accuracy")
    ax.plot(curve["step"], curve["val_pass@1"], "o-", color="C3", label="held-out pass@1")
    ax.set(xlabel="step", ylabel="accuracy", title=f"{title}: accuracy during training (cf. Figure 2)", ylim=(0, 1))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(accuracy_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(metrics["step"], metrics["completion_length"], color="C0", lw=1, alpha=0.5, label="per step")
    smooth = metrics["completion_length"].rolling(10, min_periods=1).mean()
    ax.plot(metrics["step"], smooth, color="C0", lw=2, label="10-step mean")
    ax.set(xlabel="step", ylabel="mean response length (tokens)",
           title=f"{title}: response length during training (cf. Figure 3)")
    ax.legend(loc="upper left")
    if "reflections" in metrics:  # the "aha moment": re-checked steps per completion, beside length
        ax2 = ax.twinx()
        ax2.plot(metrics["step"], metrics["reflections"].rolling(10, min_periods=1).mean(), color="C2", lw=2,
                 label="re-checks per completion (10-step mean)")
        ax2.set_ylabel("re-checked steps per completion", color="C2")
        ax2.set_ylim(bottom=0)
        ax2.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(length_png, dpi=120)
    plt.close(fig)


def plot_benchmarks(table: pd.DataFrame, png) -> None:
    """pass@1 of every model on every benchmark, grouped by benchmark (a bar per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches, models = list(dict.fromkeys(table["benchmark"])), list(dict.fromkeys(table["model"]))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(benches) + 2), 4))
    for i, m in enumerate(models):
        vals = [100 * float(table[(table["model"] == m) & (table["benchmark"] == b)]["pass@1"].sum()) for b in benches]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(benches))]
        ax.bar(xs, vals, width, label=m)
        for x, v in zip(xs, vals):
            ax.text(x, v + 1, f"{v:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(benches)), benches)
    ax.set(ylabel="pass@1 (%)", ylim=(0, 105), title="pass@1 by benchmark")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_stages(curves: dict[str, pd.DataFrame], sft_losses: dict[str, pd.DataFrame], png) -> None:
    """Held-out pass@1 during every RL stage, and the loss of every SFT stage, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        a.plot(c["step"], c["val_pass@1"], "o-", ms=3, label=name)
    a.set(xlabel="RL step", ylabel="held-out pass@1", title="RL stages: validation during training", ylim=(0, 1))
    for name, m in sft_losses.items():
        b.plot(m["step"], m["loss"], label=name)
    b.set(xlabel="SFT update", ylabel="loss (completion tokens)", title="SFT stages", yscale="log")
    for ax in (a, b):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
