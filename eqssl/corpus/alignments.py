"""Phone alignments of the built-in corpus, as a phone probe and a ZeroSpeech-style ABX read them.

Each clip's phones come from eSpeak NG's phoneme events (:meth:`eqssl.corpus.espeak.ESpeak.synthesise_aligned`),
kept in the chunk records as ``[onset, offset, phone]`` in seconds. Beside every split's manifest
``{split}.tsv`` this module writes:

``{split}.item``
    the ZeroSpeech / libri-light item file: the header ``#file onset offset #phone prev-phone
    next-phone speaker``, then one line per phone, ``file onset offset phone prev next speaker``:
    ``file`` is the audio file's stem, times are seconds with 4 decimals, ``prev``/``next`` the
    neighbouring phones of the clip, ``SIL`` where a pause or the clip's edge is the neighbour.
``{split}.phn``
    frame labels in the style of CPC_audio's ``converted_aligned_phones.txt``: one line per manifest
    row, in manifest order, ``stem label label ...``, 100 frames a second over the whole clip
    (frame ``i`` is the phone at time ``(i + 0.5) / 100`` s, ``SIL`` where there is none),
    ``samples // 160`` frames at 16 kHz.

Pauses are not phones: they are the gaps between phones, and a phone whose neighbour does not
start (end) exactly where it ends (starts) has a pause, hence ``SIL``, on that side.

    python -m eqssl.corpus.alignments OUT     # mean phone duration and phones per second, by language
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import labels

SILENCE = "SIL"
FRAME_RATE = 100
"""Frames per second of the .phn labels (CPC_audio's phone labels: one per 10 ms)."""
DECIMALS = 4
"""Decimals of the times the chunk records and .item files keep (0.1 ms)."""
ITEM_HEADER = "#file onset offset #phone prev-phone next-phone speaker"

RecordedPhone = List  # [onset_s, offset_s, phone], as a chunk record's JSON holds it
AlignedRow = Tuple[str, int, str, Sequence[RecordedPhone]]
"""One manifest row with its alignment: (audio path, samples, speaker, phones)."""


def record_phones(phones: Sequence[Tuple[float, float, str]], duration: float) -> List[RecordedPhone]:
    """Phones as a chunk record keeps them: times rounded to :data:`DECIMALS`, inside
    ``[0, duration]`` (the clip's length in seconds), none of zero length after rounding."""
    scale = 10**DECIMALS
    end = math.floor(duration * scale) / scale  # rounding up could step past the last sample
    kept = []
    for onset, offset, phone in phones:
        onset, offset = (min(max(0.0, round(t, DECIMALS)), end) for t in (onset, offset))  # max(0.0, -0.0): 0.0
        if offset > onset:
            kept.append([onset, offset, phone])
    return kept


def file_stem(path: str) -> str:
    """The item file's ``file`` of an audio path: ``pretrain/read/train/000003.flac`` -> ``000003``."""
    return os.path.splitext(os.path.basename(path))[0]


def neighbours(phones: Sequence[RecordedPhone]) -> List[Tuple[str, str]]:
    """(previous, next) phone of every phone of one clip: the adjacent phone when it touches this
    one (no pause between them), else ``SIL``."""
    found = []
    for i, (onset, offset, _) in enumerate(phones):
        before = phones[i - 1][2] if i > 0 and phones[i - 1][1] == onset else SILENCE
        after = phones[i + 1][2] if i + 1 < len(phones) and phones[i + 1][0] == offset else SILENCE
        found.append((before, after))
    return found


def check_phones(phones: Sequence[RecordedPhone], duration: float, where: str) -> None:
    """ValueError unless the phones lie inside the clip, in time order, none empty or overlapping,
    their names free of white space."""
    previous_offset = 0.0
    for onset, offset, phone in phones:
        if not (previous_offset <= onset < offset <= duration) or not phone or any(c.isspace() for c in phone):
            raise ValueError(f"{where}: phone {[onset, offset, phone]} is empty, overlaps the one before, "
                             f"lies outside the clip (0-{duration} s) or has white space in its name")
        previous_offset = offset


def item_text(rows: Sequence[AlignedRow], sample_rate: int) -> str:
    """The .item file of one split; ValueError if two files share a stem or an alignment is broken."""
    lines = [ITEM_HEADER]
    seen = set()
    for path, n_samples, speaker, phones in rows:
        stem = file_stem(path)
        if stem in seen or any(c.isspace() for c in stem + speaker):
            raise ValueError(f"{path}: its stem {stem!r} is not unique in the split, or it or the speaker "
                             f"{speaker!r} holds white space: the item file could not tell the files apart")
        seen.add(stem)
        check_phones(phones, n_samples / sample_rate, path)
        for (onset, offset, phone), (before, after) in zip(phones, neighbours(phones)):
            lines.append(f"{stem} {onset:.{DECIMALS}f} {offset:.{DECIMALS}f} {phone} {before} {after} {speaker}")
    return "\n".join(lines) + "\n"


def frame_labels(phones: Sequence[RecordedPhone], n_samples: int, sample_rate: int) -> List[str]:
    """The phone of every 10 ms frame of a clip (``n_samples // (sample_rate / 100)`` frames): the
    one whose [onset, offset) holds the frame's centre, else ``SIL``."""
    n_frames = n_samples * FRAME_RATE // sample_rate
    if not phones:
        return [SILENCE] * n_frames
    centres = (np.arange(n_frames) + 0.5) / FRAME_RATE
    onsets = np.array([p[0] for p in phones], dtype=np.float64)
    offsets = np.array([p[1] for p in phones], dtype=np.float64)
    index = np.searchsorted(onsets, centres, side="right") - 1  # the last phone starting at or before
    inside = (index >= 0) & (centres < offsets[np.maximum(index, 0)])
    return [phones[i][2] if ok else SILENCE for i, ok in zip(index.tolist(), inside.tolist())]


def phn_text(rows: Sequence[AlignedRow], sample_rate: int) -> str:
    """The .phn file of one split: ``stem label label ...`` per manifest row, in manifest order."""
    return "".join(
        " ".join([file_stem(path), *frame_labels(phones, n_samples, sample_rate)]) + "\n"
        for path, n_samples, _, phones in rows
    )


def alignment_files(folder: str, split: str, rows: Sequence[AlignedRow], sample_rate: int) -> Dict[str, str]:
    """The {split}.item and {split}.phn files (path -> content) of one split."""
    rows = list(rows)
    return {
        os.path.join(folder, f"{split}.item"): item_text(rows, sample_rate),
        os.path.join(folder, f"{split}.phn"): phn_text(rows, sample_rate),
    }


def write_alignments(folder: str, split: str, rows: Sequence[AlignedRow], sample_rate: int) -> None:
    """Write ``folder/{split}.item`` and ``.phn`` (refusing to overwrite different files, as the
    manifests do)."""
    labels.write_files(alignment_files(folder, split, rows, sample_rate))


def phone_rates(out: str) -> Dict[str, dict]:
    """Per language of the corpus in ``out`` (every set and split, from the .item files and the
    manifests): clips, phones, mean phone duration (ms) and phones per second of audio."""
    with open(os.path.join(out, "corpus.json"), encoding="utf-8") as f:
        description = json.load(f)
    sets, sample_rate = description["sets"], description["sample_rate"]
    totals: Dict[str, dict] = defaultdict(lambda: {"sets": [], "clips": 0, "phones": 0, "phone_s": 0.0, "audio_s": 0.0})
    for key, entry in sorted(sets.items()):
        language = totals[entry["language"]]
        language["sets"].append(key)
        for item_file in sorted(glob.glob(os.path.join(out, key, "*.item"))):
            with open(item_file, encoding="utf-8") as f:
                phones = [line.split() for line in f.read().splitlines()[1:]]
            with open(item_file[:-len(".item")] + ".tsv", encoding="utf-8") as f:
                samples = [int(line.split("\t")[1]) for line in f.read().splitlines()[1:]]
            language["clips"] += len(samples)
            language["phones"] += len(phones)
            language["phone_s"] += sum(float(p[2]) - float(p[1]) for p in phones)
            language["audio_s"] += sum(samples) / sample_rate
    return {code: dict(t, mean_phone_ms=1000 * t["phone_s"] / t["phones"], phones_per_s=t["phones"] / t["audio_s"])
            for code, t in totals.items() if t["phones"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eqssl.corpus.alignments", description=phone_rates.__doc__)
    parser.add_argument("out", nargs="+", help="folders made by eqssl-make-corpus")
    args = parser.parse_args(argv)
    print("| corpus | language | sets | clips | phones | mean phone (ms) | phones per second of audio |")
    print("|---|---|---|---|---|---|---|")
    for out in args.out:
        with open(os.path.join(out, "corpus.json"), encoding="utf-8") as f:
            settings = json.load(f)["settings"]
        for code, rates in phone_rates(out).items():
            print(f"| {settings['preset']} / {settings['size']} | `{code}` | {', '.join(rates['sets'])} | "
                  f"{rates['clips']} | {rates['phones']} | {rates['mean_phone_ms']:.0f} | "
                  f"{rates['phones_per_s']:.1f} |")


if __name__ == "__main__":
    main()
