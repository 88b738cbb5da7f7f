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
import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from r1flow.models import fast_llama, full_parameters, model_device
from r1flow.models.decoding import GroupGenerators, pad_batch, sample_next

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt (G in GRPO, k in pass@1)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    logprobs: bool = False  # also return the sampler's log-prob of each sampled token (where the backend can)


@dataclass
class Completions:
    """Completions in prompt-major order: rows i*n .. i*n+n-1 belong to prompt i."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, C) right-padded with pad; includes the EOS token when emitted
    completion_mask: torch.Tensor  # (N, C) 1 on generated tokens up to and including EOS
    truncated: torch.Tensor  # (N,) bool: no EOS within max_new_tokens
    texts: list[str]
    # (N, C) float: the sampler's own log-prob of each completion token (vLLM, when asked); NaN where the
    # sampler gave none (a stop token vLLM did not keep), 0 on padding. None: the backend keeps none
    # (the transformers backend samples from the training model itself).
    sampler_logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    def to(self, device) -> "Completions":
        """The same completions with their tensors on `device` (a backend that returns CPU tensors, e.g.
        vLLM's token lists, feeding a policy on a GPU)."""
        t = {k: getattr(self, k).to(device) for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                        "completion_mask", "truncated")}
        lp = None if self.sampler_logprobs is None else self.sampler_logprobs.to(device)
        return Completions(**t, texts=self.texts, sampler_logprobs=lp)


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
        # progress over sequences, for long evaluation and sampling runs: a bar on a terminal, and a log line
        # per decoding batch (sequences, tokens, throughput, time left) that a SLURM log keeps
        self.progress = progress
        # on the model's device: each draw's uniforms come from a generator on its probabilities' device
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
    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[int] | None = None) -> Completions:
        """`seeds`: one per prompt; each prompt's n samples then come from their own random stream
        (GroupGenerators) and `self.rng` is left as it is. Without seeds they draw from `self.rng`."""
        tok = self.tokenizer
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        enc = tok(prompts, add_special_tokens=False)["input_ids"]
        per_chunk = max(1, self.batch_size // params.n)  # prompts per decoding batch
        parts = []
        total, done, tokens, t0 = len(enc) * params.n, 0, 0, time.perf_counter()
        with tqdm(total=total, unit="seq", desc="generating", disable=None if self.progress else True) as bar:
            for i in range(0, len(enc), per_chunk):
                rng = self.rng if seeds is None else GroupGenerators(seeds[i : i + per_chunk], params.n)
                parts.append(self._decode(enc[i : i + per_chunk], params, rng))
                bar.update(parts[-1][0].shape[0])
                if self.progress:
                    done, tokens = done + parts[-1][0].shape[0], tokens + int(parts[-1][3].sum())
                    secs = time.perf_counter() - t0
                    log.info("generated %d/%d sequences, %d new tokens in %.0f s (%.1f tokens/s), about %.0f s left",
                             done, total, tokens, secs, tokens / max(secs, 1e-9), secs / done * (total - done))
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

    def _decode(self, prompts: list[list[int]], params: SamplingParams, rng=None):
        """n completions for each tokenized prompt; returns per-row prompt ids/mask, completion ids/mask, truncated."""
        model, pad = self.model, self.tokenizer.pad_token_id
        rng = self.rng if rng is None else rng
        was_training = model.training
        model.eval()
        ids, mask = pad_batch(prompts, pad, left=True, device=self.device)
        row_ids, row_mask = ids.repeat_interleave(params.n, 0), mask.repeat_interleave(params.n, 0)
        try:
            if self.fast:
                comp, cmask, truncated = fast_llama.sample(
                    model, ids, mask, params.n, params.max_new_tokens, params.temperature, params.top_p,
                    self.stop_ids, pad, rng)
            else:
                comp, cmask, truncated = self._decode_hf(row_ids, row_mask, params, rng)
        finally:
            model.train(was_training)
        return row_ids, row_mask, comp, cmask, truncated

    def _decode_hf(self, ids, mask, params: SamplingParams, rng=None):
        """Reference decoding loop through the model's own forward and KV cache (any causal LM)."""
        model, pad = self.model, self.tokenizer.pad_token_id
        rng = self.rng if rng is None else rng
        B = ids.shape[0]
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        # transformers 5.x calls the KV cache `cache`; 4.x called it `past_key_values`
        # (a LoRA model's PEFT wrapper passes the keyword through to the model it wraps)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        kw = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        past, next_pos = getattr(out, kw), pos[:, -1:] + 1
        logits = out.logits[:, -1]
        new, done = [], torch.zeros(B, dtype=torch.bool, device=ids.device)
        attn = mask
        for t in range(params.max_new_tokens):
            nxt = sample_next(logits, params.temperature, params.top_p, rng)
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
# UNEXERCISED ON vLLM: written against vLLM 0.33.0's offline API (the version envs/generate-vllm.yaml pins;
# names checked in its source: vllm.LLM(enable_prefix_caching, enable_sleep_mode, logprobs_mode,
# distributed_executor_backend="external_launcher"), LLM.generate with token-id prompts and one
# SamplingParams per prompt, SamplingParams(seed, logprobs=0), CompletionOutput.logprobs,
# LLM.reset_prefix_cache, LLM.sleep(level) / LLM.wake_up(tags), LLM.collective_rpc(method name) with
# LLM(worker_extension_cls)) but never run here (no GPU, vLLM not installed). The sleep / wake / weight-sync
# sequence follows vLLM's source as stored in this project's search index (vllm/entrypoints/llm.py,
# v1/worker/worker_base.py and examples/offline_inference/rlhf_utils.py of its main branch; the 0.33.0 tag
# itself could not be told apart there) and TRL's colocated GRPO (trl/trainer/grpo_trainer.py).
# tests/test_generation_backends.py checks our side against a stand-in module; the test against real vLLM
# skips without vLLM and a GPU.


class SyncedGenerator(Generator):
    """The transformers backend on a copy of the weights of its own, for a policy whose weights are sharded
    over the ranks (FSDP2): each rank samples its own groups, which a sharded forward cannot do (its
    layers' gathers are collectives, and ranks stop decoding at different steps). The copy is what a
    colocated vLLM engine would hold; `sync_weights` loads the policy's gathered weights after each update."""

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        own = self.model.state_dict(keep_vars=True)
        for name, t in full_parameters(model):  # one whole parameter at a time (a collective)
            own[name].copy_(t)


def completions_from_token_lists(prompt_tokens: list[list[int]], outputs: list[list[tuple]], tokenizer) -> Completions:
    """Build `Completions` (prompt-major rows) from per-prompt lists of (completion token ids, truncated)
    or (completion token ids, truncated, sampler log-prob per token). Shared by backends that return token
    lists; the tensors are what GRPO trains on. Log-probs (all outputs or none) become `sampler_logprobs`."""
    pad = tokenizer.pad_token_id
    rows_p, rows_c, trunc, rows_lp = [], [], [], []
    for p, outs in zip(prompt_tokens, outputs):
        for toks, cut, *lp in outs:
            rows_p.append(list(p))
            rows_c.append(list(toks))
            trunc.append(bool(cut))
            rows_lp.append(lp[0] if lp else None)
    prompt_ids, prompt_mask = pad_batch(rows_p, pad, left=True)
    completion_ids, completion_mask = pad_batch(rows_c, pad, left=False)
    texts = tokenizer.batch_decode(completion_ids.masked_fill(completion_mask == 0, pad), skip_special_tokens=True)
    sampler = None
    if rows_lp and all(lp is not None for lp in rows_lp):
        sampler = torch.zeros(completion_ids.shape, dtype=torch.float32, device="cpu")
        for r, lp in enumerate(rows_lp):
            if len(lp) != len(rows_c[r]):
                raise ValueError(f"row {r}: {len(lp)} log-probs for {len(rows_c[r])} tokens")
            sampler[r, : len(lp)] = torch.tensor([float("nan") if v is None else v for v in lp], dtype=torch.float32)
    return Completions(prompt_ids, prompt_mask, completion_ids, completion_mask, torch.tensor(trunc, dtype=torch.bool, device="cpu"),
                       texts, sampler)


class VLLMGenerator:
    """vLLM backend with the same `generate(prompts, SamplingParams, seeds) -> Completions` as `Generator`.

    Prompts go in as token ids (the same tokenization as the transformers backend). With `seeds` (one per
    prompt, as GRPO passes) each prompt is its own seeded request; without, one seed per call from the
    run's seed and a call counter. Either way a run is reproducible for a fixed vLLM version and hardware.

    Weights: `sync_weights(model)` copies a training policy's weights into the engine (GRPO samples from
    the current policy, eq. 1's pi_theta_old), then resets vLLM's prefix cache: its keys and values were
    computed by the old weights, and every GRPO prompt shares a long template prefix (Table 1), which
    would otherwise be served from the stale cache.

    Colocated mode (`colocate`): each training rank (torchrun / DeepSpeed, or one plain process) runs its
    own engine in its own process, on the GPU of its LOCAL_RANK, taking `gpu_memory_utilization` of that
    GPU, through vLLM's "external_launcher" executor, which reuses the ranks' torch.distributed group (each
    rank then generates on its own: vLLM's "external DP") and keeps the engine's worker in this process, so
    the weight sync hands it the policy's tensors by reference, not through a socket or a file.
    With `tensor_parallel_size` T > 1 (a model whose weights and KV cache do not fit one GPU beside its
    rank's training state, e.g. 32B) every T consecutive ranks are one engine, each holding 1/T of it, as
    vLLM's external launcher groups them and TRL's colocate mode does (vllm_tensor_parallel_size): a rank's
    `generate` is then a collective of its group, which gathers the group's prompts and seeds, samples them
    all (the same requests on every rank of the engine, as the launcher requires) and keeps its own rows;
    every rank of the group must call it as often, one without prompts of its own included (it gets None).
    `sleep_mode` (vLLM's enable_sleep_mode): `sleep()` frees the engine's GPU memory while the trainer
    trains (level 1: weights copied to CPU, KV cache dropped; level 2: both dropped, for a caller that
    reloads the weights after every sleep, as GRPO does), and `sync_weights` / `generate` wake it.

    Weight sync: through vLLM's public `LLM.collective_rpc` with a method NAME, which vLLM runs on each of
    its workers; the method comes from `VLLMWorkerExtension`, which vLLM mixes into its worker class
    (`LLM(worker_extension_cls=...)`, vLLM's documented way to update weights for RLHF: see its
    examples/offline_inference/rlhf_utils.py). No private engine attribute is touched and no Python
    function is serialised (vLLM refuses to unless VLLM_ALLOW_INSECURE_SERIALIZATION is set).

    Sampler log-probs: `SamplingParams(logprobs=True)` requests vLLM's log-prob of each sampled token
    (vLLM `logprobs=0`), taken after temperature and top-p (`logprobs_mode="processed_logprobs"`), i.e. of
    the distribution the token was drawn from, for truncated importance sampling in GRPO.
    """

    def __init__(self, model_path: str, tokenizer, seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, dtype: str = "auto",
                 enforce_eager: bool = False, enable_prefix_caching: bool = True, colocate: bool = False,
                 sleep_mode: bool = False, sleep_level: int | None = None):
        import vllm  # imported here: vLLM is optional and needs a GPU

        if sleep_level not in (None, 1, 2):
            raise ValueError(f"sleep_level must be 1, 2 or null, got {sleep_level}")
        self.vllm = vllm
        self.tokenizer = tokenizer
        self.seed = seed
        self.calls = 0
        self.colocate, self.sleep_mode, self.sleep_level = colocate, sleep_mode, sleep_level
        self.asleep = 0  # the level the engine sleeps at; 0: awake
        kw = dict(model=model_path, tokenizer=model_path, tensor_parallel_size=tensor_parallel_size,
                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, dtype=dtype,
                  seed=seed, enforce_eager=enforce_eager, enable_prefix_caching=enable_prefix_caching,
                  logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION)
        if sleep_mode:
            kw["enable_sleep_mode"] = True
        # colocated: the engine's worker runs in this process (the external launcher; vLLM then turns off
        # its V1 multiprocessing), on one rank as on many, as TRL's colocate mode runs it
        self.in_process = colocate
        self.tp_group = None  # the ranks that share this rank's engine (colocated, tensor_parallel_size > 1)
        if colocate:
            if tensor_parallel_size > 1:
                self.tp_group = _tensor_parallel_group(tensor_parallel_size)
            # one engine per rank (or per group of T ranks), on cuda:LOCAL_RANK; it joins the process group
            # DeepSpeed initialised, or (one plain process) makes a group of one from torchrun's variables
            _set_launcher_env()
            kw["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(**kw)

    @property
    def collective(self) -> bool:
        """Whether `generate` is a collective of this rank's tensor-parallel group (see the class docstring)."""
        return self.tp_group is not None

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]

    # -- GPU memory while training (sleep mode) ---------------------------------------------------------
    def sleep(self, weights_reloaded: bool = False) -> None:
        """Free the engine's GPU memory for training (sleep mode only; otherwise nothing). The level is
        `sleep_level`, or when that is unset: 2 if the caller reloads the weights (`sync_weights`) before
        the next generation (`weights_reloaded`, GRPO), else 1. vLLM's LLM.sleep docstring: level 1 backs
        the weights up in CPU memory, "good for ... running the same model again"; level 2 discards them,
        "good for ... updating the model": copying weights to the host and back that the sync then
        overwrites would only cost time and host memory."""
        if self.sleep_mode and not self.asleep:
            level = self.sleep_level or (2 if weights_reloaded else 1)
            self.llm.sleep(level=level)
            self.asleep = level

    def wake(self) -> None:
        if self.asleep == 2:
            # level 2 discarded the weights: waking them without loading new ones samples from garbage
            raise RuntimeError("the vLLM engine slept at level 2 (weights discarded): sync_weights must wake it")
        if self.asleep:
            _empty_cuda_cache()
            self.llm.wake_up()
            self.asleep = 0

    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[int] | None = None) -> Completions:
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        self.wake()
        enc = self.tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        mine = slice(0, len(enc))
        if self.tp_group is not None:  # the engine's requests are its whole group's, in rank order
            enc, seeds, mine = _gather_in_group(self.tp_group, enc, seeds)
            if not enc:
                return None

        def sp(seed):
            kw = dict(n=params.n, temperature=params.temperature, top_p=params.top_p,
                      max_tokens=params.max_new_tokens, seed=seed)
            if params.logprobs:
                kw["logprobs"] = 0  # the sampled token's log-prob only
            return self.vllm.SamplingParams(**kw)

        if seeds is None:
            # a fresh seed per call (from the run's seed and a call counter, which checkpoints keep), so a
            # resumed run draws what an uninterrupted one would
            self.calls += 1
            sampling = sp(self.seed * 1_000_003 + self.calls)
        else:
            sampling = [sp(int(s)) for s in seeds]  # one request per prompt, each with its group's seed
        requests = [{"prompt_token_ids": ids} for ids in enc]
        results = self.llm.generate(requests, sampling, use_tqdm=False)[mine]
        if not results:  # this rank had no prompts of its own (it took part in its group's sampling)
            return None
        outputs = [[self._tokens(o, params.logprobs) for o in r.outputs] for r in results]
        return completions_from_token_lists(enc[mine], outputs, self.tokenizer)

    def _tokens(self, o, logprobs: bool = False) -> tuple:
        """(completion token ids ending with the stop token when the output stopped, truncated[, log-probs]).
        The stop token must be in the completion, as in the transformers backend: GRPO's loss on it is
        what teaches the policy to stop. vLLM keeps an EOS token in `token_ids`; it is added if absent
        (its sampler log-prob is then unknown: None). With `logprobs`, o.logprobs holds one
        {token id: Logprob} per generated token, the sampled token among them."""
        toks = list(o.token_ids)
        lps = None
        if logprobs:
            if o.logprobs is None or len(o.logprobs) != len(toks):
                raise ValueError("vLLM returned no log-prob per sampled token although logprobs=0 was requested")
            lps = [float(pos[t].logprob) for pos, t in zip(o.logprobs, toks)]
        if o.finish_reason == "stop" and (not toks or toks[-1] != self.tokenizer.eos_token_id) and \
                getattr(o, "stop_reason", None) is None:
            toks.append(self.tokenizer.eos_token_id)
            if lps is not None:
                lps.append(None)
        cut = o.finish_reason == "length"
        return (toks, cut) if lps is None else (toks, cut, lps)

    def sync_weights(self, model) -> None:
        """Load the training model's current weights into the vLLM engine's model, then drop the prefix
        cache (keys and values of the old weights). Wakes a sleeping engine: weights first, loaded, then
        its KV cache, so the two are never both resident beside the training state (vLLM's order after a
        level-2 sleep, vllm-project/vllm#29341: wake_up(["weights"]), load, wake_up(["kv_cache"]))."""
        if self.asleep:
            _empty_cuda_cache()
            self.llm.wake_up(tags=["weights"])
        # the policy's weights a parameter at a time, gathered from the ranks if it is sharded (FSDP2)
        state = full_parameters(model)
        if self.in_process:
            # the worker is in this process: collective_rpc calls its method directly, and the tensors
            # (the policy's own, on its GPU) are passed by reference; vLLM's load_weights takes them
            # from the iterator one at a time
            self.llm.collective_rpc(LOAD_WEIGHTS, args=(state,))
        else:
            # workers in other processes: collective_rpc carries control messages (its docstring: "only
            # pass control messages, and set up data-plane communication to pass data"); the weights go
            # through a safetensors file that each worker reads (copies: a file holds no shared tensors)
            import os
            import tempfile

            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="r1flow-vllm-weights-") as tmp:
                path = os.path.join(tmp, "model.safetensors")
                save_file({n: p.to("cpu", copy=True).contiguous() for n, p in state}, path)
                self.llm.collective_rpc(LOAD_WEIGHTS_FILE, args=(path,))
        if self.asleep:
            _empty_cuda_cache()
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = 0
        self.llm.reset_prefix_cache()


