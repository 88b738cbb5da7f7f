"""Backend choice, and the vLLM backend's pieces that run without vLLM; the vLLM test itself skips
without vllm and a GPU (it has never run: see README)."""

import importlib.util

import pytest
import torch

from r1flow.generation import Generator, SamplingParams, completions_from_token_lists, make_generator


def test_backend_choice(tiny_policy):
    from r1flow.models import load_policy

    model, tok = load_policy(str(tiny_policy[0]))
    assert isinstance(make_generator(model, tok, {"backend": "transformers"}), Generator)
    assert isinstance(make_generator(model, tok, None), Generator)
    with pytest.raises(ValueError, match="generation.backend must be one of"):
        make_generator(model, tok, {"backend": "sglang"})
    with pytest.raises(ValueError, match="needs the model's path"):
        make_generator(model, tok, {"backend": "vllm"})


def test_completions_from_token_lists_match_the_transformers_layout(tiny_policy):
    """Token lists (as vLLM returns them) become the same tensors the transformers backend produces."""
    from r1flow.models import load_policy

    model, tok = load_policy(str(tiny_policy[0]))
    prompts = ["Compute 1+2", "Compute (3+4)*2"]
    params = SamplingParams(n=3, temperature=1.0, top_p=1.0, max_new_tokens=8)
    ref = Generator(model, tok, batch_size=64, seed=0).generate(prompts, params)
    enc = tok(prompts, add_special_tokens=False)["input_ids"]
    outs = [[(ref.completion_ids[i * 3 + j][ref.completion_mask[i * 3 + j] == 1].tolist(),
              bool(ref.truncated[i * 3 + j])) for j in range(3)] for i in range(2)]
    got = completions_from_token_lists(enc, outs, tok)
    assert got.texts == ref.texts and torch.equal(got.truncated, ref.truncated)
    assert torch.equal(got.prompt_ids, ref.prompt_ids) and torch.equal(got.prompt_mask, ref.prompt_mask)
    w = got.completion_ids.shape[1]
    assert torch.equal(got.completion_mask, ref.completion_mask[:, :w])
    assert torch.equal(got.completion_ids, ref.completion_ids[:, :w])


def test_progress_is_logged_per_decoding_batch(tiny_policy, caplog):
    """A long sampling job (evaluation, rejection sampling) says in its log how far it is and how fast."""
    import logging

    from r1flow.models import load_policy

    model, tok = load_policy(str(tiny_policy[0]))
    prompts = ["Compute 1+2", "Compute (3+4)*2", "Compute 5*5"]
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6)
    with caplog.at_level(logging.INFO, logger="r1flow.generation"):
        out = Generator(model, tok, batch_size=4, seed=0, progress=True).generate(prompts, params)  # 2 prompts a batch
    lines = [r.getMessage() for r in caplog.records if r.name == "r1flow.generation"]
    assert len(lines) == 2
    assert lines[0].startswith("generated 4/6 sequences, ") and lines[1].startswith("generated 6/6 sequences, ")
    assert f"{int(out.completion_mask.sum())} new tokens" in lines[1] and lines[1].endswith("about 0 s left")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="r1flow.generation"):
        Generator(model, tok, batch_size=4, seed=0).generate(prompts, params)  # GRPO's sampler: no lines
    assert not [r for r in caplog.records if r.name == "r1flow.generation"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="needs vllm and a CUDA GPU (the vLLM backend is unexercised without them)")
def test_vllm_backend_samples_and_syncs_weights(tiny_policy):  # pragma: no cover - no GPU here
    from r1flow.generation import VLLMGenerator
    from r1flow.models import load_policy

    model, tok = load_policy(str(tiny_policy[0]))
    gen = VLLMGenerator(str(tiny_policy[0]), tok, seed=0, gpu_memory_utilization=0.2, enforce_eager=True)
    out = gen.generate(["Compute 1+2"], SamplingParams(n=4, temperature=0.0, top_p=1.0, max_new_tokens=8))
    greedy = Generator(model, tok).generate(["Compute 1+2"], SamplingParams(1, 0.0, 1.0, 8))
    assert len(out.texts) == 4 and out.texts[0] == greedy.texts[0]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    gen.sync_weights(model)
    moved = Generator(model, tok).generate(["Compute 1+2"], SamplingParams(1, 0.0, 1.0, 8))
    assert gen.generate(["Compute 1+2"], SamplingParams(1, 0.0, 1.0, 8)).texts[0] == moved.texts[0]


