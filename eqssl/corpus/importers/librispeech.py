"""LibriSpeech (openslr.org/12): ``{split}/{speaker}/{chapter}/{speaker}-{chapter}-{utt}.flac``
with one ``{speaker}-{chapter}.trans.txt`` (``ID TEXT`` lines) per chapter folder.

Pre-training shards are whole splits (``train-clean-100``, ...) or, with a shard map, groups of
speakers; labelled sets come from other splits (``dev-clean:dev``). The FLAC is already 16 kHz
mono, so it is referenced in place.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Dict, List, Optional

from ..labels import normalise_transcript
from .common import CorpusImportError, Importer, Utterance, layout_error, parse_mapping

CORPUS = "LibriSpeech"
EXPECTED = ("split folders such as train-clean-100/ or dev-clean/, each SPEAKER/CHAPTER/"
            "SPEAKER-CHAPTER-UTT.flac with SPEAKER-CHAPTER.trans.txt")
UTTERANCE_ID = re.compile(r"^\d+-\d+-\d+$")
DEFAULT_FINETUNE = "dev-clean:dev,dev-other:dev_other,test-clean:test,test-other:test_other"


def find_splits(source: str) -> List[str]:
    """Sub-folders laid out as LibriSpeech splits (SPEAKER/CHAPTER/*.trans.txt)."""
    def chapters(split: str) -> list:
        return glob.glob(os.path.join(glob.escape(os.path.join(source, split)), "*", "*", "*.trans.txt"))
    return sorted(d for d in os.listdir(source) if chapters(d))


def read_transcripts(importer: Importer, path: str) -> Dict[str, str]:
    """ID -> raw text of one chapter's .trans.txt; unparsable lines are reported and skipped."""
    texts = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            words = normalise_transcript(text, "en")
            if not UTTERANCE_ID.match(utterance) or not words:
                importer.bad(f"{path}:{number}", f"unparsable transcript line {line.strip()!r}")
                continue
            texts[utterance] = words
    return texts


def read_split(importer: Importer, folder: str) -> List[Utterance]:
    """Every well-named FLAC of a split, with its normalised transcript when one is listed."""
    utterances = []
    for chapter in sorted(glob.glob(os.path.join(glob.escape(folder), "*", "*", ""))):
        speaker_id, chapter_id = chapter.rstrip(os.sep).split(os.sep)[-2:]
        transcripts = os.path.join(chapter, f"{speaker_id}-{chapter_id}.trans.txt")
        texts = read_transcripts(importer, transcripts) if os.path.isfile(transcripts) else {}
        for audio in sorted(glob.glob(os.path.join(glob.escape(chapter), "*.flac"))):
            utterance = os.path.basename(audio)[: -len(".flac")]
            if not UTTERANCE_ID.match(utterance) or not utterance.startswith(f"{speaker_id}-{chapter_id}-"):
                importer.bad(audio, f"file name is not {speaker_id}-{chapter_id}-UTT.flac")
                continue
            utterances.append(Utterance(utterance, audio, texts.get(utterance)))
    return utterances


def read_shard_map(path: str) -> Dict[str, str]:
    """speaker id -> shard name, from ``speaker<TAB>shard`` lines."""
    mapping = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.rstrip("\n").split("\t")
            shard = fields[-1].strip()
            if len(fields) != 2 or not fields[0].strip().isdigit() or not shard or "/" in shard or shard[0] == ".":
                raise CorpusImportError(f"{path}:{number}: expected 'speaker_id<TAB>shard', got {line.strip()!r}")
            mapping[fields[0].strip()] = shard
    if not mapping:
        raise CorpusImportError(f"{path}: the shard map lists no speaker")
    return mapping


def import_librispeech(source: str, out: str, pretrain_splits: Optional[str] = None,
                       finetune_splits: Optional[str] = None, finetune_name: str = "librispeech",
                       shard_map: Optional[str] = None, valid_percent: float = 1.0,
                       max_bad_fraction: float = 0.05, jobs: int = 0) -> dict:
    """Write OUT/pretrain/{split or mapped shard}/ and OUT/finetune/{finetune_name}/{name}.

    ``pretrain_splits``: comma-separated (default: every ``train*`` split found);
    ``finetune_splits``: ``split:name`` pairs (default: those of dev-clean:dev, dev-other:dev_other,
    test-clean:test, test-other:test_other that exist); ``shard_map``: a file of
    ``speaker<TAB>shard`` lines grouping the pre-training clips instead (unlisted speakers are left out).
    """
    importer = Importer("librispeech", source, out, max_bad_fraction, valid_percent, jobs)
    found = find_splits(importer.source)
    if not found:
        nested = os.path.join(importer.source, "LibriSpeech")
        hint = f" (did you mean SOURCE {nested}?)" if os.path.isdir(nested) else ""
        raise layout_error(CORPUS, importer.source, EXPECTED + hint)
    pretrain = [s.strip() for s in pretrain_splits.split(",") if s.strip()] if pretrain_splits is not None \
        else [s for s in found if s.startswith("train")]
    finetune = parse_mapping(finetune_splits) if finetune_splits is not None \
        else [(s, n) for s, n in parse_mapping(DEFAULT_FINETUNE) if s in found]
    for split in pretrain + [s for s, _ in finetune]:
        if split not in found:
            raise layout_error(CORPUS, importer.source, f"a split folder {split}/ ({EXPECTED})")
    speakers = read_shard_map(shard_map) if shard_map else None
    unmapped = 0
    needed = sorted(set(pretrain) | {s for s, _ in finetune})
    splits = {split: read_split(importer, os.path.join(importer.source, split)) for split in needed}
    for split in pretrain:
        for u in splits[split]:
            shard = speakers.get(u.key.split("-")[0]) if speakers is not None else split
            if shard is None:
                unmapped += 1
            else:
                importer.add_pretrain(shard, [u])
    if speakers is not None and not importer.pretrain:
        raise CorpusImportError(f"{shard_map}: none of its speakers is in {', '.join(pretrain)}")
    for split, name in finetune:
        for u in splits[split]:
            if u.text is None:
                importer.bad(u.audio, "no line for it in its chapter's .trans.txt")
        importer.add_finetune(finetune_name, name, [u for u in splits[split] if u.text])
    summary = importer.run()
    summary["unmapped_clips"] = unmapped
    return summary
