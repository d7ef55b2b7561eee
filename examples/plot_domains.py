"""Spectrograms of one sentence in every domain of the built-in corpus (docs/domains.png).

    pip install -e ".[plots]" && python examples/plot_domains.py docs/domains.png
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import soxr  # noqa: E402
from scipy import signal  # noqa: E402

from eqssl.corpus.domains import DOMAINS, apply_domain  # noqa: E402
from eqssl.corpus.espeak import engine  # noqa: E402

SENTENCE = "the weather will change over the weekend"
VOICES = {"accent": "en-gb-scotland+m2"}


def speak(voice: str) -> np.ndarray:
    tts = engine()
    tts.set_random_seed(1)
    audio = tts.synthesise(SENTENCE, voice, rate=170, pitch=50)
    return soxr.resample(audio, tts.sample_rate, 16000).astype(np.float32)


def main(out: str) -> None:
    rng = np.random.default_rng(0)
    babble = [speak("en-us+f3"), speak("en-us+m4"), speak("en-us+f4")]
    fig, axes = plt.subplots(len(DOMAINS), 1, figsize=(7, 1.6 * len(DOMAINS)), sharex=True)
    for axis, name in zip(axes, DOMAINS):
        audio = apply_domain(name, speak(VOICES.get(name, "en-us+m2")), np.random.default_rng(rng.integers(2**31)), babble)
        f, t, power = signal.spectrogram(audio, fs=16000, nperseg=400, noverlap=240)
        axis.pcolormesh(t, f / 1000, 10 * np.log10(power + 1e-10), shading="auto", vmin=-110, vmax=-30)
        axis.set_ylabel("kHz")
        axis.set_title(f"{name}: {DOMAINS[name].description.split(':')[0]}", fontsize=8, loc="left")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/domains.png")