def test_vllm_glue_against_a_stand_in_engine(tiny_policy, monkeypatch):
    """VLLMGenerator's own code (requests, sampling parameters, output conversion, weight sync) against
    a stand-in `vllm` module that records calls. vLLM itself is not involved: this only checks our side
    of the documented API."""
    import sys
    import types
    from types import SimpleNamespace as NS

    from r1flow.generation import VLLMGenerator
    from r1flow.models import load_policy

    model, tok = load_policy(str(tiny_policy[0]))
    calls = {}
    record = _stand_in_worker_api(monkeypatch, lambda e: calls.setdefault(e[0], []).append(e))

    class LLM(_StandInEngine):
        def __init__(self, **kw):
            calls["init"] = kw
            self.start_worker(kw, record)

        def generate(self, requests, sp, use_tqdm=True):
            calls.setdefault("generate", []).append((requests, sp))
            eos = tok.eos_token_id
            return [NS(outputs=[NS(token_ids=[5, 6, eos], finish_reason="stop", stop_reason=None),
                                NS(token_ids=[7, 8], finish_reason="stop", stop_reason=None),  # EOS not kept
                                NS(token_ids=[9, 9, 9], finish_reason="length", stop_reason=None)])
                    for _ in requests]

        def reset_prefix_cache(self):
            calls["reset"] = calls.get("reset", 0) + 1

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)

    gen = VLLMGenerator("some/model", tok, seed=3, tensor_parallel_size=2, gpu_memory_utilization=0.4)
    assert calls["init"]["tensor_parallel_size"] == 2 and calls["init"]["gpu_memory_utilization"] == 0.4
    out = gen.generate(["Compute 1+2", "Compute 2+2"], SamplingParams(n=3, temperature=1.0, top_p=0.9,
                                                                      max_new_tokens=3))
    requests, sp = calls["generate"][0]
    assert requests[0]["prompt_token_ids"] == tok("Compute 1+2", add_special_tokens=False)["input_ids"]
    assert (sp["n"], sp["top_p"], sp["max_tokens"]) == (3, 0.9, 3) and sp["seed"] == 3 * 1_000_003 + 1
    assert out.completion_ids.shape == (6, 3) and out.truncated.tolist() == [False, False, True] * 2
    assert out.completion_ids[1].tolist() == [7, 8, tok.eos_token_id]  # the stop token is in the completion
    assert out.completion_mask.sum(1).tolist() == [3, 3, 3] * 2
    gen.generate(["x"], SamplingParams(n=1))
    assert calls["generate"][1][1]["seed"] != sp["seed"]  # a fresh seed per call
    gen.sync_weights(model)
    # not colocated (the workers are other processes): collective_rpc carries the file's path, not tensors
    assert [e[1] for e in calls["collective_rpc"]] == ["r1flow_load_weights_file"]
    (_, names, weights), = calls["load_weights"]
    assert sorted(names) == sorted(model.state_dict())  # a safetensors file keeps its names sorted
    assert all(torch.equal(w, model.state_dict()[n]) for n, w in weights)  # the values, through the file
    assert len(calls["process_weights_after_loading"]) == 1
    assert calls["reset"] == 1  # the prefix cache is dropped with the old weights