class VLLMWorkerExtension:
    """Methods vLLM mixes into each of its workers (LLM(worker_extension_cls=WORKER_EXTENSION), by qualified
    name), for LLM.collective_rpc to call by name: vLLM's documented route for RLHF weight updates
    (examples/offline_inference/rlhf_utils.py, whose ColocateWorkerExtension loads and then runs
    process_weights_after_loading). Names are prefixed: vLLM refuses an extension attribute that its
    worker class already has (v1/worker/worker_base.py)."""

    def r1flow_load_weights(self, weights) -> None:
        """(name, tensor) pairs in the transformers model's names; vLLM's load_weights maps them onto its
        own (fused q/k/v, gate/up) layers, on this worker's share under tensor parallelism."""
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        model = self.model_runner.model
        model.load_weights(weights=weights)
        # what a layer derives from its weights after a load (vLLM's rlhf example runs it after each update)
        process_weights_after_loading(model, self.model_config, self.device)

    def r1flow_load_weights_file(self, path: str) -> None:
        from safetensors.torch import load_file

        self.r1flow_load_weights(list(load_file(path).items()))


WORKER_EXTENSION = f"{__name__}.{VLLMWorkerExtension.__qualname__}"
# the extension's methods, as collective_rpc names them (kept off the class: vLLM mixes all its attributes in)
LOAD_WEIGHTS, LOAD_WEIGHTS_FILE = "r1flow_load_weights", "r1flow_load_weights_file"


