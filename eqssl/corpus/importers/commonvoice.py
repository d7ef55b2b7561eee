"""Mozilla Common Voice: a language folder (``cv-corpus-*/tr/``) or a folder of them, each with
``clips/*.mp3`` and tab-separated ``validated.tsv``, ``train.tsv``, ``dev.tsv``, ``test.tsv``
whose header names at least ``path`` and ``sentence``.

One pre-training shard per language, from ``validated.tsv`` (or ``train.tsv``) less the dev and
test clips, so fine-tuning evaluation never sees pre-training audio; labelled sets from the
train/dev/test lists. The MP3 (48 kHz, and its header length is an estimate) is decoded and
written as 16 kHz mono FLAC under ``OUT/audio/``.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from ..labels import normalise_transcript
from .common import Importer, Utterance, layout_error, parse_mapping

CORPUS = "Common Voice"
EXPECTED = "a language folder (or folders of them) with clips/ and validated.tsv, train.tsv, dev.tsv, test.tsv"
LISTS = ("validated.tsv", "train.tsv", "dev.tsv", "test.tsv")


def is_language_folder(folder: str) -> bool:
    return os.path.isdir(os.path.join(folder, "clips")) and any(
        os.path.isfile(os.path.join(folder, name)) for name in LISTS)


def find_languages(source: str) -> Dict[str, str]:
    """language code -> folder; SOURCE itself counts when it is one language's folder."""
    if is_language_folder(source):
        return {os.path.basename(source.rstrip(os.sep)): source}
    return {d: os.path.join(source, d) for d in sorted(os.listdir(source))
            if is_language_folder(os.path.join(source, d))}


def read_list(importer: Importer, path: str, language: str) -> List[Utterance]:
    """The clips of one .tsv list, keyed by clip name, with normalised sentences ('' if none)."""
    clips = os.path.join(os.path.dirname(path), "clips")
    utterances = []
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if "path" not in header or "sentence" not in header:
            raise layout_error(CORPUS, os.path.dirname(path),
                               f"{path} with a header naming path and sentence, got {header}")
        where, what = header.index("path"), header.index("sentence")
        for number, line in enumerate(f, start=2):
            fields = line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            if len(fields) != len(header) or not fields[where].strip():
                importer.bad(f"{path}:{number}", f"expected {len(header)} tab-separated fields, got {len(fields)}")
                continue
            audio = os.path.join(clips, fields[where].strip())
            if not os.path.isfile(audio):
                importer.bad(audio, f"listed in {path}:{number} but missing")
                continue
            utterances.append(Utterance(fields[where].strip(), audio, normalise_transcript(fields[what], language)))
    return utterances


def import_commonvoice(source: str, out: str, languages: Optional[str] = None,
                       finetune_splits: str = "train:train,dev:dev,test:test", valid_percent: float = 1.0,
                       max_bad_fraction: float = 0.05, jobs: int = 0) -> dict:
    """Write OUT/pretrain/{language}/ and OUT/finetune/{language}/{name} (``list:name`` pairs of
    ``finetune_splits``; ``train:train,dev:dev,test:test`` by default).

    ``languages``: comma-separated codes as the folders name them (``tr,sv-SE``; default: all found).
    """
    importer = Importer("commonvoice", source, out, max_bad_fraction, valid_percent, jobs)
    found = find_languages(importer.source)
    if not found:
        raise layout_error(CORPUS, importer.source, EXPECTED)
    wanted = [x.strip() for x in languages.split(",") if x.strip()] if languages else sorted(found)
    finetune = parse_mapping(finetune_splits or "")
    for language in wanted:
        folder = found.get(language)
        if folder is None:
            raise layout_error(CORPUS, importer.source, f"a folder for language {language!r} ({EXPECTED})")
        lists = {name[:-4]: read_list(importer, os.path.join(folder, name), language)
                 for name in LISTS if os.path.isfile(os.path.join(folder, name))}
        held_back = {u.key for split in ("dev", "test") for u in lists.get(split, [])}
        pool = lists.get("validated", lists.get("train", []))
        importer.add_pretrain(language, [u for u in pool if u.key not in held_back])
        for split, name in finetune:
            if split not in lists:
                raise layout_error(CORPUS, folder, f"{split}.tsv ({EXPECTED})")
            for u in lists[split]:
                if not u.text:
                    importer.bad(f"{os.path.join(folder, split)}.tsv: {u.key}", "empty sentence after normalisation")
            importer.add_finetune(language, name, [u for u in lists[split] if u.text])
    return importer.run()
