"""Sentences of real words of a language, offline, from the word lists wordfreq ships.

Words are drawn with probability proportional to their frequency (so sentences have each
language's real orthography and letter statistics), from the language's most frequent words
that consist of letters (and combining marks, which Tamil and other scripts need) only.
"""

from __future__ import annotations

import functools
import unicodedata
from typing import List, Tuple

import numpy as np
import wordfreq

VOCABULARY_SIZE = 5000


class UnknownLanguage(ValueError):
    pass


def available_languages() -> List[str]:
    """Languages wordfreq has a word list for."""
    return sorted(wordfreq.available_languages())


def _is_word(token: str) -> bool:
    return bool(token) and all(unicodedata.category(c)[0] in "LM" for c in token) and \
        unicodedata.category(token[0])[0] == "L"


@functools.lru_cache(maxsize=None)
def vocabulary(language: str) -> Tuple[Tuple[str, ...], np.ndarray]:
    """The language's most frequent words and their sampling probabilities."""
    if language not in wordfreq.available_languages():
        raise UnknownLanguage(
            f"no word list for language {language!r}; available: {', '.join(available_languages())}"
        )
    words = tuple(w for w in wordfreq.top_n_list(language, VOCABULARY_SIZE) if _is_word(w))
    frequency = np.array([wordfreq.word_frequency(w, language) for w in words])
    return words, frequency / frequency.sum()


def sentence(language: str, n_words: int, rng: np.random.Generator) -> str:
    """``n_words`` words of ``language`` drawn by frequency."""
    words, p = vocabulary(language)
    return " ".join(words[i] for i in rng.choice(len(words), size=n_words, p=p))