class _StandInEngine:
    """What vLLM's LLM offers for weight updates, for the stand-in modules: `collective_rpc(name, args=...)`
    runs the named method on a worker into which the class named by LLM(worker_extension_cls=...) is mixed,
    as vLLM's WorkerWrapperBase does (v1/worker/worker_base.py); a callable is refused (vLLM does not
    serialise functions by default). vLLM's private engine internals raise: the code under test may use the
    public API only."""

    def start_worker(self, kw, record):
        import importlib
        from types import SimpleNamespace as NS

        module, name = kw["worker_extension_cls"].rsplit(".", 1)
        extension = getattr(importlib.import_module(module), name)

        class Model:
            def load_weights(self, weights):
                weights = list(weights)
                record(("load_weights", [n for n, _ in weights], weights))

        class Worker(extension):
            def __init__(self):
                self.model_runner, self.model_config, self.device = NS(model=Model()), "model-config", "cuda:0"

        self._worker, self._record = Worker(), record

    @property
    def llm_engine(self):
        raise AssertionError("vLLM's private engine internals were touched (LLM.llm_engine)")

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if not isinstance(method, str):
            raise TypeError("vLLM does not serialise a function unless VLLM_ALLOW_INSECURE_SERIALIZATION=1")
        self._record(("collective_rpc", method))
        return [getattr(self._worker, method)(*args, **(kwargs or {}))]


LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _stand_in_worker_api(monkeypatch, record):
    """vLLM's process_weights_after_loading (vllm.model_executor.model_loader.utils) and
    torch.cuda.empty_cache, recording their calls; the launcher's environment variables unset, and put
    back as they were after the test (the colocated engine sets them in a process torchrun did not start)."""
    import sys
    import types

    names = ("vllm.model_executor", "vllm.model_executor.model_loader", "vllm.model_executor.model_loader.utils")
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].process_weights_after_loading = (
        lambda model, model_config, device: record(("process_weights_after_loading", model_config, device)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: record(("empty_cache",)))
    for var in LAUNCHER_ENV:
        monkeypatch.setenv(var, "unset")  # recorded, so that the teardown restores the variable's absence too
        monkeypatch.delenv(var)
    return record


# -- a stand-in vllm module that records what the code asks of it --------------------------------------
def _stand_in_vllm(monkeypatch, tok, events, logprob_of=None):
    """A `vllm` module whose LLM records every call in `events` (in order). Each request returns three
    outputs per sample request of n = 3 (or n outputs of [5, 6, EOS]); with logprobs requested, each token
    carries `logprob_of(token)`."""
    import sys
    import types
    from types import SimpleNamespace as NS

    record = _stand_in_worker_api(monkeypatch, events.append)

    class LLM(_StandInEngine):
        def __init__(self, **kw):
            events.append(("init", kw))
            self.start_worker(kw, record)

        def generate(self, requests, sp, use_tqdm=True):
            events.append(("generate", requests, sp))
            sps = sp if isinstance(sp, list) else [sp] * len(requests)
            eos, res = tok.eos_token_id, []
            for s in sps:
                outs = []
                for j in range(s["n"]):
                    toks = [5 + j, 6, eos] if j % 2 == 0 else [7, 8]  # odd outputs: EOS not kept
                    lps = None
                    if s.get("logprobs") is not None:
                        lps = [{t: NS(logprob=logprob_of(t), rank=1)} for t in toks]
                    outs.append(NS(token_ids=toks, finish_reason="stop", stop_reason=None, logprobs=lps))
                res.append(NS(outputs=outs))
            return res

        def reset_prefix_cache(self):
            events.append(("reset_prefix_cache",))

        def sleep(self, level=1):
            events.append(("sleep", level))

        def wake_up(self, tags=None):
            events.append(("wake_up", tags))

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)


def _names(events):
    return [e[0] for e in events]


