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

    class LLM:
        def __init__(self, **kw):
            calls["init"] = kw
            self.loaded = None
            runner = NS(model=NS(load_weights=lambda w: calls.__setitem__("loaded", list(w))))
            self.llm_engine = NS(model_executor=NS(driver_worker=NS(model_runner=runner)))

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
    assert [n for n, _ in calls["loaded"]] == list(model.state_dict())
    assert calls["reset"] == 1  # the prefix cache is dropped with the old weights