def _empty_cuda_cache() -> None:
    """Hand PyTorch's cached free GPU blocks back before vLLM wakes: vLLM's sleep-mode allocator (CuMem)
    maps its memory outside PyTorch's cache, so memory the trainer freed but PyTorch still caches is not
    free for it. TRL calls torch.cuda.empty_cache() before each wake_up for this reason. A no-op while CUDA
    is not initialised."""
    torch.cuda.empty_cache()


def _tensor_parallel_group(size: int):
    """This rank's group of `size` consecutive ranks, one vLLM engine (vLLM's external launcher puts
    tensor-parallel ranks next to each other, as torchrun numbers the GPUs of a node). Collective: every
    rank makes every group (torch.distributed.new_subgroups_by_enumeration), as TRL does."""
    key = "generation.vllm.tensor_parallel_size"
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"colocated vLLM with {key} {size} shares one engine among {size} training ranks: run it "
                         "under torchrun with training.deepspeed enabled (nproc_per_node a multiple of it)")
    world = torch.distributed.get_world_size()
    if world % size:
        raise ValueError(f"colocated vLLM: {key} {size} does not divide the {world} training ranks")
    group, _ = torch.distributed.new_subgroups_by_enumeration(
        [list(range(i, i + size)) for i in range(0, world, size)])
    return group


