"""Transcripts and manifests in the form fairseq's wav2vec 2.0 recipes read them.

``{split}.tsv`` is a fairseq audio manifest (root folder on line 1, then ``path<TAB>samples``);
``{split}.wrd`` holds the normalised transcript and ``{split}.ltr`` its letters, one line per
manifest line, exactly as ``examples/wav2vec/libri_labels.py`` writes them; ``dict.ltr.txt`` is
the letter dictionary (``<symbol> <count>``, most frequent first) that ``Dictionary.load`` reads.

Nothing here overwrites a file with different content: an import into a folder that already
holds other manifests stops instead of silently mixing two corpora (an identical rerun is fine).
"""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
from typing import Dict, Iterable, Sequence, Tuple

ManifestRow = Tuple[str, int]
LabelledRow = Tuple[str, int, str]

# Apostrophe look-alikes that transcripts use interchangeably with "'" (French, Ukrainian, ...).
_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'"}
# Zero-width (non-)joiners are spelling in Persian and Indic scripts, not formatting.
_JOINERS = {"\u200c", "\u200d"}
_DOTTED_I_LANGUAGES = {"tr", "az", "tur", "aze", "turkish", "azerbaijani", "azeri", "crh"}


def _uses_dotted_i(language: str) -> bool:
    """Turkish-style casing (i -> İ, ı -> I) for tr/az/crh, with or without a region (tr-TR)."""
    base = language.strip().lower().replace("_", "-").split("-")[0]
    return base in _DOTTED_I_LANGUAGES


def _is_word_char(char: str) -> bool:
    return unicodedata.category(char)[0] in "LMN"


def _upper(text: str, language: str) -> str:
    """Upper-case; ß stays ß (str.upper spells it SS, which changes the word's letters)."""
    if _uses_dotted_i(language):
        text = text.replace("i", "\u0130").replace("\u0131", "I")
    return "".join(char if char == "ß" else char.upper() for char in text)


def normalise_transcript(text: str, language: str) -> str:
    """Upper-cased NFC words of letters, marks and digits, separated by single spaces.

    Letters of every script are kept as they are (é, ß, å, Tamil vowel signs, Cyrillic, ...);
    digits are kept as written, not spelled out (that is language-specific and belongs upstream).
    Punctuation and symbols become word breaks, except an apostrophe between two word
    characters (``l'homme``, ``don't``). Returns '' when nothing is left.
    """
    text = unicodedata.normalize("NFC", text)
    text = "".join(_APOSTROPHES.get(char, char) for char in text)
    text = unicodedata.normalize("NFC", _upper(text, language))
    kept = []
    for i, char in enumerate(text):
        inside_word = 0 < i < len(text) - 1 and _is_word_char(text[i - 1]) and _is_word_char(text[i + 1])
        if _is_word_char(char) or char in _JOINERS or (char == "'" and inside_word):
            kept.append(char)
        else:
            kept.append(" ")
    return " ".join("".join(kept).split())


def letters(words: str) -> str:
    """The .ltr line of a normalised transcript: "HELLO WORLD" -> "H E L L O | W O R L D |"."""
    if not words.strip():
        raise ValueError("letters(): empty transcript (skip the clip instead)")
    return " ".join(words.replace(" ", "|")) + " |"


def manifest_text(root: str, rows: Iterable[ManifestRow]) -> str:
    """A fairseq audio manifest: the absolute root folder, then ``path<TAB>samples`` lines."""
    if not os.path.isabs(root):
        raise ValueError(f"manifest root must be an absolute folder, got {root!r}")
    lines = [root]
    for path, n_samples in rows:
        if any(c in path for c in "\t\n\r") or path != path.strip():
            raise ValueError(f"audio path {path!r} cannot be written to a manifest (tab, newline or edge space)")
        lines.append(f"{path}\t{int(n_samples)}")
    return "\n".join(lines) + "\n"


def labelled_split_files(folder: str, split: str, root: str, rows: Sequence[LabelledRow]) -> Dict[str, str]:
    """The {split}.tsv/.wrd/.ltr files (path -> content) of a labelled split."""
    rows = list(rows)
    words = [text for _, _, text in rows]
    return {
        os.path.join(folder, f"{split}.tsv"): manifest_text(root, [(p, n) for p, n, _ in rows]),
        os.path.join(folder, f"{split}.wrd"): "".join(f"{w}\n" for w in words),
        os.path.join(folder, f"{split}.ltr"): "".join(f"{letters(w)}\n" for w in words),
    }


def letter_dictionary_text(ltr_lines: Iterable[str]) -> str:
    """dict.ltr.txt: every symbol of the .ltr lines with its count, most frequent first."""
    counts = Counter(symbol for line in ltr_lines for symbol in line.split())
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return "".join(f"{symbol} {count}\n" for symbol, count in ordered)


def write_files(files: Dict[str, str]) -> None:
    """Write all files, or none: any existing file with different content is refused first."""
    for path, text in files.items():
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    raise FileExistsError(
                        f"{path} already exists with different content; refusing to overwrite it "
                        "(choose another output folder or remove the old one)"
                    )
    for path, text in files.items():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        temporary = f"{path}.partial"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)


def write_manifest(folder: str, split: str, root: str, rows: Iterable[ManifestRow]) -> str:
    """Write ``folder/{split}.tsv`` from (relative_path, n_samples) rows; returns its path."""
    path = os.path.join(folder, f"{split}.tsv")
    write_files({path: manifest_text(root, rows)})
    return path


def write_labelled_split(folder: str, split: str, root: str, rows: Iterable[LabelledRow]) -> None:
    """Write ``{split}.tsv``, ``.wrd`` and ``.ltr`` from (relative_path, n_samples, normalised transcript)."""
    write_files(labelled_split_files(folder, split, root, list(rows)))


def write_letter_dictionary(folder: str, splits: Iterable[str]) -> str:
    """Count the letters of the splits' .ltr files into ``folder/dict.ltr.txt``; returns its path."""
    lines = []
    for split in splits:
        with open(os.path.join(folder, f"{split}.ltr"), encoding="utf-8") as f:
            lines.extend(f.read().splitlines())
    path = os.path.join(folder, "dict.ltr.txt")
    write_files({path: letter_dictionary_text(lines)})
    return path
