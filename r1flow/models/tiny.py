"""The embedded stand-in for DeepSeek-V3-Base: a tiny Llama trained from scratch on a synthetic corpus.

The corpus holds "textbook" worked examples outside any template (so the model knows how to reason step
by step) and answers to the Table 1 prompt in behaviours a real base model also shows: reasoning in the
template, an answer in tags straight away, a bare answer with no tags (and, for experiments, reasoning
with planted mistakes or terse, error-prone steps). Pretrained briefly, the model is a weak solver under
Table 1 that can reason but seldom does; R1-Zero's RL (section 2.2) has to find and reinforce that.
"""

from __future__ import annotations

import math
import random
import time

import torch
from tqdm.auto import tqdm

from r1flow.data import tasks as T
from r1flow.data.prompts import render
from r1flow.models import model_device, save_policy
from r1flow.models.decoding import pad_batch
from r1flow.models.logprobs import completion_logprobs

SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]


def corpus_completion(t: T.Task, rng: random.Random, mix: dict[str, float], shorthand_error_rate: float = 0.6,
                      slip_rate: float = 0.0, recheck_share: float = 0.0) -> str:
    """One pretraining completion for a task, in a behaviour drawn from `mix`:

    worked: careful step-by-step solution, correct; worked_wrong: the same with one planted mistake;
    partial: the first few careful steps (one to all but one, uniformly), then the right answer, the rest
    done "in the head" (for guess tasks: the first one to all-but-one guesses checked); recheck: a few
    careful steps (none to all but one), the answer guessed in the head ("=21", off by 1 or 2 half the
    time), then "wait" and the remaining steps written out after all;
    shorthand: only the running values ("=12 =24 =21"), wrong with probability `shorthand_error_rate`;
    answer_only: an answer in <answer> tags with no reasoning; bare: the answer with no tags.
    Shorthand chains slip with `slip_rate` per step and re-check some steps carefully in a
    `recheck_share` of documents (tasks.worked_solution).
    """
    mode = rng.choices(list(mix), list(mix.values()))[0]
    if mode == "worked":
        steps, ans = T.worked_solution(t, rng)
        return f" <think> {steps} </think> <answer> {ans} </answer>"
    if mode == "partial":
        # a writer who works some steps on paper and the rest in their head: right in the corpus, but a
        # step the model does not write is one it has to get right unseen, so RL pays for writing more of
        # them, one more step at a time (the gradual growth of Figure 3 in miniature)
        steps, ans = T.worked_solution(t, rng)
        if t.task == "guess":  # the first guesses checked (one to all but one); the rest done in the head
            tries = steps.split(" wait ")
            done = " wait ".join(tries[:rng.randint(1, max(1, len(tries) - 1))])
            done = done.removesuffix(" low").removesuffix(" high")
            return f" <think> {done} </think> <answer> {ans} </answer>"
        parts = steps.split(" ")
        if len(parts) > 1:
            parts = parts[:rng.randint(1, len(parts) - 1)]
        return f" <think> {' '.join(parts)} </think> <answer> {ans} </answer>"
    if mode == "recheck":
        # the writer jumps to an answer, stops ("wait") and works the rest out on paper: the reflection of
        # section 2.2.4 in miniature. The model's own guesses are unreliable, so RL can make the re-check
        # the rule where the base does it seldom
        steps, ans = T.worked_solution(t, rng)
        parts = steps.split(" ")
        j = rng.randint(0, len(parts) - 1)
        guess = int(ans) + (rng.choice([-2, -1, 1, 2]) if rng.random() < 0.5 else 0)
        done = " ".join(parts[:j] + [f"={abs(guess)}", "wait"] + parts[j:])
        return f" <think> {done} </think> <answer> {ans} </answer>"
    if mode == "worked_wrong":
        steps, ans = T.worked_solution(t, rng, wrong=True)
        return f" <think> {steps} </think> <answer> {ans} </answer>"
    if mode == "shorthand":
        steps, ans = T.worked_solution(t, rng, wrong=rng.random() < shorthand_error_rate, shorthand=True,
                                       slip_rate=slip_rate,
                                       rechecked=T.chain_rechecked(len(t.operands), rng, recheck_share)
                                       if t.task == "chain" else None)
        return f" <think> {steps} </think> <answer> {ans} </answer>"
    if mode == "answer_only":
        return f" <answer> {t.answer} </answer>"
    if mode == "bare":
        return f" {t.answer}"
    raise ValueError(f"unknown corpus mode {mode!r}")