def _gather_in_group(group, enc: list, seeds: list | None) -> tuple[list, list | None, slice]:
    """(the group's prompts' token ids, their seeds, this rank's rows among them), every rank's in rank
    order: what each rank of one tensor-parallel engine hands vLLM (the same requests on all)."""
    parts = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(parts, (enc, seeds), group=group)
    me = torch.distributed.get_rank(group)
    start = sum(len(e) for e, _ in parts[:me])
    all_seeds = None if seeds is None else [s for _, ss in parts for s in ss]
    return [ids for e, _ in parts for ids in e], all_seeds, slice(start, start + len(enc))


def _set_launcher_env() -> None:
    """The variables torchrun sets, for vLLM's external launcher in a process torchrun did not start (one
    rank): rank 0 of 1 on the current GPU (the policy's, which r1flow.models.resolve_device made current), a
    rendezvous on this host. Under torchrun they are there and left as they are. TRL's colocate mode sets
    the same before creating its engine."""
    import os
    import socket

    if "WORLD_SIZE" in os.environ:
        return
    gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0
    os.environ.update(RANK="0", LOCAL_RANK=str(gpu), WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:  # a free port, so that concurrent one-rank jobs on a node do not collide
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


BACKENDS = ("transformers", "vllm")


def make_generator(model, tokenizer, settings: dict | None = None, *, model_path: str | None = None,
                   batch_size: int = 256, seed: int = 0, fast: bool = True, progress: bool = False,
                   own_copy: bool = False):
    """The configured backend (`generation.backend` in the config): "transformers" runs `model` in this
    process (with `own_copy`, a copy of it that sync_weights updates: the trained model is sharded);
    "vllm" loads `model_path` into a vLLM engine (options from `generation.vllm`)."""
    settings = settings or {}
    backend = settings.get("backend", "transformers")
    if backend not in BACKENDS:
        raise ValueError(f"generation.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "transformers":
        cls = SyncedGenerator if own_copy else Generator
        return cls(model, tokenizer, batch_size=batch_size, seed=seed, fast=fast, progress=progress)
    if model_path is None:
        raise ValueError("the vllm backend needs the model's path or hub id")
    return VLLMGenerator(model_path, tokenizer, seed=seed, **settings.get("vllm", {}))