def test_vllm_sampler_logprobs_and_per_prompt_seeds(tiny_policy, monkeypatch):
    """logprobs=0 is requested when asked (and only then); the sampled tokens' log-probs come back as
    Completions.sampler_logprobs: NaN for a stop token vLLM did not return, 0 on padding. Seeds: one
    seeded request per prompt."""
    from r1flow.generation import VLLMGenerator
    from r1flow.models import load_policy

    _, tok = load_policy(str(tiny_policy[0]))
    events = []
    _stand_in_vllm(monkeypatch, tok, events, logprob_of=lambda t: -0.01 * t)
    gen = VLLMGenerator("some/model", tok, seed=0)
    init = events[0][1]
    assert init["enable_prefix_caching"] is True and init["logprobs_mode"] == "processed_logprobs"
    assert "enable_sleep_mode" not in init and "distributed_executor_backend" not in init

    out = gen.generate(["a", "b"], SamplingParams(n=2, max_new_tokens=3))
    assert "logprobs" not in events[-1][2] and out.sampler_logprobs is None

    out = gen.generate(["a", "b"], SamplingParams(n=2, max_new_tokens=3, logprobs=True), seeds=[11, 12])
    sps = events[-1][2]
    assert [s["seed"] for s in sps] == [11, 12] and all(s["logprobs"] == 0 and s["n"] == 2 for s in sps)
    eos = tok.eos_token_id
    lp = out.sampler_logprobs
    assert lp.shape == out.completion_ids.shape == (4, 3)
    assert lp[0].tolist() == pytest.approx([-0.05, -0.06, -0.01 * eos])
    assert lp[1, :2].tolist() == pytest.approx([-0.07, -0.08]) and torch.isnan(lp[1, 2])  # appended EOS
    assert out.completion_ids[1].tolist() == [7, 8, eos]
    with pytest.raises(ValueError, match="seeds for"):
        gen.generate(["a"], SamplingParams(n=1), seeds=[1, 2])


def _vllm_trainer(tiny_policy, tmp_path, vllm_settings, cfg_extra=None, engine=None, monkeypatch=None):
    import pandas as pd

    from r1flow.models import load_policy
    from r1flow.training.grpo import GRPOConfig, GRPOTrainer

    if engine is not None:
        monkeypatch.setattr("r1flow.training.grpo.make_engine", lambda *a, **k: engine)
    model, tok = load_policy(str(tiny_policy[0]))
    train = pd.DataFrame({"question": [f"Compute {a}+{b}" for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]],
                          "answer": ["3", "7", "4", "6"]})
    cfg = GRPOConfig(**{"prompts_per_step": 2, "num_generations": 2, "max_completion_length": 3, "steps": 2,
                        "eval_every": 0, "beta": 0.0, "warmup_steps": 0, "learning_rate": 1e-3,
                        "rewards": {"format": 1.0}, **(cfg_extra or {})})
    return GRPOTrainer(model, None, tok, cfg, train, None, tmp_path / "state",
                       generation={"backend": "vllm", "vllm": vllm_settings}, model_path=str(tiny_policy[0]))


def test_colocated_vllm_sleeps_while_training_and_resets_its_prefix_cache(tiny_policy, tmp_path, monkeypatch):
    """Each step: generate (awake), sleep through the update at level 2 (the sync reloads every weight),
    then empty PyTorch's cache and wake the weights, load the new ones by collective_rpc on the worker
    extension, empty the cache and wake the KV cache, and drop the prefix cache; the next step samples
    from the synced engine. One plain process runs the engine in-process too (vLLM's external launcher,
    with torchrun's variables set for a group of one), and the worker gets the policy's own tensors."""
    import os

    from r1flow.models import load_policy

    _, tok = load_policy(str(tiny_policy[0]))
    events = []
    _stand_in_vllm(monkeypatch, tok, events)
    tr = _vllm_trainer(tiny_policy, tmp_path, {"colocate": True, "sleep_mode": True, "gpu_memory_utilization": 0.3})
    init = events[0][1]
    assert init["enable_sleep_mode"] is True and init["gpu_memory_utilization"] == 0.3
    assert init["distributed_executor_backend"] == "external_launcher"
    assert init["worker_extension_cls"] == "r1flow.generation.VLLMWorkerExtension"
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    tr.step()
    tr.step()
    per_step = ["generate", "sleep", "empty_cache", "wake_up", "collective_rpc", "load_weights",
                "process_weights_after_loading", "empty_cache", "wake_up", "reset_prefix_cache"]
    assert _names(events[1:]) == per_step * 2
    assert [e[1] for e in events[1:] if e[0] in ("sleep", "wake_up")] == [2, ["weights"], ["kv_cache"]] * 2
    rpc, (_, names, weights) = events[5], events[6]
    assert rpc == ("collective_rpc", "r1flow_load_weights") and names == list(tr.model.state_dict())
    state = tr.model.state_dict()
    assert all(w.data_ptr() == state[n].data_ptr() for n, w in weights)  # by reference, no copy
    assert events[7] == ("process_weights_after_loading", "model-config", "cuda:0")

    # without sleep mode: no sleep / wake (and no cache emptying), but still a prefix-cache reset after every sync
    events.clear()
    tr = _vllm_trainer(tiny_policy, tmp_path / "b", {"colocate": True})
    tr.step()
    assert _names(events[1:]) == ["generate", "collective_rpc", "load_weights", "process_weights_after_loading",
                                  "reset_prefix_cache"]


