"""Resident memory of a GRPO job, step by step: does it grow, and what is its peak?

    python benchmarks/bench_grpo_memory.py --model models/smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompts data/gsm8k_test.jsonl --prompts-per-step 8 --G 4 --max-tokens 160 --steps 10

Runs `--steps` GRPO steps through r1flow's GRPOTrainer, as scripts/grpo.py does (policy and a freshly
loaded reference model, the rule-based rewards with their Math-Verify worker processes, the Table 1
template, no validation), and prints after every step:

    rss_mb       the trainer process's current resident memory (VmRSS)
    peak_mb      its peak so far
    sample/train/update  the step's own peak in each phase: sampling, log-probs and backward, optimizer
    child_mb     current resident memory summed over its child processes (the reward workers)
    child_peak   the largest peak (VmHWM) among them

then the growth from the first measured step to the last. Without --model a tiny Llama is built (fast; for
a quick look at the growth). `--trim-in-bench` calls malloc_trim(0) after each step here as well, to
test the allocator hypothesis against a trainer without it.

Measured (SmolLM2-135M-Instruct Q4_1 GGUF in float32, GSM8K test prompts, 1 thread, loaded machine):
4 x G=4 x 64 tokens, RSS after steps 1-5 before malloc_trim in the trainer: 4664, 5958, 5679, 4658,
5035 MB (peak 6745); with it, between-step troughs (sampled from /proc) 2673, 2640, 2678 MB: the
retained gigabytes were free allocator memory, not live tensors. 8 x 4 x 160 with the whole batch in one
forward/backward: OOM-killed at 14 GB during step 1; with --micro-batch-size 4: 2567 MB after step 1,
peak 4296 MB.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch


def tiny_model(path: Path):
    from r1flow.data.tasks import generate_tasks
    from r1flow.models import save_policy
    from r1flow.models.tiny import build_corpus, build_model, train_tokenizer

    fam = {"chain": {"difficulties": [2, 3, 4, 5]}}
    docs = build_corpus(0, 2000, fam, {"worked": 1.0}, "table1")
    tok = train_tokenizer(docs, 512)
    save_policy(build_model(tok, 64, 2, 4, 128, seed=0), tok, path)
    return generate_tasks(1, fam, {"train": 500})["train"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or hub id; none: a tiny Llama built here")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--prompts", default=None, help="jsonl/parquet/csv with question and answer (GSM8K's form)")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--beta", type=float, default=0.04, help="> 0 loads a reference model, as the config does")
    ap.add_argument("--micro-batch-size", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute each decoder layer in the backward (the config's gradient_checkpointing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trim-in-bench", action="store_true", help="malloc_trim(0) after each step, here")
    ap.add_argument("--csv", default=None, help="also write the per-step figures here")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)

    from r1flow.data.tasks import load_prompts
    from r1flow.memory import children_rss_mb, rss_mb, trim_allocator
    from r1flow.models import load_policy
    from r1flow.training.grpo import GRPOConfig, GRPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        if a.model is None:
            tasks = tiny_model(Path(tmp) / "model")
            model_path = str(Path(tmp) / "model")
        else:
            model_path = a.model
        if a.prompts:
            tasks = load_prompts(a.prompts)
        print(f"before loading: rss {rss_mb():.0f} MB", flush=True)
        policy, tok = load_policy(model_path, gguf_file=a.gguf_file)
        ref = load_policy(model_path, gguf_file=a.gguf_file)[0] if a.beta > 0 else None
        cfg = GRPOConfig(prompts_per_step=a.prompts_per_step, num_generations=a.G, max_completion_length=a.max_tokens,
                         beta=a.beta, temperature=1.0, learning_rate=5e-6, warmup_steps=2, eval_every=0,
                         steps=a.steps, save_every=10**6, micro_batch_size=a.micro_batch_size,
                         gradient_checkpointing=a.gradient_checkpointing, memory_by_phase=True,
                         reward_options={"accuracy": {"fallback": "last_number"}})
        trainer = GRPOTrainer(policy, ref, tok, cfg, tasks, None, Path(tmp) / "state")
        print(f"models loaded: rss {rss_mb():.0f} MB, peak {trainer.peaks.run_peak:.0f} MB; "
              f"{a.prompts_per_step} prompts x G={a.G}, {a.max_tokens} new tokens, beta {a.beta}, "
              f"{a.threads} thread(s)"
              f"{', gradient checkpointing' if a.gradient_checkpointing else ''}", flush=True)
        print(f"{'step':>4} {'secs':>6} {'len':>6} {'rss_mb':>8} {'peak_mb':>8} {'sample':>7} {'train':>7} "
              f"{'update':>7} {'child_mb':>8} {'child_peak':>10}", flush=True)
        rows = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            row = trainer.step()
            if a.trim_in_bench:
                trim_allocator()
            secs = time.perf_counter() - t0
            cur, cpeak = children_rss_mb()
            r = {"step": row["step"], "secs": secs, "completion_length": row["completion_length"],
                 "rss_mb": rss_mb(), "peak_mb": trainer.peaks.run_peak, "child_mb": cur, "child_peak_mb": cpeak,
                 "trainer_rss_mb": row.get("rss_mb", float("nan")),
                 **{k: row[f"peak_rss_{k}_mb"] for k in ("sampling", "training", "update")}}
            rows.append(r)
            print(f"{r['step']:>4} {secs:>6.1f} {r['completion_length']:>6.1f} {r['rss_mb']:>8.0f} "
                  f"{r['peak_mb']:>8.0f} {r['sampling']:>7.0f} {r['training']:>7.0f} {r['update']:>7.0f} "
                  f"{cur:>8.0f} {cpeak:>10.0f}", flush=True)
    first, last = rows[0], rows[-1]
    print(f"growth step {first['step']} -> {last['step']}: {last['rss_mb'] - first['rss_mb']:+.0f} MB "
          f"(trainer), {last['child_mb'] - first['child_mb']:+.0f} MB (children); "
          f"peak {last['peak_mb']:.0f} MB (trainer), {last['child_peak_mb']:.0f} MB (largest child)", flush=True)
    if a.csv:
        import pandas as pd

        pd.DataFrame(rows).to_csv(a.csv, index=False)
    return rows


if __name__ == "__main__":
    main()
