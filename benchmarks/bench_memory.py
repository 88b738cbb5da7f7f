"""Peak memory of one GRPO training step against completion length, on the CPU.

    PYTHONPATH=. python benchmarks/bench_memory.py [--lengths 256 512 1024 2048] [--threads 1]
        [--gradient-checkpointing]

One step = the reference model's log-probs (no grad), the policy's log-probs and entropy (with grad),
the GRPO loss (beta 0.04) and its backward; sampling and the optimiser update are left aside. The model
is randomly initialised with Qwen2.5-0.5B's vocabulary and width (vocab 151,936, hidden 896, 14 query
and 2 key-value heads, intermediate 4864, tied embeddings) and 4 layers, float32; 2 completion rows
(one prompt of 64 tokens, G = 2). Each length runs in a fresh subprocess and reports its peak resident
set size during the step (`resource.getrusage`, ru_maxrss, after resetting the kernel's peak mark once
the two models are built, so that their construction's transient peak does not count; the models'
resident size is included) and the same peak minus the resident size before the step ("step"): the
memory of the step itself.

Only public functions that exist in every version of r1flow since the first are called
(`completion_logprobs`, in `r1flow.models.logprobs` or before the layering `r1flow.training.logprobs`, and
`r1flow.training.grpo_loss.grpo_loss`), so the script
measures an older checkout too: `git worktree add /tmp/old <commit>` then
`PYTHONPATH=/tmp/old python benchmarks/bench_memory.py`.

Measured on a shared 2-core CPU machine (torch 2.13, transformers 5.24, `--threads 1`), peak RSS in MB
(step = peak minus the 1,841 MB of the two resident models), against ee62efc (main before this change):

    length   ee62efc peak (step)   this code peak (step)   with --gradient-checkpointing
       256        4,063  (2,221)          3,559  (1,717)          3,503  (1,662)
       512        4,963  (3,121)          3,601  (1,759)          3,532  (1,691)
      1024        8,055  (6,214)          3,682  (1,841)          3,478  (1,637)
      2048       14,567 (12,726)          4,584  (2,742)          3,992  (2,152)

At 2048 tokens the peak is 3.2x smaller (the step's own memory 4.6x). What remains is mostly fixed: the
policy's gradients (785 MB, of which 545 MB for the tied embedding / lm_head) plus, at short lengths, the
embedding's dense gradient added into it at the end of the backward; above ~1k tokens the peak moves to
the start of the backward, where it grows linearly with the layers' activations (gradient checkpointing
removes those: 3.6x smaller at 2048). Times are not comparable: the runs shared the CPU with other work.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import subprocess
import sys
import time

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6)
PROMPT_LEN, ROWS, G = 64, 2, 2


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux's clear_refs 5), so the model construction's transient
    peak does not count; False where that is not possible (the peak then covers construction too)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    """Peak RSS since the last reset: getrusage's ru_maxrss, which follows the reset mark (VmHWM)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def one(length: int, layers: int, threads: int, checkpointing: bool) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import r1flow
    from r1flow.training.grpo_loss import grpo_loss

    try:
        from r1flow.models.logprobs import completion_logprobs
    except ImportError:  # checkouts before the package's layering (ee62efc and older)
        from r1flow.training.logprobs import completion_logprobs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN25_05B, num_hidden_layers=layers)
    policy = Qwen2ForCausalLM(cfg).float()
    ref = copy.deepcopy(policy)
    ref.eval().requires_grad_(False)
    if checkpointing:
        if hasattr(policy, "activation_checkpointing_enable"):  # the fast forward of r1flow follows this flag
            policy.activation_checkpointing_enable({"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, cfg.vocab_size, (1, PROMPT_LEN), generator=g).repeat(ROWS, 1)
    prompt_mask = torch.ones_like(prompt_ids)
    completion_ids = torch.randint(0, cfg.vocab_size, (ROWS, length), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    advantages = torch.tensor([1.0, -1.0])
    gc.collect()
    build_peak = _peak_mb()
    reset = _reset_peak()
    base = _rss_mb()

    t0 = time.perf_counter()
    with torch.no_grad():
        ref_lp, _ = completion_logprobs(ref, prompt_ids, prompt_mask, completion_ids, completion_mask, G)
    lp, ent = completion_logprobs(policy, prompt_ids, prompt_mask, completion_ids, completion_mask, G,
                                  with_entropy=True)
    loss, _ = grpo_loss(lp, lp.detach(), ref_lp, advantages, completion_mask.float(), beta=0.04)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _peak_mb()  # before anything else allocates
    grad_norm = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad) for p in policy.parameters() if p.grad is not None])))
    return {"length": length, "peak_mb": round(peak), "models_mb": round(base), "step_mb": round(peak - base),
            "build_peak_mb": round(build_peak), "peak_reset": reset,
            "seconds": round(seconds, 1), "loss": float(loss), "entropy": float(ent.mean()),
            "grad_norm": grad_norm, "r1flow": os.path.dirname(os.path.dirname(r1flow.__file__))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one length in this process
    a = ap.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.one, a.layers, a.threads, a.gradient_checkpointing)))
        return
    rows = []
    for length in a.lengths:  # one fresh process per length: ru_maxrss is a high-water mark
        cmd = [sys.executable, __file__, "--one", str(length), "--layers", str(a.layers), "--threads", str(a.threads)]
        if a.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nr1flow from {rows[0]['r1flow']}; {a.layers} layers, {ROWS} rows, prompt {PROMPT_LEN} tokens")
    print(f"{'length':>7} {'peak MB':>9} {'step MB':>9} {'seconds':>8}")
    for r in rows:
        print(f"{r['length']:>7} {r['peak_mb']:>9} {r['step_mb']:>9} {r['seconds']:>8}")


if __name__ == "__main__":
    main()
