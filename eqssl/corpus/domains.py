"""Acoustic domains laid over clean synthesized speech: read, telephone, meeting, broadcast, accent.

Every domain maps a clean 16 kHz mono utterance to a new float32 array of the same length, finite and
peak-normalised to ``OUTPUT_PEAK`` (0.5). The DSP comes from maintained libraries: soxr (resampling),
scipy.signal (Butterworth band-pass, FFT convolution, windows), torchaudio (G.711 mu-law companding),
pyroomacoustics (room impulse responses) and audiomentations (Gaussian and coloured noise).

Determinism. Each transform takes a ``numpy.random.Generator`` and draws everything from it, so the same
input and generator state give byte-identical output whatever the global random states are.
audiomentations takes no generator: ``AddGaussianSNR`` (telephone line hiss) draws from Python's
``random`` and numpy's global ``np.random``, and ``generate_decaying_white_noise`` (the noise generator
behind ``AddColorNoise``, called directly because the broadcast background is noise plus music mixed to
one joint SNR) from ``np.random``. pyroomacoustics draws from its package generator ``pra.random``
(a numpy Generator plus a C++ engine used by ray tracing with scattering). Every such call runs inside
``_library_rngs_seeded_from``, which seeds all of them from seeds drawn from the given generator and
afterwards restores Python's and numpy's global states and pyroomacoustics' numpy generator (its private
``pra.random.generator._rng``). The C++ engine's state cannot be read back, so it is left seeded by us
(only pyroomacoustics uses it). Random draws we need ourselves (SNRs, room geometry, chords) come
straight from the given generator. Global state is not thread-safe: do not apply domains from several
threads at once (separate processes are fine).

    audio = apply_domain("telephone", clean, np.random.default_rng(0))
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import pyroomacoustics as pra
import soxr
from audiomentations import AddGaussianSNR
from audiomentations.augmentations.add_color_noise import generate_decaying_white_noise
from scipy import signal

SAMPLE_RATE = 16_000
OUTPUT_PEAK = 0.5
"""Every domain's output is scaled so that its largest absolute sample is exactly this."""

# telephone: narrow-band PSTN channel
PHONE_RATE = 8_000
PHONE_BAND_HZ = (300.0, 3400.0)
PHONE_BUTTER_ORDER = 6
"""Butterworth prototype order; as a band-pass it is order 12 (6 poles per band edge), run causally."""
PHONE_RESAMPLER_QUALITY = "HQ"
MU_LAW_CHANNELS = 256
"""G.711 mu-law: 8-bit codes (mu = 255)."""
CODEC_INPUT_PEAK = 0.9
"""Level the band-limited signal is scaled to before companding (headroom below codec full scale)."""
LINE_SNR_DB = (30.0, 40.0)
"""White line noise, added at 8 kHz before the band-pass, relative to the narrow-band signal."""

# meeting: far-field room with babble
ROOM_SIZE_M = ((5.0, 10.0), (4.0, 8.0), (2.5, 3.5))
"""Length, width and height ranges of the ShoeBox room."""
RT60_S = (0.3, 0.8)
"""Sabine design RT60; absorption and image order from ``pra.inverse_sabine``."""
SOURCE_MIC_DISTANCE_M = (1.0, 3.0)
MIC_HEIGHT_M = (0.7, 1.0)
"""Microphone on a table."""
TALKER_HEIGHT_M = (1.1, 1.7)
"""Mouths of seated or standing talkers (the target and the babble talkers)."""
WALL_MARGIN_M = 0.5
BABBLE_MIN_DISTANCE_M = 1.0
ISM_MAX_ORDER = 10
"""Image-source order cap; ray tracing (pyroomacoustics' hybrid simulator) models the later tail."""
RAY_TRACING_RAYS = 10_000
WALL_SCATTERING = 0.15
"""Furnished-room scattering; makes the field diffuse enough that the simulated RT60 is close to Sabine's."""
BABBLE_SNR_DB = (5.0, 15.0)
"""Reverberant target vs reverberant babble, both as RMS over the whole utterance."""
FALLBACK_BABBLE_TALKERS = 3
"""Without babble clips, babble is this many time-reversed, shifted copies of the utterance itself."""

