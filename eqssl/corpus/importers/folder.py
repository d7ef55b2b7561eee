"""Any audio collection: SOURCE has one sub-folder per shard, each with audio files (at any
depth) and, optionally, ``transcripts.tsv`` lines ``relative/path.wav<TAB>transcript``.

Every shard is a pre-training shard; a shard with transcripts also becomes a labelled set
``finetune/{shard}/`` whose ``train`` and ``dev`` follow the shard's pre-training train/valid
hold-out, so dev clips are never pre-trained on.
"""

from __future__ import annotations

import os
from typing import Dict, List

from ..labels import normalise_transcript
from .common import AUDIO_EXTENSIONS, Importer, Utterance, layout_error

CORPUS = "a folder corpus"
EXPECTED = ("one sub-folder per shard, each holding audio files "
            f"({', '.join(AUDIO_EXTENSIONS)}) and optionally transcripts.tsv (relative_path<TAB>transcript)")
TRANSCRIPTS = "transcripts.tsv"


def is_audio(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(AUDIO_EXTENSIONS)


def audio_files(folder: str) -> List[str]:
    """Every audio file under ``folder``, sorted, skipping hidden files and folders."""
    found = []
    for parent, folders, files in os.walk(folder):
        folders[:] = sorted(d for d in folders if not d.startswith("."))
        found.extend(os.path.join(parent, f) for f in sorted(files) if is_audio(f))
    return sorted(found)


def read_transcripts(importer: Importer, folder: str, language: str) -> Dict[str, str]:
    """absolute audio path -> normalised transcript; bad lines reported and skipped."""
    path = os.path.join(folder, TRANSCRIPTS)
    texts = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            words = normalise_transcript(fields[1], language) if len(fields) == 2 else ""
            audio = os.path.normpath(os.path.join(folder, fields[0].strip()))
            if not words:
                importer.bad(f"{path}:{number}", f"expected 'relative_path<TAB>transcript', got {line.strip()!r}")
            elif not os.path.isfile(audio):
                importer.bad(audio, f"listed in {path}:{number} but missing")
            else:
                texts[audio] = words
    return texts


def import_folder(source: str, out: str, language: str = "", valid_percent: float = 1.0,
                  max_bad_fraction: float = 0.05, jobs: int = 0) -> dict:
    """Write OUT/pretrain/{shard}/ for every sub-folder with audio, and OUT/finetune/{shard}/
    train+dev for those with transcripts (normalised for ``language``, e.g. ``tr``)."""
    importer = Importer("folder", source, out, max_bad_fraction, valid_percent, jobs)
    entries = sorted(os.listdir(importer.source))
    if any(is_audio(e) for e in entries):
        raise layout_error(CORPUS, importer.source, EXPECTED + ", not audio files in SOURCE itself")
    shards = {e: audio_files(os.path.join(importer.source, e)) for e in entries
              if not e.startswith(".") and os.path.isdir(os.path.join(importer.source, e))}
    shards = {name: files for name, files in shards.items() if files}
    if not shards:
        raise layout_error(CORPUS, importer.source, EXPECTED)
    for shard, files in shards.items():
        folder = os.path.join(importer.source, shard)
        utterances = [Utterance(os.path.relpath(f, folder), f) for f in files]
        importer.add_pretrain(shard, utterances)
        if os.path.isfile(os.path.join(folder, TRANSCRIPTS)):
            texts = read_transcripts(importer, folder, language)
            labelled = [Utterance(u.key, u.audio, texts[u.audio]) for u in utterances if u.audio in texts]
            importer.add_finetune(shard, "train", labelled, follow=(shard, False))
            importer.add_finetune(shard, "dev", labelled, follow=(shard, True))
    return importer.run()
