"""The acoustic domains measured on real signals: band limits, codec distortion, reverberation, SNRs."""

import json
import random

import numpy as np
import pyroomacoustics as pra
import pytest
from scipy import signal

from eqssl.corpus import domains
from eqssl.corpus.domains import DOMAINS, apply_domain

SR = 16000
MS = SR // 1000


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def speechlike() -> np.ndarray:
    """2 s of a harmonic-rich sawtooth with a slow pitch glide plus a little white noise (fixed seed)."""
    t = np.arange(2 * SR) / SR
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.7 * t)) / SR
    x = signal.sawtooth(phase) + 0.1 * rng(0).standard_normal(len(t))
    return (0.9 * x / np.max(np.abs(x))).astype(np.float32)


@pytest.fixture(scope="module")
def white() -> np.ndarray:
    x = rng(1).standard_normal(2 * SR)
    return (0.9 * x / np.max(np.abs(x))).astype(np.float32)


@pytest.fixture(scope="module")
def babble() -> list:
    """Three 'other talkers': sawtooth buzz at other pitches plus noise, of lengths unlike the target's."""
    clips = []
    for k, (f0, seconds) in enumerate([(110, 1.3), (190, 0.7), (240, 2.6)]):
        t = np.arange(int(seconds * SR)) / SR
        clips.append((0.3 * signal.sawtooth(2 * np.pi * f0 * t) + 0.05 * rng(10 + k).standard_normal(len(t)))
                     .astype(np.float32))
    return clips


def band_db(freqs: np.ndarray, psd: np.ndarray, low: float, high: float) -> float:
    inside = (freqs >= low) & (freqs < high)
    return 10 * np.log10(np.mean(psd[inside]))


def projection_snr_db(output: np.ndarray, clean: np.ndarray) -> float:
    """SNR of ``output`` w.r.t. ``clean``: least-squares projection onto ``clean`` is the signal part."""
    y, s = output.astype(np.float64), clean.astype(np.float64)
    part = (y @ s) / (s @ s) * s
    return 10 * np.log10((part @ part) / ((y - part) @ (y - part)))


# ------------------------------------------------------------------------------------------- telephone

def test_telephone_is_band_limited_to_300_3400_hz(white):
    out = apply_domain("telephone", white, rng(3))
    freqs, psd = signal.welch(out, SR, nperseg=1024)
    passband = band_db(freqs, psd, 300, 3400)
    assert passband - band_db(freqs, psd, 3600, 8000) >= 30.0
    assert passband - band_db(freqs, psd, 20, 200) >= 20.0
    # and the passband itself is kept: no more than a few dB of ripple between its halves
    assert abs(band_db(freqs, psd, 400, 1500) - band_db(freqs, psd, 1500, 3200)) < 3.0


def test_mu_law_codec_quantises_to_8_bits(speechlike):
    coded = domains.mu_law_codec(speechlike)
    assert len(np.unique(coded)) <= 256
    assert len(np.unique(speechlike)) > 10_000
    assert 30.0 < projection_snr_db(coded, speechlike) < 45.0  # G.711 mu-law: about 38 dB


def test_telephone_codec_adds_distortion_beyond_the_band_pass(speechlike):
    with_codec = domains.telephone(speechlike, rng(4))
    band_pass_only = domains.telephone(speechlike, rng(4), codec=False)  # same draws, no mu-law
    assert not np.array_equal(with_codec, band_pass_only)
    assert 30.0 < projection_snr_db(with_codec, band_pass_only) < 45.0


# --------------------------------------------------------------------------------------------- meeting

def click_train(spacing_s: float = 0.5) -> tuple:
    clicks = np.zeros(2 * SR, dtype=np.float32)
    at = np.arange(0, len(clicks), int(spacing_s * SR))
    clicks[at] = 1.0
    return clicks, at


def mean_power(y: np.ndarray, at: np.ndarray, start_ms: int, stop_ms: int) -> float:
    """Mean power per sample in the window [start_ms, stop_ms) after each click, averaged over clicks."""
    y = y.astype(np.float64)
    return float(np.mean([np.mean(y[i + start_ms * MS:i + stop_ms * MS] ** 2) for i in at]))


@pytest.mark.parametrize("seed", [0, 1])
def test_room_reverberation_decays_over_tens_of_ms(seed):
    r = rng(seed)
    room = domains.draw_room(r, n_babblers=0)
    rir = domains.room_impulse_responses(room, r)[0]
    clicks, at = click_train()
    dry, wet = clicks, domains.reverberate(clicks, rir)
    assert mean_power(dry, at, 2, 30) == 0.0
    direct = mean_power(wet, at, 0, 2)
    early, middle, late = (mean_power(wet, at, a, b) for a, b in ((2, 30), (60, 120), (200, 300)))
    assert early > 0.05 * direct  # the energy does not stop with the click...
    assert early > middle > late > 0.0  # ...it decays
    assert domains.RT60_S[0] <= room.rt60_s <= domains.RT60_S[1]
    measured = pra.experimental.measure_rt60(rir, SR)
    assert 0.7 * room.rt60_s < measured < 1.5 * room.rt60_s