# broadcast: speech over a background of coloured noise and music
BROADCAST_SNR_DB = (5.0, 15.0)
"""Speech vs the whole background (noise plus music), both as RMS over the utterance."""
NOISE_DECAY_DB_PER_OCTAVE = (-6.02, 0.0)
"""Coloured noise from brown (-6.02 dB/octave) through pink (-3.01) to white (0)."""
NOISE_N_FFT = 128
MUSIC_TO_NOISE_DB = (-5.0, 10.0)
CHORD_ROOT_HZ = (110.0, 220.0)
CHORD_DURATION_S = (1.0, 2.5)
CHORD_HARMONICS = 6
"""Harmonics per chord tone, amplitude 1/k (a soft sawtooth-like timbre)."""
TREMOLO_HZ = (0.2, 1.0)
TREMOLO_DEPTH = 0.3

ACCENT_VOICES = ("en-us", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                 "en-us-nyc")


@dataclass(frozen=True)
class Domain:
    """One acoustic domain; ``params`` are the numbers it uses, JSON-ready for corpus.json."""

    name: str
    description: str
    params: dict


# ---------------------------------------------------------------------------------------------- helpers

def peak_normalise(audio: np.ndarray, peak: float = OUTPUT_PEAK) -> np.ndarray:
    """Scale so the largest |sample| is ``peak``; silence stays silence. Returns float32."""
    x = np.asarray(audio, dtype=np.float64)
    top = float(np.max(np.abs(x))) if x.size else 0.0
    if top == 0.0:
        return np.zeros(x.shape, dtype=np.float32)
    return (x * (peak / top)).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def _fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad at the end to exactly ``n`` samples (resamplers may be off by a sample)."""
    return x[:n] if len(x) >= n else np.pad(x, (0, n - len(x)))


def _uniform(rng: np.random.Generator, bounds: Tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


@contextlib.contextmanager
def _library_rngs_seeded_from(rng: np.random.Generator) -> Iterator[None]:
    """Seed Python's, numpy's global and pyroomacoustics' RNGs from ``rng``; restore them afterwards.

    audiomentations and pyroomacoustics take no generator argument, so this is how their draws become
    a function of ``rng`` alone without disturbing anyone else's use of the global generators.
    """
    py_seed, np_seed = int(rng.integers(2**32)), int(rng.integers(2**32))
    pra_seeds = [int(s) for s in rng.integers(2**63, size=2)]
    py_state, np_state = random.getstate(), np.random.get_state()
    pra_generator = getattr(pra.random.generator, "_rng", None)
    random.seed(py_seed)
    np.random.seed(np_seed)
    pra.random.seed(numpy=pra_seeds[0], libroom=pra_seeds[1])
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        pra.random.generator._rng = pra_generator


def _scale_to_snr(speech: np.ndarray, background: np.ndarray, snr_db: float) -> np.ndarray:
    """``background`` rescaled so that RMS(speech) / RMS(result) is ``snr_db``."""
    level = _rms(background)
    if level == 0.0:
        return np.zeros_like(background)
    return background * (_rms(speech) / level / 10.0 ** (snr_db / 20.0))


# ------------------------------------------------------------------------------------------ read, accent

def read(audio: np.ndarray) -> np.ndarray:
    """Clean read speech: the synthesized audio as it is, only peak-normalised."""
    return peak_normalise(audio)


def accent(audio: np.ndarray) -> np.ndarray:
    """Acoustically clean: the accent comes from the eSpeak NG voice chosen upstream."""
    return peak_normalise(audio)


# --------------------------------------------------------------------------------------------- telephone

def phone_bandpass(audio_8k: np.ndarray) -> np.ndarray:
    """300-3400 Hz Butterworth band-pass at 8 kHz, causal like a real channel filter."""
    sos = signal.butter(PHONE_BUTTER_ORDER, PHONE_BAND_HZ, btype="bandpass", fs=PHONE_RATE, output="sos")
    return signal.sosfilt(sos, audio_8k)


def mu_law_codec(audio: np.ndarray, channels: int = MU_LAW_CHANNELS) -> np.ndarray:
    """G.711-style mu-law: compand, quantise to ``channels`` codes and expand back (input in [-1, 1])."""
    import torch  # lazy: torch is only needed here, and forked corpus workers then load it themselves
    import torchaudio.functional as AF

    x = torch.from_numpy(np.clip(np.asarray(audio, dtype=np.float64), -1.0, 1.0))
    return AF.mu_law_decoding(AF.mu_law_encoding(x, channels), channels).numpy().astype(np.float64)


def telephone(audio: np.ndarray, rng: np.random.Generator, *, codec: bool = True) -> np.ndarray:
    """Narrow-band phone line: 8 kHz, line hiss, 300-3400 Hz band, mu-law codec, back to 16 kHz.

    ``codec=False`` skips only the mu-law step (same random draws), to measure what the codec adds.
    """
    x = np.asarray(audio, dtype=np.float64)
    narrow = soxr.resample(x, SAMPLE_RATE, PHONE_RATE, quality=PHONE_RESAMPLER_QUALITY)
    snr_db = _uniform(rng, LINE_SNR_DB)
    hiss = AddGaussianSNR(min_snr_db=snr_db, max_snr_db=snr_db, p=1.0)
    with _library_rngs_seeded_from(rng):
        narrow = hiss(narrow.astype(np.float32), sample_rate=PHONE_RATE).astype(np.float64)
    narrow = phone_bandpass(narrow)
    if codec:
        narrow = mu_law_codec(peak_normalise(narrow, CODEC_INPUT_PEAK))
    wide = soxr.resample(narrow, PHONE_RATE, SAMPLE_RATE, quality=PHONE_RESAMPLER_QUALITY)
    return peak_normalise(_fit_length(wide, len(x)))


# ----------------------------------------------------------------------------------------------- meeting

@dataclass(frozen=True)
class Room:
    """One drawn meeting room: geometry, design RT60 and where the mic and talkers are."""

    size_m: Tuple[float, float, float]
    rt60_s: float
    mic: Tuple[float, float, float]
    target: Tuple[float, float, float]
    babblers: Tuple[Tuple[float, float, float], ...]


def _place_target(size: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Mic and target talker at a drawn 3-D distance; room sizes guarantee it fits any direction."""
    mic_z, talker_z = _uniform(rng, MIC_HEIGHT_M), _uniform(rng, TALKER_HEIGHT_M)
    distance = _uniform(rng, SOURCE_MIC_DISTANCE_M)
    horizontal = math.sqrt(max(distance**2 - (talker_z - mic_z) ** 2, 0.0))
    angle = _uniform(rng, (0.0, 2 * math.pi))
    offset = horizontal * np.array([math.cos(angle), math.sin(angle)])
    low = WALL_MARGIN_M - np.minimum(offset, 0.0)
    high = size[:2] - WALL_MARGIN_M - np.maximum(offset, 0.0)
    mic_xy = rng.uniform(low, high)
    return np.array([*mic_xy, mic_z]), np.array([*(mic_xy + offset), talker_z])


