"""The embedded stand-in for DeepSeek-V3-Base: a tiny Llama trained from scratch on a synthetic corpus.

The corpus mixes behaviours a real base model also shows when prompted with Table 1: worked solutions
in the template (some with a planted mistake), a bare answer in tags, and an answer with no tags at
all. Pretrained briefly, the model is a weak but non-zero solver; R1-Zero's RL then has a correct,
well-formatted behaviour to find and reinforce (section 2.2).
"""

from __future__ import annotations

import math
import random
import time

import torch
from tqdm.auto import tqdm

from r1flow.data import tasks as T
from r1flow.data.prompts import render

SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]


def corpus_completion(t: T.Task, rng: random.Random, mix: dict[str, float]) -> str:
    """One pretraining completion for a task, in a behaviour drawn from `mix`."""
    mode = rng.choices(list(mix), list(mix.values()))[0]
    if mode == "worked":
        steps, ans = T.worked_solution(t, rng)
        return f" <think> {steps} </think> <answer> {ans} </answer>"
    if mode == "worked_wrong":
        steps, ans = T.worked_solution(t, rng, wrong=True)
        return f" <think> {steps} </think> <answer> {ans} </answer>"
    if mode == "answer_only":
        return f" <answer> {t.answer} </answer>"
    if mode == "bare":
        return f" {t.answer}"
    raise ValueError(f"unknown corpus mode {mode!r}")


def build_corpus(seed: int, n: int, families: dict, mix: dict[str, float], template: str,
                 exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    """(prompt, completion) pairs; they are tokenized apart, exactly as at sampling time."""
    rng = random.Random(seed)
    names = list(families)
    weights = [families[k].get("weight", 1.0) for k in names]
    docs = []
    while len(docs) < n:
        name = rng.choices(names, weights)[0]
        t = T.FAMILIES[name](rng, rng.choice(families[name]["difficulties"]))
        if t.question in exclude:  # never pretrain on held-out questions
            continue
        docs.append((render(t.question, template), corpus_completion(t, rng, mix)))
    return docs


def train_tokenizer(docs: list[tuple[str, str]], vocab_size: int):
    """A byte-level BPE tokenizer trained with `tokenizers`, wrapped for transformers.

    Digits are split one per token (so arithmetic is learnable) and the four template tags are single
    tokens; merges may cross spaces, so the long Table 1 template costs only a few dozen tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.add_tokens(TAG_TOKENS)
    tok.train_from_iterator((text for pair in docs for text in pair), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        padding_side="left",
    )
    return fast


def build_model(tokenizer, hidden_size: int, num_layers: int, num_heads: int, max_positions: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def pretrain(model, tokenizer, docs: list[tuple[str, str]], steps: int, batch_size: int, lr: float, seed: int,
             warmup: int = 20, progress: bool = True) -> list[dict]:
    """Next-token pretraining on the corpus, AdamW with a cosine schedule. Returns the loss log."""
    g = torch.Generator().manual_seed(seed)
    prompts = tokenizer([p for p, _ in docs], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in docs], add_special_tokens=False)["input_ids"]
    enc = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompts, completions)]
    # loss on the completion only: the template is identical in every document, and the capacity of a
    # model this small is better spent on the reasoning than on predicting random question digits
    starts = [len(p) for p in prompts]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    log, t0 = [], time.time()
    bar = tqdm(range(steps), desc="pretrain base", disable=not progress, mininterval=1.0)
    for step in bar:
        idx = torch.randint(len(enc), (batch_size,), generator=g).tolist()
        seqs = [enc[i] for i in idx]
        L = max(map(len, seqs))
        ids = torch.full((batch_size, L), tokenizer.pad_token_id)
        mask = torch.zeros((batch_size, L), dtype=torch.long)
        labels = torch.full((batch_size, L), -100)
        for r, (i, s) in enumerate(zip(idx, seqs)):  # right padding: positions start at 0 for every row
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            labels[r, starts[i] : len(s)] = ids[r, starts[i] : len(s)]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log.append({"step": step + 1, "loss": loss.item(), "time": time.time() - t0})
    model.eval()
    return log


def build_base_model(cfg: dict, families: dict, template: str, out_dir, exclude: set[str] = frozenset(),
                     progress: bool = True) -> list[dict]:
    """Corpus -> tokenizer -> Llama -> brief pretraining -> save_pretrained(out_dir). Returns the loss log.

    cfg: the `base_model.tiny` config section (sizes, corpus size and mix, steps, learning rate, seed).
    """
    from r1flow.models import save_policy

    torch.manual_seed(cfg["seed"])
    docs = build_corpus(cfg["seed"], cfg["corpus_size"], families, cfg["corpus_mix"], template, exclude)
    tok = train_tokenizer(docs, cfg["vocab_size"])
    model = build_model(tok, cfg["hidden_size"], cfg["num_layers"], cfg["num_heads"], cfg["max_positions"], cfg["seed"])
    loss_log = pretrain(model, tok, docs, cfg["steps"], cfg["batch_size"], cfg["learning_rate"], cfg["seed"],
                        progress=progress)
    save_policy(model, tok, out_dir)
    return loss_log
