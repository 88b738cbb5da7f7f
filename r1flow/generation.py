"""The one generation interface: prompts in, n sampled completions per prompt out.

GRPO (sampling from the old policy), evaluation (pass@1 over k samples at temperature 0.6, top-p 0.95)
and, later, rejection sampling all call `Generator.generate`. This backend runs a transformers causal
LM with a hand-rolled KV-cached sampling loop: for small models on CPU, `model.generate` spends most of
its time in per-token bookkeeping, and the loop below is all that R1 sampling needs. `VLLMGenerator`
implements the same method with vLLM for clusters (unexercised: no GPU here); `make_generator` picks the
backend from the config's `generation` section.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from r1flow.models import fast_llama, model_device
from r1flow.models.decoding import pad_batch, sample_next


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt (G in GRPO, k in pass@1)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass
class Completions:
    """Completions in prompt-major order: rows i*n .. i*n+n-1 belong to prompt i."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C) right-padded with pad; includes the EOS token when emitted
    completion_mask: torch.Tensor  # (N, C) 1 on generated tokens up to and including EOS
    truncated: torch.Tensor  # (N,) bool: no EOS within max_new_tokens
    texts: list[str]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    def to(self, device) -> "Completions":
        """The same completions with their tensors on `device` (a backend that returns CPU tensors, e.g.
        vLLM's token lists, feeding a policy on a GPU)."""
        t = {k: getattr(self, k).to(device) for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                        "completion_mask", "truncated")}
        return Completions(**t, texts=self.texts)


class Generator:
    """Transformers backend. `batch_size` bounds how many sequences are decoded together."""

    def __init__(self, model, tokenizer, batch_size: int = 256, seed: int = 0, fast: bool = True,
                 progress: bool = False):
        self.model = model
        # Llama/Qwen2 models decode through r1flow.models.fast_llama: same tokens (tested), each prompt
        # prefilled once for its n samples, no per-step cache reallocation
        self.fast = fast and fast_llama.supports(model)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # a progress bar over sequences, for long evaluation runs; never in a log file (disable=None: not a tty)
        self.progress = progress
        # on the model's device: torch.multinomial draws with a generator of its probabilities' device
        self.device = model_device(model)
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        stop = {tokenizer.eos_token_id}
        gen_cfg = getattr(model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        stop |= set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.stop_ids = torch.tensor(sorted(i for i in stop if i is not None), dtype=torch.long, device=self.device)

    def state_dict(self):
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state):
        self.rng.set_state(state["rng"])

    @torch.no_grad()  # not inference_mode: the outputs are reused as inputs of the training forward
    def generate(self, prompts: list[str], params: SamplingParams) -> Completions:
        tok = self.tokenizer
        enc = tok(prompts, add_special_tokens=False)["input_ids"]
        per_chunk = max(1, self.batch_size // params.n)  # prompts per decoding batch
        parts = []
        with tqdm(total=len(enc) * params.n, unit="seq", desc="generating",
                  disable=None if self.progress else True) as bar:
            for i in range(0, len(enc), per_chunk):
                parts.append(self._decode(enc[i : i + per_chunk], params))
                bar.update(parts[-1][0].shape[0])
        P = max(p[0].shape[1] for p in parts)
        C = max(p[2].shape[1] for p in parts)
        pad = tok.pad_token_id

        def cat(idx, width, value, left):
            out = []
            for p in parts:
                t = p[idx]
                extra = width - t.shape[1]
                padding = (extra, 0) if left else (0, extra)
                out.append(torch.nn.functional.pad(t, padding, value=value))
            return torch.cat(out)

        prompt_ids, prompt_mask = cat(0, P, pad, True), cat(1, P, 0, True)
        completion_ids, completion_mask = cat(2, C, pad, False), cat(3, C, 0, False)
        truncated = torch.cat([p[4] for p in parts])
        texts = tok.batch_decode(completion_ids.masked_fill(completion_mask == 0, pad), skip_special_tokens=True)
        return Completions(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, texts)

    def _decode(self, prompts: list[list[int]], params: SamplingParams):
        """n completions for each tokenized prompt; returns per-row prompt ids/mask, completion ids/mask, truncated."""
        model, pad = self.model, self.tokenizer.pad_token_id
        was_training = model.training
        model.eval()
        ids, mask = pad_batch(prompts, pad, left=True, device=self.device)
        row_ids, row_mask = ids.repeat_interleave(params.n, 0), mask.repeat_interleave(params.n, 0)
        try:
            if self.fast:
                comp, cmask, truncated = fast_llama.sample(
                    model, ids, mask, params.n, params.max_new_tokens, params.temperature, params.top_p,
                    self.stop_ids, pad, self.rng)
            else:
                comp, cmask, truncated = self._decode_hf(row_ids, row_mask, params)
        finally:
            model.train(was_training)
        return row_ids, row_mask, comp, cmask, truncated

    def _decode_hf(self, ids, mask, params: SamplingParams):
        """Reference decoding loop through the model's own forward and KV cache (any causal LM)."""
        model, pad = self.model, self.tokenizer.pad_token_id
        B = ids.shape[0]
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        # transformers 5.x calls the KV cache `cache`; 4.x called it `past_key_values`
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        past, next_pos = getattr(out, kw), pos[:, -1:] + 1
        logits = out.logits[:, -1]
        new, done = [], torch.zeros(B, dtype=torch.bool, device=ids.device)
        attn = mask
        for t in range(params.max_new_tokens):
            nxt = sample_next(logits, params.temperature, params.top_p, self.rng)
            nxt = nxt.masked_fill(done, pad)
            new.append(nxt)
            done = done | torch.isin(nxt, self.stop_ids)
            if bool(done.all()) or t == params.max_new_tokens - 1:
                break
            attn = torch.cat([attn, attn.new_ones((B, 1))], 1)
            out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True, **{kw: past})
            past, next_pos, logits = getattr(out, kw), next_pos + 1, out.logits[:, -1]
        comp = torch.stack(new, 1)
        # a token belongs to the completion until (and including) the first stop token
        is_stop = torch.isin(comp, self.stop_ids)
        after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0
        cmask = (~after_stop).long()
        return comp, cmask, ~is_stop.any(1)