def test_vllm_sleep_levels_and_the_cache_emptied_before_every_wake(tiny_policy, monkeypatch):
    """Level 1 unless the caller reloads the weights before the next generation (then 2); a configured
    sleep_level wins. torch.cuda.empty_cache() comes right before every wake_up. An engine that slept at
    level 2 (weights discarded) refuses to generate before a weight sync."""
    from r1flow.generation import VLLMGenerator
    from r1flow.models import load_policy

    model, tok = load_policy(str(tiny_policy[0]))
    events = []
    _stand_in_vllm(monkeypatch, tok, events)
    params = SamplingParams(n=1, max_new_tokens=3)

    gen = VLLMGenerator("m", tok, sleep_mode=True)
    gen.sleep()  # nothing reloads the weights: level 1 keeps them
    gen.generate(["a"], params)
    gen.sleep(weights_reloaded=True)
    with pytest.raises(RuntimeError, match="level 2"):
        gen.generate(["a"], params)
    gen.sync_weights(model)
    gen.generate(["a"], params)
    got = [e[:2] for e in events[1:] if e[0] in ("sleep", "wake_up", "empty_cache", "generate")]
    assert [(e[0], e[1] if e[0] in ("sleep", "wake_up") else None) for e in got] == [
        ("sleep", 1), ("empty_cache", None), ("wake_up", None), ("generate", None),
        ("sleep", 2), ("empty_cache", None), ("wake_up", ["weights"]), ("empty_cache", None),
        ("wake_up", ["kv_cache"]), ("generate", None)]

    events.clear()
    gen = VLLMGenerator("m", tok, sleep_mode=True, sleep_level=1)
    gen.sleep(weights_reloaded=True)  # the configured level, whatever the caller
    assert events[-1] == ("sleep", 1)
    gen = VLLMGenerator("m", tok, sleep_mode=False)
    gen.sleep(weights_reloaded=True)  # no sleep mode: nothing
    assert events[-1][0] == "init"
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMGenerator("m", tok, sleep_level=3)
    with pytest.raises(ValueError, match="run it under torchrun"):  # one rank cannot share an engine of 2
        VLLMGenerator("m", tok, colocate=True, tensor_parallel_size=2)


def test_trainer_takes_colocated_vllm_on_several_ranks(tiny_policy, tmp_path, monkeypatch):
    """World size 2 (a stand-in engine reports it): colocated vLLM is accepted, each rank's engine uses
    vLLM's external launcher (torchrun's ranks); without colocate it is refused. Each rank samples only
    its own groups, with the groups' seeds."""
    from r1flow.models import load_policy
    from r1flow.training.engine import LocalEngine

    _, tok = load_policy(str(tiny_policy[0]))
    events = []
    _stand_in_vllm(monkeypatch, tok, events)
    monkeypatch.setenv("WORLD_SIZE", "2")

    class TwoRanks(LocalEngine):  # rank 1 of 2; collectives stand in for an identical rank 0
        rank, world_size, loss_scale = 1, 2, 2.0

        def __init__(self):
            self.master = None  # float32 weights: no separate master copy (r1flow.training.engine)

        def all_sum(self, values):
            return [2 * v for v in values]

        def all_gather(self, rows):
            return torch.cat([rows, rows])

    with pytest.raises(ValueError, match="colocate"):
        _vllm_trainer(tiny_policy, tmp_path / "a", {}, engine=TwoRanks(), monkeypatch=monkeypatch)
    engine = TwoRanks()
    tr = _vllm_trainer(tiny_policy, tmp_path / "b", {"colocate": True}, cfg_extra={"prompts_per_step": 4},
                       engine=engine, monkeypatch=monkeypatch)
    opt = tr.opt
    engine.model, engine.optimizer, engine.max_grad_norm = tr.model, opt, 1.0
    assert events[0][1]["distributed_executor_backend"] == "external_launcher"
    # one engine over 2 ranks needs their process group (torchrun), which these stand-in ranks have not
    with pytest.raises(ValueError, match="tensor_parallel_size 2 shares one engine among 2 training ranks"):
        _vllm_trainer(tiny_policy, tmp_path / "c", {"colocate": True, "tensor_parallel_size": 2}, engine=TwoRanks(),
                      monkeypatch=monkeypatch)
    events.clear()
    tr.step()
    requests, sps = events[0][1], events[0][2]
    batch = tr._batch(1)
    want = [tok(tr._prompt(q), add_special_tokens=False)["input_ids"] for q in batch["question"].iloc[2:]]
    assert [r["prompt_token_ids"] for r in requests] == want  # rank 1 of 2: the last two of four groups
    assert [s["seed"] for s in sps] == [tr._group_seed(1, 2), tr._group_seed(1, 3)]


