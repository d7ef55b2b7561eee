"""A small generated multi-shard audio corpus in fairseq's layout, for tests and the demo.

Each shard is a "domain" with its own sound: voiced syllable-like harmonic sweeps at a pitch range
of its own, through a channel of its own (full band, telephone band-pass, noisy). It is not speech
(the real corpus comes from eSpeak NG), but it has the structure wav2vec 2.0 learns from:
periodic frames, formant-like spectral envelopes, and per-domain channel differences.

    eqssl-make-toy-corpus OUT --shards 3 --train-clips 24 --valid-clips 6
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import List

import numpy as np
import soundfile
from scipy import signal

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Domain:
    name: str
    pitch_hz: tuple
    band_hz: tuple
    noise_db: float
    """Noise level relative to the signal (dB); -inf for none."""


DOMAINS: List[Domain] = [
    Domain("read", (90.0, 160.0), (60.0, 7800.0), -60.0),
    Domain("telephone", (150.0, 260.0), (300.0, 3400.0), -30.0),
    Domain("noisy", (110.0, 220.0), (60.0, 7800.0), -8.0),
    Domain("child", (250.0, 400.0), (60.0, 7800.0), -40.0),
]


def synthesise(domain: Domain, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """One clip: a sequence of 80-250 ms syllables, each a harmonic sweep with two formants."""
    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n)
    start = 0
    while start < n:
        length = min(int(rng.uniform(0.08, 0.25) * SAMPLE_RATE), n - start)
        t = np.arange(length) / SAMPLE_RATE
        f0 = rng.uniform(*domain.pitch_hz) * (1 + rng.uniform(-0.2, 0.2) * t / max(t[-1], 1e-3))
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        voiced = sum(np.sin(h * phase) / h for h in range(1, 12))
        if rng.random() < 0.25:  # fricative-like unvoiced syllable
            voiced = rng.standard_normal(length)
        formants = rng.uniform([300, 900], [900, 2600])
        shaped = sum(
            signal.lfilter(*signal.iirpeak(f, 4.0, fs=SAMPLE_RATE), voiced) for f in formants
        )
        out[start:start + length] = shaped * np.hanning(length)
        start += length + int(rng.uniform(0.0, 0.05) * SAMPLE_RATE)
    sos = signal.butter(4, domain.band_hz, btype="bandpass", fs=SAMPLE_RATE, output="sos")
    out = signal.sosfilt(sos, out)
    out /= np.abs(out).max() + 1e-9
    if np.isfinite(domain.noise_db):
        out += rng.standard_normal(n) * np.std(out) * 10 ** (domain.noise_db / 20)
    return (0.5 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def write_shard(root: str, domain: Domain, clips: dict, seconds: tuple, seed: int) -> None:
    """Write ``root/<domain>/{audio/*.wav, train.tsv, valid.tsv}``."""
    folder = os.path.join(root, domain.name)
    audio = os.path.join(folder, "audio")
    os.makedirs(audio, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in clips.items():
        lines = [os.path.abspath(audio)]
        for i in range(count):
            wav = synthesise(domain, rng.uniform(*seconds), rng)
            name = f"{split}_{i:04d}.wav"
            soundfile.write(os.path.join(audio, name), wav, SAMPLE_RATE)
            lines.append(f"{name}\t{len(wav)}")
        with open(os.path.join(folder, f"{split}.tsv"), "w") as f:
            f.write("\n".join(lines) + "\n")


def make_corpus(root: str, shards: int = 3, train_clips: int = 24, valid_clips: int = 6,
                min_seconds: float = 1.0, max_seconds: float = 3.0, seed: int = 0) -> List[str]:
    """Generate the corpus (deterministic for a seed); returns the shard names."""
    if not 1 <= shards <= len(DOMAINS):
        raise ValueError(f"--shards must be between 1 and {len(DOMAINS)}")
    if os.path.exists(root) and os.listdir(root):
        raise FileExistsError(f"{root} exists and is not empty; choose a new folder")
    for index, domain in enumerate(DOMAINS[:shards]):
        write_shard(root, domain, {"train": train_clips, "valid": valid_clips},
                    (min_seconds, max_seconds), seed * 100 + index)
    return [d.name for d in DOMAINS[:shards]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="new folder to write the shards into")
    parser.add_argument("--shards", type=int, default=3, help="number of domains (1-4)")
    parser.add_argument("--train-clips", type=int, default=24, help="training clips per shard")
    parser.add_argument("--valid-clips", type=int, default=6, help="validation clips per shard")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = make_corpus(args.out, args.shards, args.train_clips, args.valid_clips,
                        args.min_seconds, args.max_seconds, args.seed)
    print(f"wrote shards {', '.join(names)} under {args.out}")


if __name__ == "__main__":
    main()
