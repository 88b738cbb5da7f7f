"""Tables like the paper's and the miniature Figures 2 (accuracy during training) and 3 (length)."""

from __future__ import annotations

import pandas as pd

from r1flow.data.artifacts import write_table, write_text
from r1flow.data.schemas import EVAL_SUMMARY

COLUMNS = ["model", "benchmark", "k", "num_prompts", "pass@1", "cons@k", "format_rate", "mean_length",
           "temperature", "top_p"]


def results_table(summaries: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(summaries, ignore_index=True)[COLUMNS]


def to_markdown(table: pd.DataFrame, title: str) -> str:
    """A plain markdown table (no extra dependency), percentages as in the paper."""
    k = int(table["k"].iloc[0])
    head = ["Model", "Benchmark", "Prompts", "pass@1", f"cons@{k}", "Format", "Mean length"]
    lines = [f"## {title}", "",
             f"k = {k} samples per prompt, temperature {table['temperature'].iloc[0]}, top-p {table['top_p'].iloc[0]}.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        lines.append(f"| {r['model']} | {r['benchmark']} | {r['num_prompts']} | {100 * r['pass@1']:.1f} | "
                     f"{100 * r['cons@k']:.1f} | {100 * r['format_rate']:.1f} | {r['mean_length']:.1f} |")
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
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(length_png, dpi=120)
    plt.close(fig)