def test_gpu_memory_per_phase_in_the_metrics(tiny_policy, tmp_path, monkeypatch):
    """On CUDA each step logs the peak allocated and reserved GPU memory of sampling, training and the
    update (the largest over the mu passes), from PyTorch's peak counters reset at each phase's end. Off
    CUDA (the default pipeline) there are no such columns. CUDA's counters are stood in for here."""
    from r1flow.models import load_policy
    from r1flow.training.grpo import GPUPhasePeaks

    _, tok = load_policy(str(tiny_policy[0]))
    _stand_in_vllm(monkeypatch, tok, [])
    tr = _vllm_trainer(tiny_policy, tmp_path, {"colocate": True, "sleep_mode": True}, cfg_extra={"num_iterations": 2})
    assert not [k for k in tr.step() if "gpu" in k]  # the policy is on the CPU

    mb = 2**20
    reads, resets = iter([100, 300, 200, 250, 150]), []  # sampling, training, update, training, update
    peak = {"allocated": 0}

    def max_allocated(device):
        assert device == torch.device("cuda", 0)
        peak["allocated"] = next(reads) * mb
        return peak["allocated"]

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 2 * peak["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    tr.gpu_peaks = GPUPhasePeaks(torch.device("cuda", 0))
    row = tr.step()
    got = {k: v for k, v in row.items() if k.startswith("peak_gpu_")}
    assert got == {"peak_gpu_allocated_sampling_mb": 100.0, "peak_gpu_reserved_sampling_mb": 200.0,
                   "peak_gpu_allocated_training_mb": 300.0, "peak_gpu_reserved_training_mb": 600.0,
                   "peak_gpu_allocated_update_mb": 200.0, "peak_gpu_reserved_update_mb": 400.0}
    assert len(resets) == 6  # before the step, then after each of its five phases
    assert tr.gpu_peaks.take() == {}  # each step starts afresh


def test_truncated_importance_sampling_in_the_trainer(tiny_policy, tmp_path, monkeypatch):
    """With vllm_importance_sampling_cap, log-probs are requested, and the step logs the mean of
    pi_old / pi_sampler over the tokens and the share above the cap, as computed by hand from the
    trainer's own log-probs of the sampled completions and the sampler's."""
    import copy
    import math

    from r1flow.models import load_policy
    from r1flow.models.logprobs import completion_logprobs

    _, tok = load_policy(str(tiny_policy[0]))
    events = []
    _stand_in_vllm(monkeypatch, tok, events, logprob_of=lambda t: -15.0 if t == 6 else -0.5)
    tr = _vllm_trainer(tiny_policy, tmp_path, {}, cfg_extra={"vllm_importance_sampling_cap": 2.0})
    start = copy.deepcopy(tr.model)
    captured = {}
    real = tr.generator.generate

    def keep(*a, **k):
        captured["out"] = real(*a, **k)
        return captured["out"]

    tr.generator.generate = keep
    row = tr.step()
    assert all(s["logprobs"] == 0 for s in events[1][2])
    out = captured["out"]
    with torch.no_grad():
        lp, _ = completion_logprobs(start, out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask, 2)
    ratios, capped = [], 0
    for r in range(out.completion_ids.shape[0]):
        for t in range(int(out.completion_mask[r].sum())):
            s = out.sampler_logprobs[r, t].item()
            if math.isnan(s):
                continue  # the appended stop token: no sampler log-prob, weight 1, not in the metrics
            ratio = math.exp(lp[r, t].item() - s)
            ratios.append(ratio)
            capped += ratio > 2.0
    assert row["is_ratio_mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert row["is_capped_fraction"] == pytest.approx(capped / len(ratios))
    assert 0 < row["is_capped_fraction"] < 1  # the tokens with log-prob -15 under the sampler are capped


def test_cluster_config_runs_colocated_vllm_on_its_8_ranks(tiny_policy, tmp_path, monkeypatch):
    """config/cluster/r1_zero_qwen2.5.yaml: vLLM with 8 ZeRO-2 ranks in colocated mode; its generation and
    GRPO settings are accepted by the trainer on a rank of 8 (a stand-in engine and vllm module)."""
    from pathlib import Path

    import yaml

    from r1flow.models import load_policy
    from r1flow.training.engine import LocalEngine
    from r1flow.training.grpo import GRPOConfig

    from r1flow.config import stage_settings, validate_config

    root = Path(__file__).resolve().parent.parent
    cfg = yaml.safe_load((root / "config" / "cluster" / "r1_zero_qwen2.5.yaml").read_text())
    schema = root / "workflow" / "schemas" / "config.schema.yaml"
    own = stage_settings(validate_config(cfg, schema), "r1_zero", schema)  # the r1_zero job's own settings
    assert own["deepspeed"]["nproc_per_node"] == 8 and own["deepspeed"]["zero_stage"] == 2
    gen = own["generation"]
    assert gen["backend"] == "vllm" and gen["vllm"]["colocate"] is True
    grpo = GRPOConfig.from_dict(cfg["r1_zero"]["grpo"])
    assert grpo.prompts_per_step % 8 == 0 and grpo.vllm_importance_sampling_cap is not None

    _, tok = load_policy(str(tiny_policy[0]))
    events = []
    _stand_in_vllm(monkeypatch, tok, events)
    monkeypatch.setenv("WORLD_SIZE", "8")

    class Rank3Of8(LocalEngine):
        rank, world_size, loss_scale = 3, 8, 8.0

        def __init__(self):
            pass

    import pandas as pd

    from r1flow.training.grpo import GRPOTrainer

    monkeypatch.setattr("r1flow.training.grpo.make_engine", lambda *a, **k: Rank3Of8())
    model, tok = load_policy(str(tiny_policy[0]))
    small = GRPOConfig.from_dict({**cfg["r1_zero"]["grpo"], "rewards": {"format": 1.0}, "micro_batch_size": 0})
    GRPOTrainer(model, None, tok, small, pd.DataFrame({"question": ["q"], "answer": ["1"]}), None, tmp_path,
                generation=gen, model_path=str(tiny_policy[0]))
    init = events[0][1]
    assert init["distributed_executor_backend"] == "external_launcher" and init["enable_sleep_mode"] is True
    assert init["gpu_memory_utilization"] == gen["vllm"]["gpu_memory_utilization"]


def test_process_group_timeout_outlasts_a_long_vllm_generation(monkeypatch):
    """training.deepspeed.timeout_minutes (default 30, not torch.distributed's 10-minute NCCL default, which a
    rank still sampling a 32k-token generation would hit while the others wait in a collective) reaches the
    process group DeepSpeed initialises; zero or less is refused."""
    import datetime
    import sys
    import types

    from r1flow.training.engine import DeepSpeedSettings, init_distributed

    calls = []
    fake = types.ModuleType("deepspeed")
    fake.init_distributed = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 8)
    # rank 0 logs the backend of the group the fake never created
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "nccl")
    assert DeepSpeedSettings.from_dict({}).timeout_minutes == 30
    assert init_distributed(DeepSpeedSettings.from_dict({"timeout_minutes": 90}).timeout_minutes) == (0, 8)
    assert calls == [{"dist_backend": None, "timeout": datetime.timedelta(minutes=90)}]
    with pytest.raises(ValueError, match="timeout_minutes must be positive"):
        DeepSpeedSettings.from_dict({"timeout_minutes": 0})


