"""Reading and checking fairseq audio manifests before any training starts.

A manifest is what fairseq's ``examples/wav2vec/wav2vec_manifest.py`` writes: the audio root
folder on the first line, then one ``<path relative to the root>\\t<number of samples>`` line per
clip. fairseq itself only finds a missing file, a wrong sample rate or a short clip when a batch
reaches it, and averages stereo channels silently; these checks find each up front and name the
file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List

import soundfile


class DataError(ValueError):
    """Bad training data, with the file (and line) to fix in the message."""


@dataclass
class ManifestEntry:
    path: str
    """As written in the manifest, relative to the root folder."""
    n_samples: int
    line: int
    """1-based line number in the manifest file."""


@dataclass
class Manifest:
    path: str
    root: str
    entries: List[ManifestEntry] = field(default_factory=list)

    def audio_path(self, entry: ManifestEntry) -> str:
        return os.path.join(self.root, entry.path)


def read_manifest(path: str) -> Manifest:
    """Parse a fairseq audio manifest, naming the line of the first malformed entry."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: manifest not found")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: empty manifest (line 1 must be the audio root folder)")
    manifest = Manifest(path=path, root=lines[0].strip())
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit():
            raise DataError(
                f"{path}:{number}: expected '<audio path>\\t<number of samples>', got {line!r}"
            )
        manifest.entries.append(ManifestEntry(fields[0], int(fields[1]), number))
    if not manifest.entries:
        raise DataError(f"{path}: the manifest lists no audio files")
    return manifest


def check_audio(manifest: Manifest, sample_rate: int) -> None:
    """Read every file's header: it must exist, be readable, mono, at ``sample_rate``, and as long as listed."""
    for entry in manifest.entries:
        audio = manifest.audio_path(entry)
        where = f"{manifest.path}:{entry.line}"
        if not os.path.isfile(audio):
            raise DataError(f"{where}: audio file {audio} does not exist")
        try:
            info = soundfile.info(audio)
        except Exception as error:  # soundfile raises RuntimeError/LibsndfileError variants
            raise DataError(f"{where}: cannot read audio file {audio}: {error}") from None
        if info.samplerate != sample_rate:
            raise DataError(
                f"{where}: {audio} is sampled at {info.samplerate} Hz but task.sample_rate is "
                f"{sample_rate} Hz; resample the corpus (fairseq does not resample)"
            )
        if info.channels != 1:
            raise DataError(
                f"{where}: {audio} has {info.channels} channels; wav2vec 2.0 takes mono audio "
                "(fairseq would average the channels silently): downmix it first"
            )
        if info.frames != entry.n_samples:
            raise DataError(
                f"{where}: the manifest says {entry.n_samples} samples but {audio} has "
                f"{info.frames}; regenerate the manifest"
            )


def receptive_field(conv_layers: List[tuple]) -> int:
    """Fewest input samples the wav2vec 2.0 feature encoder turns into one output frame."""
    samples = 1
    for _, kernel, stride in reversed(conv_layers):
        samples = (samples - 1) * stride + kernel
    return samples