# -- vLLM backend ---------------------------------------------------------------------------------------
# UNEXERCISED: written against vLLM's documented offline API (vllm.LLM, vllm.SamplingParams,
# LLM.generate with token-id prompts, LLM.collective_rpc) but never run here (no GPU, vLLM not installed).
# Its tests skip without vLLM and a GPU.


def completions_from_token_lists(prompt_tokens: list[list[int]], outputs: list[list[tuple[list[int], bool]]],
                                 tokenizer) -> Completions:
    """Build `Completions` (prompt-major rows) from per-prompt lists of (completion token ids, truncated).
    Shared by backends that return token lists; the tensors are what GRPO trains on."""
    pad = tokenizer.pad_token_id
    rows_p, rows_c, trunc = [], [], []
    for p, outs in zip(prompt_tokens, outputs):
        for toks, cut in outs:
            rows_p.append(list(p))
            rows_c.append(list(toks))
            trunc.append(bool(cut))
    prompt_ids, prompt_mask = pad_batch(rows_p, pad, left=True)
    completion_ids, completion_mask = pad_batch(rows_c, pad, left=False)
    texts = tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, pad), skip_special_tokens=True)
    return Completions(prompt_ids, prompt_mask, completion_ids, completion_mask,
                       torch.tensor(trunc, dtype=torch.bool, device="cpu"),
                       texts)


class VLLMGenerator:
    """vLLM backend with the same `generate(prompts, SamplingParams) -> Completions` as `Generator`.

    Prompts go in as token ids (the same tokenization as the transformers backend); each request's
    n samples come from one seeded vLLM request, so a run is reproducible for a fixed vLLM version and
    hardware. `sync_weights(model)` copies a training policy's weights into the engine (GRPO samples from
    the current policy, eq. 1's pi_theta_old).
    """

    def __init__(self, model_path: str, tokenizer, seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, dtype: str = "auto",
                 enforce_eager: bool = False):
        import vllm  # imported here: vLLM is optional and needs a GPU

        self.vllm = vllm
        self.tokenizer = tokenizer
        self.seed = seed
        self.calls = 0
        self.llm = vllm.LLM(model=model_path, tokenizer=model_path, tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            dtype=dtype, seed=seed, enforce_eager=enforce_eager)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]

    def generate(self, prompts: list[str], params: SamplingParams) -> Completions:
        enc = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        # a fresh seed per call (from the run's seed and a call counter, which checkpoints keep), so a
        # resumed run draws what an uninterrupted one would
        self.calls += 1
        sp = self.vllm.SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                      max_tokens=params.max_new_tokens, seed=self.seed * 1_000_003 + self.calls)
        requests = [{"prompt_token_ids": ids} for ids in enc]
        results = self.llm.generate(requests, sp, use_tqdm=False)
        outputs = [[self._tokens(o) for o in r.outputs] for r in results]
        return completions_from_token_lists(enc, outputs, self.tokenizer)

    def _tokens(self, o) -> tuple[list[int], bool]:
        """(completion token ids ending with the stop token when the output stopped, truncated).
        The stop token must be in the completion, as in the transformers backend: GRPO's loss on it is
        what teaches the policy to stop. vLLM keeps an EOS token in `token_ids`; it is added if absent."""
        toks = list(o.token_ids)
        if o.finish_reason == "stop" and (not toks or toks[-1] != self.tokenizer.eos_token_id) and \
                getattr(o, "stop_reason", None) is None:
            toks.append(self.tokenizer.eos_token_id)
        return toks, o.finish_reason == "length"

    def sync_weights(self, model) -> None:
        """Load the training model's current weights into the vLLM engine's model."""
        weights = [(name, p.detach()) for name, p in model.state_dict().items()]
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        if worker is not None:  # engine with an in-process driver worker
            worker.model_runner.model.load_weights(weights)
            return
        # newer engines: run the load on each worker (in-process when VLLM_ENABLE_V1_MULTIPROCESSING=0)
        self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))


def _load_weights_on_worker(worker, weights):
    worker.model_runner.model.load_weights(weights)


BACKENDS = ("transformers", "vllm")


def make_generator(model, tokenizer, settings: dict | None = None, *, model_path: str | None = None,
                   batch_size: int = 256, seed: int = 0, fast: bool = True, progress: bool = False):
    """The configured backend (`generation.backend` in the config): "transformers" runs `model` in this
    process; "vllm" loads `model_path` into a vLLM engine (options from `generation.vllm`)."""
    settings = settings or {}
    backend = settings.get("backend", "transformers")
    if backend not in BACKENDS:
        raise ValueError(f"generation.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "transformers":
        return Generator(model, tokenizer, batch_size=batch_size, seed=seed, fast=fast, progress=progress)
    if model_path is None:
        raise ValueError("the vllm backend needs the model's path or hub id")
    return VLLMGenerator(model_path, tokenizer, seed=seed, **settings.get("vllm", {}))
