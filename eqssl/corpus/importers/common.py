"""What every importer shares: checking and converting audio, bad-item bookkeeping, and
writing the shard layout all at once.

An importer only parses its corpus's layout into utterances (an id, a source audio file, a
normalised transcript when labelled) and hands them to an :class:`Importer` as pre-training
shards or labelled splits. :meth:`Importer.run` then reads every audio header once, converts
what is not 16 kHz mono (or is MP3, whose header length fairseq cannot rely on) to FLAC under
``OUT/audio/``, skips and reports bad items, and writes every manifest only if nothing would
overwrite different content.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import soundfile

from ..labels import labelled_split_files, letter_dictionary_text, letters, manifest_text, write_files

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".w64", ".rf64", ".caf", ".au")
REPORT = "import_report.txt"
MARKER = "import_source.json"


class CorpusImportError(ValueError):
    """An import that cannot go on; the message says what to fix."""


class LayoutError(CorpusImportError):
    """SOURCE is not laid out as the corpus expects."""


@dataclass(frozen=True)
class Utterance:
    key: str
    """Stable id, unique within the corpus: orders manifests and decides the validation hold-out."""
    audio: str
    """Absolute path of the source audio file."""
    text: Optional[str] = None
    """Normalised transcript (labelled sets only)."""


@dataclass(frozen=True)
class Clip:
    path: str
    """Absolute path of 16 kHz mono audio (the source file, or its FLAC conversion)."""
    n_samples: int


def listing(folder: str, limit: int = 10) -> str:
    """A short description of a folder's top-level entries, for layout error messages."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as error:
        return f"an unreadable folder ({error.strerror})"
    if not names:
        return "an empty folder"
    shown = [n + ("/" if os.path.isdir(os.path.join(folder, n)) else "") for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def layout_error(corpus: str, source: str, expected: str) -> LayoutError:
    return LayoutError(f"{source} does not look like {corpus}: expected {expected}; found {listing(source)}")


def is_held_out(key: str, percent: float) -> bool:
    """Deterministic validation hold-out by a hash of the id, independent of file order and of other items."""
    return zlib.crc32(key.encode("utf-8")) % 10000 < percent * 100


def parse_mapping(text: str) -> List[Tuple[str, str]]:
    """'a:x,b:y' -> [('a', 'x'), ('b', 'y')]; a bare 'a' maps to itself; '' -> []."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, target = item.partition(":")
        pairs.append((name.strip(), (target or name).strip()))
    return pairs


def require_codecs(paths: Iterable[str]) -> None:
    """Stop early, with the fix, when this libsndfile cannot decode the corpus's MP3 or Opus."""
    extensions = {os.path.splitext(p)[1].lower() for p in paths}
    version = soundfile.__libsndfile_version__
    if ".mp3" in extensions and "MP3" not in soundfile.available_formats():
        raise CorpusImportError(
            f"this corpus is MP3 but libsndfile {version} here cannot decode MP3: install "
            "soundfile >= 0.12 (its wheels bundle libsndfile >= 1.1 with MP3)"
        )
    if extensions & {".opus", ".ogg"} and "OPUS" not in soundfile.available_subtypes("OGG"):
        raise CorpusImportError(
            f"this corpus is OGG/Opus but libsndfile {version} here cannot decode Opus: install "
            "soundfile >= 0.11 (its wheels bundle libsndfile with Opus), or convert the audio to FLAC"
        )


def convert(source: str, target: str) -> Union[Clip, str]:
    """Decode, downmix, resample to 16 kHz with soxr and write 16-bit FLAC; a reason string if bad."""
    import soxr  # only conversions need it

    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except Exception as error:
        return f"unreadable audio: {error}"
    mono = data.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        return "audio has non-finite samples"
    if rate != SAMPLE_RATE and len(mono):
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    if len(mono) == 0:
        return "empty audio (0 samples)"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".partial.flac"
    soundfile.write(partial, np.clip(mono, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    os.replace(partial, target)  # a target that exists is always complete
    return Clip(target, len(mono))


class Importer:
    """Collects one corpus's shards and labelled splits, then checks, converts and writes them."""

    def __init__(self, corpus: str, source: str, out: str, max_bad_fraction: float = 0.05,
                 valid_percent: float = 1.0, jobs: int = 0):
        self.corpus, self.source, self.out = corpus, os.path.abspath(source), os.path.abspath(out)
        if not os.path.isdir(self.source):
            raise CorpusImportError(f"SOURCE {self.source}: no such folder")
        if self.out == self.source or self.out.startswith(self.source + os.sep):
            raise CorpusImportError(f"OUT {self.out} must not be inside SOURCE {self.source}")
        if not 0 <= max_bad_fraction <= 1:
            raise CorpusImportError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction}")
        if not 0 < valid_percent < 100:
            raise CorpusImportError(f"--valid-percent must be > 0 and < 100 (a percentage), got {valid_percent}")
        self.max_bad_fraction, self.valid_percent = max_bad_fraction, valid_percent
        self.jobs = jobs or min(8, os.cpu_count() or 1)
        self.bad_items: Dict[str, str] = {}
        self.items: set = set()
        self.pretrain: Dict[str, List[Utterance]] = {}
        self.finetune: Dict[Tuple[str, str], Tuple[List[Utterance], Optional[Tuple[str, bool]]]] = {}
        self.check_out()

    # -- what the corpus importers call -------------------------------------------------------

    def bad(self, item: str, reason: str) -> None:
        """Skip ``item`` (an audio file, or ``file:line``) and name it in the report."""
        self.items.add(item)
        self.bad_items.setdefault(item, reason)

    def add_pretrain(self, shard: str, utterances: Iterable[Utterance]) -> None:
        self.pretrain.setdefault(shard, []).extend(self._track(utterances))

    def add_finetune(self, name: str, split: str, utterances: Iterable[Utterance],
                     follow: Optional[Tuple[str, bool]] = None) -> None:
        """A labelled split; ``follow=(shard, held_out)`` keeps only clips in that shard's valid
        (True) or train (False) part, so a dev set never overlaps pre-training data."""
        utterances = self._track(utterances)
        for u in utterances:
            if not u.text:
                raise ValueError(f"{u.key}: labelled utterances need a normalised transcript")
        self.finetune.setdefault((name, split), ([], follow))[0].extend(utterances)

    def _track(self, utterances: Iterable[Utterance]) -> List[Utterance]:
        utterances = list(utterances)
        self.items.update(u.audio for u in utterances)
        return utterances

    # -- the output folder ----------------------------------------------------------------------

    def marker(self) -> str:
        return json.dumps({"corpus": self.corpus, "source": self.source}, indent=1) + "\n"

    def check_out(self) -> None:
        """Refuse an OUT that holds another corpus's (or unknown) manifests."""
        path = os.path.join(self.out, MARKER)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text != self.marker():
                raise CorpusImportError(
                    f"{self.out} already holds another import ({path}: {' '.join(text.split())}); "
                    f"refusing to mix {self.corpus} from {self.source} into it: choose another OUT"
                )
            return
        for part in ("pretrain", "finetune"):
            for folder, _, files in os.walk(os.path.join(self.out, part)):
                if any(f.endswith(".tsv") for f in files):
                    raise CorpusImportError(
                        f"{self.out} already holds manifests ({folder}) that eqssl-import did not "
                        "write; refusing to mix corpora: choose another OUT"
                    )

    # -- audio ----------------------------------------------------------------------------------

    def resolve(self, audio: str) -> Union[Clip, str]:
        """The 16 kHz mono clip for a source file (in place, or converted), or why it is bad."""
        relative = os.path.relpath(audio, self.source)
        if any(c in audio for c in "\t\n\r") or any(p != p.strip() for p in relative.split(os.sep)):
            return "path cannot go into a fairseq manifest (tab, newline, or space at a name's edge)"
        try:
            info = soundfile.info(audio)
        except Exception as error:
            return f"unreadable audio: {error}"
        if info.frames <= 0:
            return "empty audio (0 samples)"
        if info.samplerate == SAMPLE_RATE and info.channels == 1 and info.format != "MP3":
            return Clip(audio, info.frames)
        target = os.path.join(self.out, "audio", os.path.splitext(relative)[0] + ".flac")
        if os.path.isfile(target):  # converted by an earlier run (written atomically)
            return Clip(target, soundfile.info(target).frames)
        return convert(audio, target)

    def resolve_all(self) -> Dict[str, Clip]:
        sources = sorted({u.audio for us in self.pretrain.values() for u in us}
                         | {u.audio for us, _ in self.finetune.values() for u in us})
        require_codecs(sources)
        with ThreadPoolExecutor(self.jobs) as pool:
            results = dict(zip(sources, pool.map(self.resolve, sources)))
        clips = {}
        for audio, result in results.items():
            if isinstance(result, Clip):
                clips[audio] = result
            else:
                self.bad(audio, result)
        return clips

    # -- writing --------------------------------------------------------------------------------

    def split_shard(self, shard: str, utterances: List[Utterance]) -> Tuple[List[Utterance], List[Utterance]]:
        """(train, valid) by the hash hold-out; at least one clip in each."""
        if len(utterances) < 2:
            raise CorpusImportError(
                f"shard {shard!r} has {len(utterances)} usable clip(s); it needs at least 2 "
                "(one for train.tsv, one for valid.tsv)"
            )
        by_hash = sorted(utterances, key=lambda u: (zlib.crc32(u.key.encode("utf-8")), u.key))
        valid = [u for u in utterances if is_held_out(u.key, self.valid_percent)]
        if not valid:
            valid = by_hash[:1]
        elif len(valid) == len(utterances):
            valid = by_hash[:-1]
        keys = {u.key for u in valid}
        return [u for u in utterances if u.key not in keys], valid

    def run(self) -> dict:
        """Check and convert the audio, write the report, then every manifest at once."""
        clips = self.resolve_all()
        files: Dict[str, str] = {}
        summary: dict = {"corpus": self.corpus, "source": self.source, "out": self.out,
                         "pretrain": {}, "finetune": {}}
        held_out: Dict[str, set] = {}

        def usable(utterances: List[Utterance]) -> List[Utterance]:
            unique = {u.key: u for u in utterances if u.audio in clips}
            return [unique[k] for k in sorted(unique)]

        for shard, utterances in sorted(self.pretrain.items()):
            train, valid = self.split_shard(shard, usable(utterances))
            held_out[shard] = {u.key for u in valid}
            folder = os.path.join(self.out, "pretrain", shard)
            for split, part in (("train", train), ("valid", valid)):
                root, rows = self.rows(part, clips)
                files[os.path.join(folder, f"{split}.tsv")] = manifest_text(root, rows)
            summary["pretrain"][shard] = {"train": len(train), "valid": len(valid)}

        ltr_lines: Dict[str, List[str]] = {}
        for (name, split), (utterances, follow) in sorted(self.finetune.items()):
            part = usable(utterances)
            if follow:
                shard, want_held_out = follow
                part = [u for u in part if (u.key in held_out.get(shard, ())) == want_held_out]
            if not part:
                continue
            root, rows = self.rows(part, clips)
            labelled = [(path, n, u.text) for (path, n), u in zip(rows, part)]
            files.update(labelled_split_files(os.path.join(self.out, "finetune", name), split, root, labelled))
            ltr_lines.setdefault(name, []).extend(letters(u.text) for u in part)
            summary["finetune"].setdefault(name, {})[split] = len(part)
        for name, lines in ltr_lines.items():
            files[os.path.join(self.out, "finetune", name, "dict.ltr.txt")] = letter_dictionary_text(lines)

        summary.update(items=len(self.items), bad=len(self.bad_items),
                       converted=sum(c.path != a for a, c in clips.items()),
                       skipped=[f"{item}: {why}" for item, why in sorted(self.bad_items.items())],
                       report=os.path.join(self.out, REPORT))
        self.write_report(summary)
        fraction = len(self.bad_items) / max(1, len(self.items))
        if fraction > self.max_bad_fraction:
            raise CorpusImportError(
                f"{len(self.bad_items)} of {len(self.items)} items are bad ({fraction:.1%}, more than "
                f"--max-bad-fraction {self.max_bad_fraction:.1%}); no manifest was written; see {summary['report']}"
            )
        if not summary["pretrain"] and not summary["finetune"]:
            raise CorpusImportError(f"no usable clips in {self.source}; see {summary['report']}")
        files[os.path.join(self.out, MARKER)] = self.marker()
        write_files(files)
        return summary

    @staticmethod
    def rows(utterances: List[Utterance], clips: Dict[str, Clip]) -> Tuple[str, List[Tuple[str, int]]]:
        """Manifest root (the clips' common folder) and (relative path, samples) rows."""
        paths = [clips[u.audio].path for u in utterances]
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        return root, [(os.path.relpath(p, root), clips[u.audio].n_samples) for p, u in zip(paths, utterances)]

    def write_report(self, summary: dict) -> None:
        lines = [f"eqssl-import {self.corpus} {self.source} {self.out}",
                 f"items: {summary['items']}, bad: {summary['bad']}, "
                 f"converted to 16 kHz mono FLAC: {summary['converted']}"]
        lines += [f"pretrain/{s}: train {c['train']}, valid {c['valid']}" for s, c in summary["pretrain"].items()]
        lines += [f"finetune/{n}/{s}: {c}" for n, splits in summary["finetune"].items() for s, c in splits.items()]
        lines += ["skipped:"] + [f"  {item}" for item in summary["skipped"]]
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, REPORT), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