def build_corpus(seed: int, n: int, families: dict, mix: dict[str, float], template: str,
                 exclude: set[str] = frozenset(), shorthand_error_rate: float = 0.6,
                 textbook_share: float = 0.0, slip_rate: float = 0.0,
                 recheck_share: float = 0.0) -> list[tuple[str, str]]:
    """(prompt, completion) pairs; they are tokenized apart, exactly as at sampling time.

    A `textbook_share` of the documents are worked examples outside the template; the rest answer the
    Table 1 prompt in a behaviour drawn from `mix`.
    """
    rng = random.Random(seed)
    names, weights = T.family_weights(families)
    docs = []
    while len(docs) < n:
        name = rng.choices(names, weights)[0]
        t = T.FAMILIES[name](rng, rng.choice(families[name]["difficulties"]))
        if T.task_key(t) in exclude:  # never pretrain on a held-out problem, in either direction (problem_key)
            continue
        if rng.random() < textbook_share:
            # general "textbook" knowledge: worked examples with no template, so the base knows how to
            # reason step by step without yet doing so when prompted with Table 1
            steps, ans = T.worked_solution(t, rng)
            docs.append((f"{t.question}:", f" {steps}. So the answer is {ans}."))
        else:
            docs.append((render(t.question, template),
                         corpus_completion(t, rng, mix, shorthand_error_rate, slip_rate, recheck_share)))
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


def length_buckets(lengths: list[int], buckets: int) -> list[list[int]]:
    """Row indices sorted by length and cut into `buckets` runs of (nearly) equal row counts: each run is
    padded to its own longest row, not the batch's (a batch of short documents with one long one pays
    the long one's width once, not 64 times)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    k = max(1, min(buckets, len(order)))
    cuts = [round(j * len(order) / k) for j in range(k + 1)]
    return [order[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def pretrain(model, tokenizer, docs: list[tuple[str, str]], steps: int, batch_size: int, lr: float, seed: int,
             warmup: int = 20, progress: bool = True, length_buckets_per_batch: int = 1) -> list[dict]:
    """Next-token pretraining on the corpus, AdamW with a cosine schedule. Returns the loss log.

    The loss covers the completion (and its EOS) only: the template is identical in every document, and
    the capacity of a model this small is better spent on the reasoning than on random question digits.
    Log-probs come from the same function GRPO uses, so the fast Llama path speeds this up too.
    `length_buckets_per_batch` > 1 runs each batch as that many micro-batches of similar lengths
    (`length_buckets`), their losses summed over the batch's token count: the same loss and gradient up
    to float summation order, with far less padding.
    """
    g = torch.Generator().manual_seed(seed)  # CPU: which documents, the same stream on any device
    device = model_device(model)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = tokenizer([p for p, _ in docs], add_special_tokens=False)["input_ids"]
    completions = [c + [eos] for c in tokenizer([c for _, c in docs], add_special_tokens=False)["input_ids"]]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    log, t0 = [], time.time()
    # disable=None: no bar when stderr is not a terminal (a SLURM log)
    bar = tqdm(range(steps), desc="pretrain base", disable=None if progress else True, mininterval=1.0)
    for step in bar:
        idx = torch.randint(len(docs), (batch_size,), generator=g, device="cpu").tolist()
        parts = (length_buckets([len(completions[i]) for i in idx], length_buckets_per_batch)
                 if length_buckets_per_batch > 1 else [list(range(len(idx)))])
        n_tokens = sum(len(completions[i]) for i in idx)
        opt.zero_grad(set_to_none=True)
        loss_value = 0.0
        for part in parts:
            rows = [idx[j] for j in part]
            # prompts left-padded, completions right-padded, as at sampling time, on the model's device
            p_ids, p_mask = pad_batch([prompts[i] for i in rows], pad, left=True, device=device)
            c_ids, c_mask = pad_batch([completions[i] for i in rows], pad, left=False, device=device)
            logps, _ = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, group_size=1)
            loss = -(logps * c_mask).sum() / n_tokens
            loss.backward()
            loss_value += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        log.append({"step": step + 1, "loss": loss_value, "time": time.time() - t0})
    model.eval()
    return log


def build_base_model(cfg: dict, families: dict, template: str, out_dir, exclude: set[str] = frozenset(),
                     progress: bool = True, device: str | torch.device = "cpu", tokenizer_from=None) -> list[dict]:
    """Corpus -> tokenizer -> Llama -> brief pretraining -> save_pretrained(out_dir). Returns the loss log.

    cfg: the `base_model.tiny` config section (sizes, corpus size and mix, steps, learning rate, seed).
    """
    torch.manual_seed(cfg["seed"])
    # the corpus may cover more than the prompts do (one-operation problems, too few to draw splits from)
    families = cfg.get("corpus_families") or families
    docs = build_corpus(cfg["seed"], cfg["corpus_size"], families, cfg["corpus_mix"], template, exclude,
                        cfg.get("shorthand_error_rate", 0.6), cfg.get("textbook_share", 0.0),
                        cfg.get("slip_rate", 0.0), cfg.get("recheck_share", 0.0))
    if tokenizer_from:  # a student reads its teacher's tokenizer: the distillation data tokenizes the same way
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_from)
    else:
        tok = train_tokenizer(docs, cfg["vocab_size"])
    model = build_model(tok, cfg["hidden_size"], cfg["num_layers"], cfg["num_heads"], cfg["max_positions"], cfg["seed"])
    model = model.to(device)  # initialised on the CPU (the same weights on any device), pretrained on `device`
    loss_log = pretrain(model, tok, docs, cfg["steps"], cfg["batch_size"], cfg["learning_rate"], cfg["seed"],
                        progress=progress, length_buckets_per_batch=cfg.get("length_buckets", 1))
    save_policy(model, tok, out_dir)
    return loss_log
