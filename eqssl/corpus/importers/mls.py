"""Multilingual LibriSpeech (openslr.org/94): ``mls_{lang}/`` (or ``{lang}/``, ``mls_{lang}_opus/``)
folders, each with ``{split}/transcripts.txt`` (``ID<TAB>TEXT``) and
``{split}/audio/{speaker}/{book}/{speaker}_{book}_{utt}.flac`` (or ``.opus``).

One pre-training shard per language from its train split, and labelled sets from its dev and
test splits, named after the language. ``transcripts.txt`` is the index of a split: a clip it
does not list is not imported, a listed clip without audio is reported.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional

from ..labels import normalise_transcript
from .common import CorpusImportError, Importer, Utterance, layout_error, parse_mapping

CORPUS = "Multilingual LibriSpeech"
EXPECTED = ("mls_LANG/ or LANG/ folders, each with train/, dev/, test/ holding transcripts.txt "
            "and audio/SPEAKER/BOOK/SPEAKER_BOOK_UTT.flac (or .opus)")
UTTERANCE_ID = re.compile(r"^\d+_\d+_\d+$")


def language_name(folder: str) -> str:
    """mls_german_opus -> german."""
    name = os.path.basename(folder.rstrip(os.sep))
    name = name[len("mls_"):] if name.startswith("mls_") else name
    return name[: -len("_opus")] if name.endswith("_opus") else name


def find_languages(source: str) -> Dict[str, str]:
    """language -> folder; SOURCE itself counts when it is one language's folder."""
    if glob.glob(os.path.join(glob.escape(source), "*", "transcripts.txt")):
        return {language_name(source): source}
    folders = sorted(glob.glob(os.path.join(glob.escape(source), "*", "*", "transcripts.txt")))
    languages: Dict[str, str] = {}
    for folder in sorted({os.path.dirname(os.path.dirname(f)) for f in folders}):
        name = language_name(folder)
        if name in languages:
            raise CorpusImportError(f"two folders hold language {name!r}: {languages[name]} and {folder}")
        languages[name] = folder
    return languages


def read_split(importer: Importer, folder: str, language: str) -> List[Utterance]:
    """The clips ``transcripts.txt`` lists, with normalised transcripts; bad lines reported."""
    path = os.path.join(folder, "transcripts.txt")
    utterances = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            utterance, _, text = line.rstrip("\n").partition("\t")
            words = normalise_transcript(text, language)
            if not UTTERANCE_ID.match(utterance) or not words:
                importer.bad(f"{path}:{number}", f"unparsable transcript line {line.strip()!r}")
                continue
            speaker, book, _ = utterance.split("_")
            stem = os.path.join(folder, "audio", speaker, book, utterance)
            audio = next((stem + e for e in (".flac", ".opus") if os.path.isfile(stem + e)), None)
            if audio is None:
                importer.bad(stem + ".flac", f"listed in {path}:{number} but has no .flac or .opus file")
                continue
            utterances.append(Utterance(utterance, audio, words))
    return utterances


def import_mls(source: str, out: str, languages: Optional[str] = None, pretrain_split: str = "train",
               finetune_splits: str = "dev:dev,test:test", valid_percent: float = 1.0,
               max_bad_fraction: float = 0.05, jobs: int = 0) -> dict:
    """Write OUT/pretrain/{language}/ from each language's ``pretrain_split`` and
    OUT/finetune/{language}/{name} from ``finetune_splits`` (``split:name`` pairs).

    ``languages``: comma-separated names (``german,dutch``; default: every language found).
    """
    importer = Importer("mls", source, out, max_bad_fraction, valid_percent, jobs)
    found = find_languages(importer.source)
    if not found:
        raise layout_error(CORPUS, importer.source, EXPECTED)
    wanted = [language_name(x.strip()) for x in languages.split(",") if x.strip()] if languages else sorted(found)
    finetune = parse_mapping(finetune_splits or "")
    for language in wanted:
        if language not in found:
            raise layout_error(CORPUS, importer.source, f"a folder for language {language!r} ({EXPECTED})")
        splits = [s for s in [pretrain_split] + [s for s, _ in finetune] if s]
        for split in splits:
            if not os.path.isfile(os.path.join(found[language], split, "transcripts.txt")):
                raise layout_error(CORPUS, found[language], f"{split}/transcripts.txt ({EXPECTED})")
        read = {split: read_split(importer, os.path.join(found[language], split), language) for split in set(splits)}
        if pretrain_split:
            importer.add_pretrain(language, read[pretrain_split])
        for split, name in finetune:
            importer.add_finetune(language, name, read[split])
    return importer.run()
