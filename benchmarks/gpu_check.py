"""GPU check: r1flow's GRPO, SFT and evaluation on one device with a model of Qwen2.5-0.5B's full shape.

    python benchmarks/gpu_check.py                      # one GPU (default --device auto), bf16
    python benchmarks/gpu_check.py --device cpu --tiny  # a much smaller shape, to test the script on a CPU

No network: the model is randomly initialised (vocab 151,936, hidden 896, 24 layers, 14 query / 2 KV heads,
intermediate 4,864, tied embeddings; Qwen2ForCausalLM), the tokenizer a word-level one built here and
padded to the vocabulary size, the reward a tiny one registered here (no Math-Verify). Needs PyTorch,
transformers, tokenizers and r1flow's pure-Python dependencies; no Snakemake, vLLM or DeepSpeed.

Runs 5 GRPO steps (transformers sampling through r1flow.generation, reference model for the KL term),
5 SFT steps and one evaluation batch; prints sampling and training tokens per second, MFU (model FLOPs:
2 N per sampled or reference-scored token, 6 N per trained token, N the parameter count, attention's
FLOPs left out) against --peak-tflops (790: H200 bf16 dense) and peak GPU memory. Exits 2 on a device
error (a tensor on the wrong device, CUDA asked without it), 1 on any other error.

A random model rarely emits EOS, so completions run to their length limit: the work per step is fixed.

Then the checks of issue 24 item 8 (each a section of the output, all of them with --json FILE):
- fast path: r1flow.models.fast_llama's log-probs and gradients against transformers' forward in the
  check's dtype, at 512 and 4,096 tokens (largest and mean log-prob difference, gradient cosine);
- memory plan: the GPU memory plan's training phase (r1flow.training.memory_plan: weights, gradients,
  checkpointed activations, the output layer) against torch.cuda.max_memory_allocated for one forward and
  backward of a Qwen2.5-7B-shaped random model (built on the meta device, materialised on the GPU) at 1, 2
  and 4 rows x 8,192 and 16,384 tokens with checkpointing, through SFT's loss (transformers' forward) and
  GRPO's log-probs (the fast path); the plan is meant to be within 15% of the measured peak;
- master weights: one AdamW step at lr 3e-6 on bf16 weights with float32 master weights (LocalEngine) and
  without, against the same step in float32 (the share of weights that moved, the largest difference);
- the allocator gap (reserved minus allocated) after the GRPO steps.
With --tiny they run at a few tokens on small shapes, to test the script (memory figures need CUDA).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # r1flow, when not pip-installed

import torch  # noqa: E402

QWEN25_05B = dict(vocab_size=151_936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True,
                  max_position_embeddings=32_768, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
TINY = dict(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=10_000.0,
            rms_norm_eps=1e-6)
QWEN25_7B = dict(vocab_size=152_064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, intermediate_size=18_944, tie_word_embeddings=False,
                 max_position_embeddings=32_768, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tokenizer(texts: list[str], vocab_size: int):
    """A word-level tokenizer over the words of `texts`, padded with filler tokens to `vocab_size`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in pre_tokenizers.Whitespace().pre_tokenize_str(t) for w in [w[0]]})
    words = [w for w in words if w not in SPECIAL][: vocab_size - len(SPECIAL)]
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def build_model(shape: dict, tok, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def register_reward():
    """A reward that needs no Math-Verify: 1 when the completion contains the gold answer as a word."""
    from r1flow import rewards as R

    def gpu_check(completion, gold, **_):
        hit = str(gold) in completion.split()
        return R.Reward(float(hit), "contains" if hit else "absent", str(gold) if hit else None)

    if "gpu_check" not in R.REGISTRY:
        R.register("gpu_check")(R.per_sample(gpu_check))


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return "n/a (not a GPU)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(a) -> dict:
    from r1flow.data.prompts import render
    from r1flow.data.tasks import generate_tasks
    from r1flow.generation import Generator, SamplingParams
    from r1flow.models import DTYPES, resolve_device
    from r1flow.rewards.grading import sample_and_grade, summarize
    from r1flow.training.grpo import GRPOConfig, GRPOTrainer
    from r1flow.training.sft import train_sft

    device = resolve_device(a.device)  # CUDA asked without it: a ConfigError naming the key, exit 2
    dtype = DTYPES[a.dtype]
    shape = TINY if a.tiny else QWEN25_05B
    fam = {"chain": {"difficulties": [2, 3]}}
    tasks = generate_tasks(0, fam, {"train": 256, "validation": 16})
    tok = build_tokenizer([render(q, "table1") for q in tasks["train"]["question"]] +
                          [str(x) for x in tasks["train"]["answer"]], shape["vocab_size"])
    register_reward()
    print(f"device {device}, dtype {a.dtype}, shape {'tiny' if a.tiny else 'Qwen2.5-0.5B'} "
          f"(vocab {shape['vocab_size']}, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers)",
          flush=True)
    policy = build_model(shape, tok, device, dtype)
    ref = build_model(shape, tok, device, dtype)
    N = sum(p.numel() for p in policy.parameters())
    peak = a.peak_tflops * 1e12
    print(f"parameters: {N / 1e6:.1f}M; gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}", flush=True)
    figures = {}

    # -- GRPO ------------------------------------------------------------------------------------------
    cfg = GRPOConfig.from_dict({
        "prompts_per_step": a.prompts, "num_generations": a.group, "max_completion_length": a.new_tokens,
        "steps": a.steps, "beta": 0.04, "learning_rate": 1e-6, "warmup_steps": 0, "eval_every": 0,
        "micro_batch_size": a.micro_batch, "rewards": {"gpu_check": 1.0}, "generation_batch_size": a.prompts * a.group,
        "gradient_checkpointing": a.gradient_checkpointing})
    with tempfile.TemporaryDirectory() as state:
        trainer = GRPOTrainer(policy, ref, tok, cfg, tasks["train"], None, state)
        gen_tok = gen_t = train_tok = train_t = 0.0
        for _ in range(a.steps):
            sync(device)
            row = trainer.step()
            sync(device)
            n_out = a.prompts * a.group
            completion_tokens = row["completion_length"] * n_out
            gen_tok += completion_tokens
            gen_t += row["time_generation"]
            # trained tokens: the completion tokens (those with a loss); the prompts' share of the forward is
            # left out, so the training MFU is a lower bound
            train_tok += completion_tokens
            train_t += row["time_training"]
            print(f"GRPO step {row['step']}: reward {row['reward_mean']:.3f}, length {row['completion_length']:.0f}, "
                  f"kl {row['kl']:.3g}, {row['time_generation']:.2f}s sampling, {row['time_training']:.2f}s training",
                  flush=True)
    figures["grpo_peak_memory"] = peak_memory(device)
    if device.type == "cuda":  # what the caching allocator holds beyond live tensors after the steps
        gap = (torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) / 2**30
        figures["allocator_gap_gib"] = gap
        print(f"allocator gap after GRPO (reserved - allocated): {gap:.2f} GiB", flush=True)
    figures["grpo_sampling_tokens_per_s"] = gen_tok / gen_t
    figures["grpo_training_tokens_per_s"] = train_tok / train_t
    # sampling: 2N per token; training: 6N (policy) + 2N (reference) per completion token
    figures["grpo_sampling_mfu"] = 2 * N * gen_tok / gen_t / peak
    figures["grpo_training_mfu"] = 8 * N * train_tok / train_t / peak

    # -- SFT -------------------------------------------------------------------------------------------
    rng = random.Random(0)
    words = [w for w in tok.get_vocab() if w not in SPECIAL]
    n = a.steps * a.sft_batch
    prompts = [render(q, "table1") for q in tasks["train"]["question"][:n]]
    completions = [" ".join(rng.choices(words, k=a.sft_length)) for _ in range(n)]
    lengths = [len(p) + len(c) + 1 for p, c in zip(tok(prompts, add_special_tokens=False)["input_ids"],
                                                   tok(completions, add_special_tokens=False)["input_ids"])]
    sft_tokens = sum(min(x, a.sft_length + 256) for x in lengths)
    sync(device)
    if device.type == "cuda":  # each phase's own peak
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    rows = train_sft(policy, tok, prompts, completions, epochs=1, learning_rate=1e-6, batch_size=a.sft_batch,
                     micro_batch_size=a.micro_batch, max_length=a.sft_length + 256, warmup_steps=0,
                     gradient_checkpointing=a.gradient_checkpointing)
    sync(device)
    t_sft = time.perf_counter() - t0
    print(f"SFT: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, {t_sft:.2f}s", flush=True)
    figures["sft_peak_memory"] = peak_memory(device)
    figures["sft_training_tokens_per_s"] = sft_tokens / t_sft
    figures["sft_mfu"] = 6 * N * sft_tokens / t_sft / peak

    # -- one evaluation batch --------------------------------------------------------------------------
    val = tasks["validation"].assign(benchmark="gpu_check", problem_id=tasks["validation"]["prompt_id"])
    gen = Generator(policy, tok, batch_size=a.prompts * a.group, seed=0)
    params = SamplingParams(n=a.group, temperature=0.6, top_p=0.95, max_new_tokens=a.new_tokens)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        samples = sample_and_grade(gen, val, [render(q, "table1") for q in val["question"]], params, "gpu_check")
    sync(device)
    t_eval = time.perf_counter() - t0
    s = summarize(samples)
    figures["eval_sampling_tokens_per_s"] = float(samples["completion_tokens"].sum()) / t_eval
    print(f"evaluation batch: {len(samples)} samples, pass@1 {s['pass@1']:.3f}, {t_eval:.2f}s", flush=True)
    return figures


# -- issue 24 item 8 -----------------------------------------------------------------------------------
def random_rows(vocab: int, rows: int, tokens: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (rows, tokens), generator=g).to(device)


def fast_path_check(a, device, dtype) -> dict:
    """fast_llama against transformers' forward: the completion log-probs and the gradient of their sum,
    on a Qwen2.5-0.5B-shaped random model (tiny: the small shape), a group of 2 rows sharing a prompt."""
    from r1flow.models.logprobs import completion_logprobs

    shape = TINY if a.tiny else QWEN25_05B
    tok = build_tokenizer(["a b c"], shape["vocab_size"])
    model = build_model(shape, tok, device, dtype)
    out = {}
    for T in ((32, 64) if a.tiny else (512, 4096)):
        P = T // 8
        prompt = random_rows(shape["vocab_size"], 1, P, device).expand(2, P).contiguous()
        comp = random_rows(shape["vocab_size"], 2, T - P, device, seed=1)
        pm, cm = torch.ones_like(prompt), torch.ones_like(comp)
        res = {}
        for fast in (True, False):
            model.zero_grad(set_to_none=True)
            lp, _ = completion_logprobs(model, prompt, pm, comp, cm, 2, fast=fast)
            lp.float().sum().backward()
            grad = torch.cat([p.grad.float().flatten() for p in model.parameters()])
            res[fast] = (lp.detach().float(), grad)
        d = (res[True][0] - res[False][0]).abs()
        cos = torch.nn.functional.cosine_similarity(res[True][1], res[False][1], dim=0).item()
        out[T] = {"max_abs_logprob_diff": d.max().item(), "mean_abs_logprob_diff": d.mean().item(),
                  "grad_cosine": cos}
        print(f"fast path vs transformers at {T} tokens ({str(dtype)[6:]}): log-prob difference max "
              f"{d.max().item():.4f}, mean {d.mean().item():.5f}; gradient cosine {cos:.5f}", flush=True)
    del model
    return out


def plan_check(a, device, dtype) -> dict:
    """The memory plan's training phase against the measured peak of one forward and backward (no
    optimizer: the plan's optimizer and master-weight items are left out of both)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1flow.models.chunked import set_activation_checkpointing
    from r1flow.models.logprobs import completion_logprobs
    from r1flow.training import memory_plan as M
    from r1flow.training.sft import SFTBatch, sft_loss

    shape = TINY if a.tiny else QWEN25_7B
    with torch.device("meta"):  # no host copy of 7B weights: parameters are allocated on the GPU
        model = Qwen2ForCausalLM(Qwen2Config(**shape, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    model = model.to(dtype=dtype).to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.train()
    set_activation_checkpointing(model, True)
    plan_shape = M.ModelShape.from_hf_config({**shape, "model_type": "qwen2"})
    if not a.tiny:  # the plan's own Qwen2.5-7B, which it plans cluster jobs with
        assert plan_shape == M.KNOWN_SHAPES["Qwen/Qwen2.5-7B"], plan_shape
    w = torch.finfo(dtype).bits // 8
    P = sum(p.numel() for p in model.parameters())
    out = []
    for T in ((16, 32) if a.tiny else (8192, 16384)):
        for rows in (1, 2, 4):
            for path in ("sft (transformers forward)", "grpo (fast path)"):
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                ids = random_rows(shape["vocab_size"], rows, T, device)
                if path.startswith("sft"):
                    batch = SFTBatch(ids, torch.ones_like(ids), ids.clone())
                    sft_loss(model, batch).backward()
                    forward = "hf"
                else:
                    prompt, comp = ids[:, : T // 8], ids[:, T // 8:]
                    lp, _ = completion_logprobs(model, prompt, torch.ones_like(prompt), comp, torch.ones_like(comp),
                                                rows)
                    lp.float().mean().backward()
                    forward = "fast"
                planned = (w * P + w * P + M.activation_bytes(plan_shape, rows, T, w, True, forward)
                           + sum(M.output_layer_bytes(plan_shape, rows, T, w, training=True).values()))
                row = {"path": path, "rows": rows, "tokens": T, "planned_gib": planned / 2**30}
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    measured = torch.cuda.max_memory_allocated(device)
                    row.update(measured_gib=measured / 2**30, plan_over_measured=planned / measured)
                    print(f"memory plan, {path}, {rows} x {T} tokens, checkpointed: planned {planned / 2**30:.1f} GiB, "
                          f"measured {measured / 2**30:.1f} GiB ({100 * (planned / measured - 1):+.1f}%)", flush=True)
                else:
                    print(f"memory plan, {path}, {rows} x {T} tokens, checkpointed: planned {planned / 2**30:.3f} GiB, "
                          "measured n/a (not a GPU)", flush=True)
                out.append(row)
    del model
    return out


def master_weights_check(a, device, dtype=None) -> dict:
    """One AdamW step at lr 3e-6 from the same bf16 weights: float32 throughout (the reference), bf16 with
    float32 master weights (r1flow's LocalEngine) and bf16 without (the optimiser on the bf16 weights);
    bf16 whatever --dtype, since that is what it checks."""
    import copy

    from r1flow.training.engine import LocalEngine, master_parameters
    from r1flow.training.sft import SFTBatch, sft_loss

    shape = TINY if a.tiny else QWEN25_05B
    tok = build_tokenizer(["a b c"], shape["vocab_size"])
    start = build_model(shape, tok, device, torch.bfloat16).train()
    ids = random_rows(shape["vocab_size"], 2, 64 if a.tiny else 1024, device)
    batch = SFTBatch(ids, torch.ones_like(ids), ids.clone())

    def step(model, master=False):
        params, mw = master_parameters(model) if master else (list(model.parameters()), None)
        opt = torch.optim.AdamW(params, lr=3e-6, betas=(0.9, 0.99), weight_decay=0.0)
        if master:
            engine = LocalEngine(model, opt, 1.0, mw)
            engine.zero_grad()
            engine.backward(sft_loss(model, batch))
            engine.step()
            return mw.master
        sft_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return list(model.parameters())

    w0 = [p.detach().float().clone() for p in start.parameters()]
    ref = step(copy.deepcopy(start).float())
    with_master = step(copy.deepcopy(start), master=True)
    plain = step(copy.deepcopy(start))
    out = {}
    for name, ws in (("bf16 with float32 master weights", with_master), ("bf16 without", plain)):
        moved = sum(int((w.detach().float() != s).sum()) for w, s in zip(ws, w0)) / sum(s.numel() for s in w0)
        diff = max((w.detach().float() - r.detach().float()).abs().max().item() for w, r in zip(ws, ref))
        out[name] = {"share_moved": moved, "max_abs_diff_from_fp32_step": diff}
        print(f"AdamW step at lr 3e-6, {name}: {100 * moved:.1f}% of the weights moved; largest difference from "
              f"the float32 step {diff:.2e}", flush=True)
    ref_moved = sum(int((r.detach() != s).sum()) for r, s in zip(ref, w0)) / sum(s.numel() for s in w0)
    out["float32"] = {"share_moved": ref_moved}
    print(f"AdamW step at lr 3e-6, float32: {100 * ref_moved:.1f}% of the weights moved", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tiny", action="store_true", help="a much smaller model shape (for a CPU test)")
    ap.add_argument("--steps", type=int, default=5, help="GRPO steps and SFT steps")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per GRPO step (default 16; tiny 2)")
    ap.add_argument("--group", type=int, default=None, help="G, outputs per prompt (default 8; tiny 2)")
    ap.add_argument("--new-tokens", type=int, default=None, help="completion length (default 1024; tiny 8)")
    ap.add_argument("--micro-batch", type=int, default=None, help="outputs per forward/backward (default 16; tiny 2)")
    ap.add_argument("--sft-batch", type=int, default=None, help="SFT sequences per step (default 16; tiny 2)")
    ap.add_argument("--sft-length", type=int, default=None, help="SFT completion tokens (default 2048; tiny 16)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute each decoder layer in the backward (GRPO and SFT)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="peak dense bf16 TFLOP/s (H200: ~790)")
    ap.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS),
                    help="which parts to run (default: all)")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    a = ap.parse_args(argv)
    for k, big, small in (("prompts", 16, 2), ("group", 8, 2), ("new_tokens", 1024, 8), ("micro_batch", 16, 2),
                          ("sft_batch", 16, 2), ("sft_length", 2048, 16)):
        if getattr(a, k) is None:
            setattr(a, k, small if a.tiny else big)
    figures = {}
    try:
        from r1flow.models import DTYPES, resolve_device

        # CUDA asked without it: a ConfigError naming the key, exit 2
        device, dtype = resolve_device(a.device), DTYPES[a.dtype]
        for name in a.checks:
            t0 = time.perf_counter()
            figures[name] = run(a) if name == "throughput" else CHECKS[name](a, device, dtype)
            print(f"[{name}: {time.perf_counter() - t0:.1f}s]", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001  (reported, then the exit status says what kind)
        traceback.print_exc()
        text = f"{type(e).__name__}: {e}"
        device_error = any(s in text for s in ("device", "cuda", "CUDA", "meta tensor"))
        print(f"GPU CHECK FAILED ({'device error' if device_error else 'error'}): {text}", flush=True)
        return 2 if device_error else 1
    if a.json:
        import json

        Path(a.json).write_text(json.dumps(figures, indent=2, default=str))
    if "throughput" not in figures:
        print("GPU CHECK OK")
        return 0
    f = figures["throughput"]
    print(f"sampling tokens/s (GRPO): {f['grpo_sampling_tokens_per_s']:.1f}")
    print(f"sampling tokens/s (evaluation): {f['eval_sampling_tokens_per_s']:.1f}")
    print(f"training tokens/s (GRPO): {f['grpo_training_tokens_per_s']:.1f}")
    print(f"training tokens/s (SFT): {f['sft_training_tokens_per_s']:.1f}")
    print(f"MFU sampling (GRPO): {100 * f['grpo_sampling_mfu']:.3f}%")
    print(f"MFU training (GRPO): {100 * f['grpo_training_mfu']:.3f}%")
    print(f"MFU training (SFT): {100 * f['sft_mfu']:.3f}%")
    print(f"peak GPU memory: GRPO {f['grpo_peak_memory']}, SFT {f['sft_peak_memory']}")
    print("GPU CHECK OK")
    return 0


CHECKS = {"throughput": run, "fast_path": fast_path_check, "memory_plan": plan_check,
          "master_weights": master_weights_check}


if __name__ == "__main__":
    sys.exit(main())