def test_meeting_click_train_rings_on(babble):
    clicks, at = click_train()
    out = apply_domain("meeting", clicks, rng(5), babble)
    early, before_next = mean_power(out, at, 2, 30), mean_power(out, at, 400, 490)
    assert early > 0.05 * mean_power(out, at, 0, 2)
    assert 10 * np.log10(early / before_next) > 10.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_meeting_babble_fills_silent_gaps_at_the_documented_snr(speechlike, babble, seed):
    first, second = speechlike[:SR], speechlike[SR:]
    gap = np.zeros(int(1.5 * SR), dtype=np.float32)
    out = apply_domain("meeting", np.concatenate([first, gap, second]), rng(seed), babble).astype(np.float64)
    speech = np.concatenate([out[:SR], out[int(2.5 * SR):]])
    late_gap = out[int(2.0 * SR):int(2.5 * SR)]  # 1 s after the speech stops: its reverb tail has died
    speech_power, gap_power = np.mean(speech**2), np.mean(late_gap**2)
    assert np.sqrt(gap_power) > 0.005  # well above zero (output peak is 0.5)
    # SNR is defined over the whole utterance, gap included: undo that dilution before comparing
    snr = 10 * np.log10((speech_power - gap_power) / gap_power) - 10 * np.log10(len(out) / len(speech))
    low, high = domains.BABBLE_SNR_DB
    assert low - 1.5 < snr < high + 1.5


def test_meeting_without_babble_clips_still_adds_babble(speechlike):
    gap = np.zeros(int(1.5 * SR), dtype=np.float32)
    out = apply_domain("meeting", np.concatenate([speechlike, gap, speechlike]), rng(6))
    assert np.sqrt(np.mean(out[int(3.0 * SR):int(3.5 * SR)].astype(np.float64) ** 2)) > 0.005


# ------------------------------------------------------------------------------------------- broadcast

def test_broadcast_snr_is_in_the_documented_range(speechlike):
    outputs = [apply_domain("broadcast", speechlike, rng(seed)) for seed in range(8)]
    snrs = [projection_snr_db(out, speechlike) for out in outputs]
    low, high = domains.BROADCAST_SNR_DB
    assert all(low - 0.5 < snr < high + 0.5 for snr in snrs), snrs
    assert np.std(snrs) > 1.0  # drawn per utterance, not fixed


def test_broadcast_background_has_music_and_noise(speechlike):
    background = domains.music_bed(2 * SR, rng(7))
    assert np.isclose(np.sqrt(np.mean(background**2)), 1.0)
    freqs, psd = signal.welch(background, SR, nperseg=4096)
    assert np.max(psd) > 100 * np.median(psd)  # tonal: strong harmonic peaks
    noise = domains.coloured_noise(2 * SR, rng(8))
    assert np.isclose(np.sqrt(np.mean(noise.astype(np.float64) ** 2)), 1.0, rtol=1e-3)


# --------------------------------------------------------------------------------------- read, accent

@pytest.mark.parametrize("name", ["read", "accent"])
def test_clean_domains_only_peak_normalise(speechlike, name):
    expected = speechlike.astype(np.float64) * (0.5 / np.max(np.abs(speechlike)))
    out = apply_domain(name, speechlike, rng(0))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)


def test_accent_lists_its_voices():
    assert DOMAINS["accent"].params["voices"] == [
        "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc"]


# ----------------------------------------------------------------------------------------- every domain

def seed_global_generators(seed: int) -> None:
    """Python's, numpy's and pyroomacoustics' global generators, which the libraries draw from."""
    random.seed(seed)
    np.random.seed(seed)
    pra.random.seed(seed)


@pytest.mark.parametrize("length", [2 * SR, 12_345])
@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_every_domain_is_deterministic_and_well_formed(speechlike, babble, name, length):
    x = speechlike[:length]
    seed_global_generators(1)
    first = apply_domain(name, x, rng(11), babble)
    seed_global_generators(2)  # only the generator passed in may matter
    again = apply_domain(name, x.copy(), rng(11), babble)
    other = apply_domain(name, x, rng(12), babble)
    for out in (first, other):
        assert out.dtype == np.float32 and out.shape == x.shape
        assert np.all(np.isfinite(out))
        assert abs(np.max(np.abs(out)) - 0.5) < 1e-6
    assert first.tobytes() == again.tobytes()
    assert (first.tobytes() == other.tobytes()) == (name in ("read", "accent"))


@pytest.mark.parametrize("name", ["telephone", "meeting", "broadcast"])
def test_library_random_states_are_restored(speechlike, babble, name):
    random.seed(123)
    np.random.seed(456)
    pra_generator = pra.random.get_rng()
    py_state, np_state = random.getstate(), np.random.get_state()
    apply_domain(name, speechlike[:SR], rng(0), babble)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert pra.random.get_rng() is pra_generator


def test_the_input_is_not_modified(speechlike, babble):
    x = speechlike.copy()
    for name in DOMAINS:
        apply_domain(name, x, rng(0), babble)
    assert x.tobytes() == speechlike.tobytes()


def test_silence_stays_silent():
    for name in DOMAINS:
        out = apply_domain(name, np.zeros(SR, dtype=np.float32), rng(0))
        assert out.dtype == np.float32 and out.shape == (SR,) and not np.any(out)


def test_unknown_domain_lists_the_available_ones(speechlike):
    with pytest.raises(ValueError) as error:
        apply_domain("underwater", speechlike, rng(0))
    for name in ("read", "telephone", "meeting", "broadcast", "accent"):
        assert name in str(error.value)


def test_bad_audio_is_refused():
    with pytest.raises(ValueError, match="mono"):
        apply_domain("read", np.zeros((2, SR), dtype=np.float32), rng(0))
    with pytest.raises(ValueError, match="NaN"):
        apply_domain("read", np.array([0.1, np.nan], dtype=np.float32), rng(0))


def test_domain_records_are_json_ready():
    assert set(DOMAINS) == {"read", "telephone", "meeting", "broadcast", "accent"}
    for name, domain in DOMAINS.items():
        assert domain.name == name
        assert domain.description and "\n" not in domain.description
        assert json.loads(json.dumps(domain.params)) == domain.params
    assert DOMAINS["telephone"].params["band_hz"] == [300.0, 3400.0]
    assert DOMAINS["meeting"].params["rt60_s"] == list(domains.RT60_S)
