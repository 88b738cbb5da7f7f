"""Model-based rewards for general data (section 2.3.4): `helpfulness` and `harmlessness`.

Each scores a completion with a Bradley-Terry reward model trained by r1flow.training.reward_model,
given the user's request: helpfulness reads only the final summary of a readable response
("For helpfulness, we focus exclusively on the final summary"), harmlessness the entire response
("including both the reasoning process and the summary").

Options (from the config's `rewards` section): `path`, the reward model folder (required);
`batch_size` (default 16); `max_length` (default: the model's position limit); `marker`, the readable
pattern's marker; `device`, where the reward model runs, and `dtype`, what it is loaded in (scripts/grpo.py
sets the job's resolved device and base_model.dtype).

torch, transformers and pandas (r1flow.models.reward_model, r1flow.data.preferences) are imported on
first use: the reward package is also imported by the verifier worker processes, which must start fast.

Reward.score is the raw reward model output, an unbounded float with an arbitrary offset: GRPO
normalises rewards within each group (eq. 3), so only differences between a prompt's outputs matter.
Mixed with rule-based 0/1 rewards, its weight sets the scale.

These rewards need the prompts: they carry `needs_prompts = True`, and `score_batch` passes its
`prompts` (one user request per completion) to them and to no other reward.
"""

from __future__ import annotations

import functools
import os

from r1flow.data.formats import READABLE_MARKER, split_readable
from r1flow.rewards import Reward, register


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str = "cpu", dtype: str = "float32"):
    """The reward model of a folder, loaded once per process (a GRPO run scores thousands of batches)."""
    from r1flow.models.reward_model import load_reward_model

    model, tok = load_reward_model(path, dtype=dtype, device=device)
    model.eval()
    return model, tok


def load_cached(path: str | os.PathLike, device: str = "cpu", dtype: str = "float32"):
    return _load(os.path.abspath(os.fspath(path)), str(device), str(dtype))


def _score(aspect: str, completions, golds, prompts=None, path: str | None = None, batch_size: int = 16,
           max_length: int | None = None, marker: str = READABLE_MARKER, device: str = "cpu",
           dtype: str = "float32") -> list[Reward]:
    import torch

    from r1flow.data.preferences import prompt_text
    from r1flow.models.reward_model import render_for_rm, rm_response, score_texts

    if path is None:
        raise ValueError(f"reward '{aspect}' needs the option 'path' (the reward model folder)")
    if prompts is None or len(prompts) != len(completions):
        raise ValueError(f"reward '{aspect}' needs one prompt per completion, got "
                         f"{None if prompts is None else len(prompts)} for {len(completions)}")
    model, tok = load_cached(path, device, dtype)
    texts = [render_for_rm(prompt_text(p), rm_response(c, aspect, marker), tok) for p, c in zip(prompts, completions)]
    with torch.no_grad():
        scores = score_texts(model, tok, texts, batch_size, max_length).tolist()
    if aspect == "helpfulness":
        reasons = ["summary" if split_readable(c, marker) is not None else "whole_response" for c in completions]
    else:
        reasons = ["whole_response"] * len(completions)
    return [Reward(float(s), r) for s, r in zip(scores, reasons)]


@register("helpfulness")
def helpfulness(completions, golds, prompts=None, **options) -> list[Reward]:
    """Helpfulness reward model on the prompt and the final summary only (section 2.3.4)."""
    return _score("helpfulness", completions, golds, prompts, **options)


@register("harmlessness")
def harmlessness(completions, golds, prompts=None, **options) -> list[Reward]:
    """Harmlessness reward model on the prompt and the whole response, reasoning included (section 2.3.4)."""
    return _score("harmlessness", completions, golds, prompts, **options)


helpfulness.needs_prompts = True
harmlessness.needs_prompts = True