def _place_babbler(size: np.ndarray, mic: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A babble talker somewhere in the room, preferably at least ``BABBLE_MIN_DISTANCE_M`` from the mic."""
    for _ in range(100):
        xy = rng.uniform(WALL_MARGIN_M, size[:2] - WALL_MARGIN_M)
        where = np.array([*xy, _uniform(rng, TALKER_HEIGHT_M)])
        if np.linalg.norm(where - mic) >= BABBLE_MIN_DISTANCE_M:
            break
    return where


def draw_room(rng: np.random.Generator, n_babblers: int) -> Room:
    """Draw a ShoeBox meeting room from the documented ranges."""
    size = np.array([_uniform(rng, bounds) for bounds in ROOM_SIZE_M])
    rt60 = _uniform(rng, RT60_S)
    mic, target = _place_target(size, rng)
    babblers = tuple(tuple(_place_babbler(size, mic, rng).tolist()) for _ in range(n_babblers))
    return Room(tuple(size.tolist()), rt60, tuple(mic.tolist()), tuple(target.tolist()), babblers)


def room_impulse_responses(room: Room, rng: np.random.Generator) -> List[np.ndarray]:
    """pyroomacoustics RIRs from the target, then each babbler, to the mic (hybrid ISM + ray tracing)."""
    absorption, order = pra.inverse_sabine(room.rt60_s, list(room.size_m))
    with _library_rngs_seeded_from(rng):
        walls = pra.Material(absorption, WALL_SCATTERING)
        shoebox = pra.ShoeBox(list(room.size_m), fs=SAMPLE_RATE, materials=walls,
                              max_order=min(order, ISM_MAX_ORDER), ray_tracing=True, air_absorption=False)
        shoebox.set_ray_tracing(n_rays=RAY_TRACING_RAYS)
        for where in (room.target, *room.babblers):
            shoebox.add_source(list(where))
        shoebox.add_microphone(list(room.mic))
        shoebox.compute_rir()
    return [np.asarray(h, dtype=np.float64) for h in shoebox.rir[0]]


def reverberate(audio: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with ``rir``, aligned to its direct path (its peak); the tail past the input is cut."""
    start = int(np.argmax(np.abs(rir)))
    wet = signal.fftconvolve(np.asarray(audio, dtype=np.float64), rir)
    return _fit_length(wet[start:], len(audio))


def _babble_clips(audio: np.ndarray, babble: Sequence[np.ndarray],
                  rng: np.random.Generator) -> List[np.ndarray]:
    """Other speakers' clips looped from a random offset to the utterance length, each at unit RMS.

    Without (audible) clips, time-reversed copies of the utterance at random shifts stand in: speech-like
    in spectrum and rhythm, unintelligible.
    """
    clips = [c for c in (np.asarray(b, dtype=np.float64) for b in babble) if _rms(c) > 0]
    if not clips:
        clips = [audio[::-1]] * FALLBACK_BABBLE_TALKERS
    looped = [np.resize(np.roll(c, -int(rng.integers(len(c)))), len(audio)) for c in clips]
    return [c / _rms(c) for c in looped]


def meeting(audio: np.ndarray, rng: np.random.Generator, babble: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Far-field meeting: reverberant target plus reverberant babble of other talkers at 5-15 dB SNR."""
    x = np.asarray(audio, dtype=np.float64)
    clips = _babble_clips(x, babble, rng)
    room = draw_room(rng, len(clips))
    rirs = room_impulse_responses(room, rng)
    target = reverberate(x, rirs[0])
    crowd = sum(reverberate(clip, rir) for clip, rir in zip(clips, rirs[1:]))
    return peak_normalise(target + _scale_to_snr(target, crowd, _uniform(rng, BABBLE_SNR_DB)))


# --------------------------------------------------------------------------------------------- broadcast

def coloured_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with a spectral slope drawn between brown and white (audiomentations)."""
    decay = _uniform(rng, NOISE_DECAY_DB_PER_OCTAVE)
    with _library_rngs_seeded_from(rng):
        noise = generate_decaying_white_noise(size=n, beta=decay, sample_rate=SAMPLE_RATE, n_fft=NOISE_N_FFT)
    return np.asarray(noise, dtype=np.float64)


def music_bed(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS music-like background: major/minor triads of harmonic tones, Hann cross-faded, tremolo."""
    t = np.arange(n) / SAMPLE_RATE
    hop = max(1, int(_uniform(rng, CHORD_DURATION_S) * SAMPLE_RATE))
    window = signal.windows.hann(2 * hop, sym=False)  # 50 % overlap-add of Hann windows sums to one
    bed = np.zeros(n + 3 * hop)
    for start in range(-hop, n, hop):
        root, third = _uniform(rng, CHORD_ROOT_HZ), (4 if rng.random() < 0.5 else 3)
        span = np.arange(start, start + 2 * hop)
        chord = np.zeros(2 * hop)
        for semitones in (0, third, 7):
            f0 = root * 2.0 ** (semitones / 12.0)
            for k in range(1, CHORD_HARMONICS + 1):
                if k * f0 < SAMPLE_RATE / 2:
                    chord += np.sin(2 * np.pi * k * f0 * span / SAMPLE_RATE + rng.uniform(0, 2 * np.pi)) / k
        bed[span + hop] += chord * window
    tremolo_hz, tremolo_phase = _uniform(rng, TREMOLO_HZ), rng.uniform(0, 2 * np.pi)
    tremolo = 1.0 + TREMOLO_DEPTH * np.sin(2 * np.pi * tremolo_hz * t + tremolo_phase)
    music = bed[hop:hop + n] * tremolo
    level = _rms(music)
    return music / level if level > 0 else music


def broadcast(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noisy broadcast: speech over coloured noise plus a music bed, the whole background at 5-15 dB SNR."""
    x = np.asarray(audio, dtype=np.float64)
    snr_db = _uniform(rng, BROADCAST_SNR_DB)
    music_gain = 10.0 ** (_uniform(rng, MUSIC_TO_NOISE_DB) / 20.0)
    background = coloured_noise(len(x), rng) + music_gain * music_bed(len(x), rng)
    return peak_normalise(x + _scale_to_snr(x, background, snr_db))


# -------------------------------------------------------------------------------------------- registry

DOMAINS: Dict[str, Domain] = {
    "read": Domain("read", "clean read speech, only peak-normalised", {"output_peak": OUTPUT_PEAK}),
    "telephone": Domain(
        "telephone",
        "narrow-band phone line: 8 kHz soxr resampling, 300-3400 Hz band-pass, G.711 mu-law codec, line hiss",
        {"narrowband_rate_hz": PHONE_RATE, "resampler": f"soxr {PHONE_RESAMPLER_QUALITY}",
         "band_hz": list(PHONE_BAND_HZ), "butterworth_order": PHONE_BUTTER_ORDER,
         "mu_law_channels": MU_LAW_CHANNELS, "codec_input_peak": CODEC_INPUT_PEAK,
         "line_snr_db": list(LINE_SNR_DB), "output_peak": OUTPUT_PEAK},
    ),
    "meeting": Domain(
        "meeting",
        "far-field meeting room: ShoeBox reverberation (pyroomacoustics) plus reverberant babble of others",
        {"room_size_m": [list(b) for b in ROOM_SIZE_M], "rt60_s": list(RT60_S),
         "source_mic_distance_m": list(SOURCE_MIC_DISTANCE_M), "mic_height_m": list(MIC_HEIGHT_M),
         "talker_height_m": list(TALKER_HEIGHT_M), "wall_margin_m": WALL_MARGIN_M,
         "babble_min_distance_m": BABBLE_MIN_DISTANCE_M, "ism_max_order": ISM_MAX_ORDER,
         "ray_tracing_rays": RAY_TRACING_RAYS,
         "wall_scattering": WALL_SCATTERING, "babble_snr_db": list(BABBLE_SNR_DB),
         "fallback_babble_talkers": FALLBACK_BABBLE_TALKERS, "output_peak": OUTPUT_PEAK},
    ),
    "broadcast": Domain(
        "broadcast",
        "noisy broadcast: speech over coloured noise and a synthesized chord-music bed",
        {"snr_db": list(BROADCAST_SNR_DB), "noise_decay_db_per_octave": list(NOISE_DECAY_DB_PER_OCTAVE),
         "noise_n_fft": NOISE_N_FFT, "music_to_noise_db": list(MUSIC_TO_NOISE_DB),
         "chord_root_hz": list(CHORD_ROOT_HZ), "chord_duration_s": list(CHORD_DURATION_S),
         "chord_harmonics": CHORD_HARMONICS, "tremolo_hz": list(TREMOLO_HZ), "tremolo_depth": TREMOLO_DEPTH,
         "output_peak": OUTPUT_PEAK},
    ),
    "accent": Domain(
        "accent",
        "acoustically clean speech in regional eSpeak NG accents (the voice is chosen upstream)",
        {"voices": list(ACCENT_VOICES), "output_peak": OUTPUT_PEAK},
    ),
}

_APPLY: Dict[str, Callable[[np.ndarray, np.random.Generator, Sequence[np.ndarray]], np.ndarray]] = {
    "read": lambda x, rng, babble: read(x),
    "telephone": lambda x, rng, babble: telephone(x, rng),
    "meeting": meeting,
    "broadcast": lambda x, rng, babble: broadcast(x, rng),
    "accent": lambda x, rng, babble: accent(x),
}


def apply_domain(name: str, audio: np.ndarray, rng: np.random.Generator,
                 babble: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Apply domain ``name`` to one clean 16 kHz mono utterance; ``babble`` feeds ``meeting`` only.

    Returns float32 of the input's length, finite, peak ``OUTPUT_PEAK``; silence stays silence.
    """
    if name not in _APPLY:
        raise ValueError(f"unknown domain {name!r}; available: {', '.join(DOMAINS)}")
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio (a 1-D array), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("audio contains NaN or infinite samples")
    if not np.any(x):
        return np.zeros(len(x), dtype=np.float32)
    out = _APPLY[name](x.astype(np.float64), rng, babble)
    assert out.dtype == np.float32 and out.shape == x.shape and np.all(np.isfinite(out))
    return out
