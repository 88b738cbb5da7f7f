"""Language consistency reward (section 2.3.2): the proportion of target-language words in the chain of
thought, added to accuracy with weights from the config.

How a word is counted:
- Math is not language: $...$, \\(...\\), \\[...\\] spans, LaTeX commands, digits and punctuation are
  removed first.
- English (and any Latin-script target): a word is a maximal run of Latin letters (apostrophes and
  hyphens inside a word kept), e.g. "don't" and "step-by-step" are one word each.
- Chinese: a word is one Han character, since Chinese is written without spaces and segmenting it
  would need a dictionary; "所以答案是" counts as 5.
- Any other script (Cyrillic, Greek, Kana, Hangul, Arabic...) counts as non-target words: runs of
  letters for alphabets, one per character for Kana.
score = target words / all words; a chain of thought with no words at all scores 0 ("no_words").
"""

from __future__ import annotations

import re
import unicodedata

from r1flow.data.formats import READABLE_MARKER, split_readable
from r1flow.rewards import Reward, per_sample, register

MATH_RE = re.compile(r"\$\$.*?\$\$|\$.*?\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+", re.DOTALL)
HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
KANA = r"\u3040-\u30ff"
LATIN = r"A-Za-z\u00c0-\u024f"
WORD_RE = re.compile(rf"[{HAN}]|[{KANA}]|[{LATIN}]+(?:['’-][{LATIN}]+)*|[^\W\d_{HAN}{KANA}{LATIN}]+")
LANGUAGES = ("en", "zh")


def count_words(text: str) -> dict[str, int]:
    """{'en': Latin-script words, 'zh': Han characters, 'other': words in any other script}."""
    text = unicodedata.normalize("NFC", MATH_RE.sub(" ", text))
    counts = {"en": 0, "zh": 0, "other": 0}
    for w in WORD_RE.findall(text):
        ch = w[0]
        if re.match(rf"[{HAN}]", ch):
            counts["zh"] += 1
        elif re.match(rf"[{LATIN}]", ch):
            counts["en"] += 1
        else:
            counts["other"] += 1
    return counts


def chain_of_thought(completion: str, marker: str = READABLE_MARKER) -> str:
    """The reasoning part: between <think> tags, or the readable pattern's reasoning_process, else all."""
    m = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    if m:
        return m.group(1)
    parts = split_readable(completion, marker)
    if parts is not None:
        return parts[0]
    if "<think>" in completion:  # unclosed: everything after the opening tag is reasoning
        return completion.split("<think>", 1)[1]
    return completion


def consistency(text: str, target: str) -> tuple[float, dict]:
    if target not in LANGUAGES:
        raise ValueError(f"language consistency supports {LANGUAGES}, not {target!r}")
    c = count_words(text)
    total = sum(c.values())
    return (c[target] / total if total else 0.0), c


@register("language_consistency")
@per_sample
def language_consistency(completion: str, gold: str = "", target: str = "en", marker: str = READABLE_MARKER) -> Reward:
    score, c = consistency(chain_of_thought(completion, marker), target)
    if not sum(c.values()):
        return Reward(0.0, "no_words")
    return Reward(score, f"{target}={c[target]}/{sum(c.values())}")