def test_colocated_vllm_with_tensor_parallel_ranks_samples_its_groups_prompts_and_keeps_its_own(tiny_policy,
                                                                                               monkeypatch):
    """tensor_parallel_size 2, colocated: ranks 0 and 1 are one engine. Rank 1 of the group (rank 0 holding
    two prompts of its own, seeds 11 and 12) hands vLLM all three requests in rank order with their seeds,
    and keeps the rows of its own prompt; with no prompt of its own it still takes part (rank 0's requests
    are sampled) and gets None. The group exchange stands in for torch.distributed's all_gather_object."""
    import sys
    import types
    from types import SimpleNamespace as NS

    import r1flow.generation as G
    from r1flow.models import load_policy

    _, tok = load_policy(str(tiny_policy[0]))
    events = []
    record = _stand_in_worker_api(monkeypatch, events.append)

    class LLM(_StandInEngine):
        def __init__(self, **kw):
            events.append(("init", kw))
            self.start_worker(kw, record)

        def generate(self, requests, sp, use_tqdm=True):  # each completion: the prompt's first token, then EOS
            events.append(("generate", [r["prompt_token_ids"] for r in requests], [s["seed"] for s in sp]))
            return [NS(outputs=[NS(token_ids=[r["prompt_token_ids"][0], tok.eos_token_id], finish_reason="stop",
                                   stop_reason=None) for _ in range(s["n"])]) for r, s in zip(requests, sp)]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's (the launcher's environment is left as it is)
    monkeypatch.setattr(G, "_tensor_parallel_group", lambda size: ("tp group", size))
    others = tok(["Compute 4+4", "Compute 9+1"], add_special_tokens=False)["input_ids"]

    def all_gather_object(parts, obj, group=None):
        assert group == ("tp group", 2)
        parts[0], parts[1] = (others, [11, 12]), obj

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)

    gen = G.VLLMGenerator("some/model", tok, tensor_parallel_size=2, colocate=True)
    init = events[0][1]
    assert init["tensor_parallel_size"] == 2 and init["distributed_executor_backend"] == "external_launcher"
    assert gen.collective
    own = tok("Compute 1+2", add_special_tokens=False)["input_ids"]
    out = gen.generate(["Compute 1+2"], SamplingParams(n=2, max_new_tokens=4), seeds=[7])
    _, requests, seeds = events[-1]
    assert requests == others + [own] and seeds == [11, 12, 7]
    assert out.completion_ids.shape[0] == 2  # its own prompt's G = 2 rows only
    assert out.completion_ids[:, 0].tolist() == [own[0], own[0]]
    assert out.prompt_ids[0, -len(own):].tolist() == own
    assert gen.generate([], SamplingParams(n=2, max_new_tokens=4), seeds=[]) is None
    _, requests, seeds = events[-1]
    assert requests == others and seeds == [11, 12]  # rank 0's prompts, sampled by the whole engine


def test_tensor_parallel_colocated_vllm_is_refused_where_ranks_cannot_share_engines():
    from r1flow.generation import _tensor_parallel_group
    from r1flow.training.grpo import GRPOConfig, check_run

    with pytest.raises(ValueError, match="generation.vllm.tensor_parallel_size 2 shares one engine"):
        _tensor_parallel_group(2)  # no process group: not under torchrun
    gen = {"backend": "vllm", "vllm": {"colocate": True, "tensor_parallel_size": 3}}
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the 16 training ranks"):
        check_run(GRPOConfig(), None, gen, 16)
    gen["vllm"]["tensor_parallel_size"] = 2
    check_run(GRPOConfig(), None, gen, 16)
    with pytest.raises(ValueError, match="grpo.dynamic_sampling"):
        check_run(GRPOConfig(dynamic_sampling=True), None, gen, 16)
