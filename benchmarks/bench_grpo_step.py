"""One GRPO step of r1flow's trainer vs TRL's GRPOTrainer, same model, batch, group size and lengths.

    pip install -e ".[bench]" && python benchmarks/bench_grpo_step.py [--steps 12] [--hidden 128] [--layers 4]
    python benchmarks/bench_grpo_step.py --model models/smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompts 8 --group 4 --new-tokens 128 --steps 5 --warmup 1

Without --model, both trainers get the same freshly initialised tiny Llama (so neither stops early:
every completion runs to max_completion_length and the work is equal). With --model (a folder, hub id
or GGUF file), the model is loaded once through r1flow's loader and saved as a plain folder that both
trainers load; a real model stops at its end-of-sequence token, so the mean completion lengths are
printed beside the times. Default work: 16 prompts x G = 8 completions per step, 32 new tokens, beta 0.04
(so both run the reference model), mu = 1, temperature 1.0, float32, on the CPU with the same thread
count. `--mixed-precision bfloat16` runs r1flow with `mixed_precision: bfloat16` and TRL with `bf16=True`
(both: bfloat16 autocast over float32 weights and optimizer). The first steps are warm-up; the medians of the rest are compared, and r1flow's split between
sampling and training is printed. Run it on an otherwise idle machine: the two are timed one after the
other.
"""

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

BETA = 0.04
PROMPTS, G, NEW_TOKENS, MIXED = 16, 8, 32, None  # set from the command line in main()


def build_model(path: Path, hidden: int, layers: int):
    from r1flow.data.tasks import generate_tasks
    from r1flow.models import save_policy
    from r1flow.models.tiny import build_corpus, build_model, train_tokenizer

    fam = {"chain": {"difficulties": [2, 3, 4, 5]}}
    docs = build_corpus(0, 3000, fam, {"worked": 1.0}, "table1")
    tok = train_tokenizer(docs, 512)
    model = build_model(tok, hidden, layers, 4, 256, seed=0)
    save_policy(model, tok, path)
    tasks = generate_tasks(1, fam, {"train": 2000})["train"]
    return tasks


def load_real_model(path: Path, model: str, gguf_file: str | None):
    """A real model (folder, hub id or GGUF) through r1flow's one loader, saved as a plain folder."""
    from r1flow.data.tasks import generate_tasks
    from r1flow.models import load_policy, save_policy

    policy, tok = load_policy(model, gguf_file=gguf_file)
    save_policy(policy, tok, path)
    return generate_tasks(1, {"chain": {"difficulties": [2, 3, 4, 5]}}, {"train": 2000})["train"]


def no_reward(completions, **kw):
    return [0.0 for _ in completions]


def time_ours(path, tasks, steps, warmup):
    from r1flow.models import load_policy
    from r1flow.training.grpo import GRPOConfig, GRPOTrainer

    policy, tok = load_policy(str(path))
    ref, _ = load_policy(str(path))
    # a zero reward would still cost the same; use the real rewards so the step is the real one
    cfg = GRPOConfig(prompts_per_step=PROMPTS, num_generations=G, max_completion_length=NEW_TOKENS, beta=BETA,
                     temperature=1.0, eval_every=0, steps=steps, save_every=10**6, mixed_precision=MIXED)
    with tempfile.TemporaryDirectory() as state:
        trainer = GRPOTrainer(policy, ref, tok, cfg, tasks, None, state)
        times, lengths, split = [], [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            row = trainer.step()
            times.append(time.perf_counter() - t0)
            lengths.append(row["completion_length"])
            split.append((row["time_generation"], row["time_training"]))
    gen, train = (statistics.median(x) for x in zip(*split[warmup:]))
    return times[warmup:], statistics.mean(lengths), (gen, train)


def time_trl(path, tasks, steps, warmup):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1flow.data.prompts import render

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ds = Dataset.from_dict({"prompt": [render(q) for q in tasks["question"]]})
    times, lengths = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=PROMPTS * G, num_generations=G,
            max_completion_length=NEW_TOKENS, beta=BETA, temperature=1.0, num_iterations=1, learning_rate=1e-4,
            max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, bf16=MIXED == "bfloat16", save_strategy="no",
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[no_reward], args=args,
                              train_dataset=ds, callbacks=[Timer()])
        trainer.remove_callback(PrinterCallback)  # keep the output to the figures
        trainer.train()
    return times[warmup:], statistics.mean(lengths) if lengths else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="a real model: folder, hub id, or the folder of --gguf-file")
    ap.add_argument("--gguf-file", default=None, help="a GGUF file inside --model")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=32, help="max_completion_length")
    ap.add_argument("--mixed-precision", choices=["bfloat16"], default=None,
                    help="bfloat16 autocast in both trainers (r1flow mixed_precision, TRL bf16=True)")
    ap.add_argument("--only", choices=["r1flow", "trl"], default=None, help="time one trainer only")
    a = ap.parse_args()
    global PROMPTS, G, NEW_TOKENS, MIXED
    PROMPTS, G, NEW_TOKENS, MIXED = a.prompts, a.group, a.new_tokens, a.mixed_precision
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model"
        tasks = load_real_model(path, a.model, a.gguf_file) if a.model else build_model(path, a.hidden, a.layers)
        n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(path).parameters())
        what = f"{a.model}{' / ' + a.gguf_file if a.gguf_file else ''}" if a.model else \
            f"Llama hidden {a.hidden}, {a.layers} layers"
        print(f"model: {what}, {n_params / 1e6:.2f}M parameters; "
              f"{PROMPTS} prompts x G={G}, {NEW_TOKENS} new tokens, beta {BETA}, {a.threads} threads, "
              f"{MIXED or 'float32'}")
        if a.only != "trl":
            ours, ours_len, (gen, train) = time_ours(path, tasks, a.steps, a.warmup)
            mo = statistics.median(ours)
            print(f"r1flow GRPO step: median {mo:.3f} s over {len(ours)} steps (mean completion length "
                  f"{ours_len:.1f}); median {gen:.3f} s sampling, {train:.3f} s training", flush=True)
        if a.only != "r1flow":
            trl, trl_len = time_trl(path, tasks, a.steps, a.warmup)
            mt = statistics.median(trl)
            print(f"TRL    GRPO step: median {mt:.3f} s over {len(trl)} steps (mean completion length {trl_len:.1f})")
    if a.only is None:
        print(f"ratio r1flow / TRL: {mo / mt:.2f}")


if __name__ == "__main__":
    main()
