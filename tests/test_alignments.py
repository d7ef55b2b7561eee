"""Phone alignments of the built-in corpus from eSpeak NG's phoneme events: sane, on the voiced
audio, unchanged by the domains, the audio unchanged by turning the events on, and the .item and
.phn files of a built corpus in agreement with its manifests."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyroomacoustics as pra
import pytest
import soxr
from scipy import signal

from eqssl.corpus import alignments, domains
from eqssl.corpus import make_corpus as generator
from eqssl.corpus.domains import DOMAINS, apply_domain
from eqssl.corpus.espeak import EVENT_END, EVENT_PHONEME, Event, engine, phones_from_events
from eqssl.corpus.text import sentence

SR = 16000
# A voice of every language of the built-in presets (recipes/corpus/*.yaml).
VOICES = {"en": "en-us", "fr": "fr", "nl": "nl", "tr": "tr", "sv": "sv", "ta": "ta", "fi": "fi",
          "de": "de", "es": "es", "it": "it", "pl": "pl", "cs": "cs"}
MAX_SHIFT_MS = {"read": 0.0, "accent": 0.0, "broadcast": 0.0, "telephone": 1.5, "meeting": 10.0}
"""How far the best match of a domain's output may lie from the clean clip (measured on 24 clips:
telephone 0.9-1.4 ms, its causal band-pass; meeting mostly 0, at worst 10.75 ms, where a
reflection matches the clean clip better than the direct sound, which stays in place)."""


def synthesise(text: str, voice: str, rate: int = 175) -> tuple:
    """Clean 16 kHz audio and its phones, as eqssl-make-corpus's speak() makes them."""
    tts = engine()
    audio, phones = tts.synthesise_aligned(text, voice, rate=rate)
    return soxr.resample(audio, tts.sample_rate, SR, quality="HQ").astype(np.float32), phones


@pytest.fixture(scope="module")
def utterances() -> dict:
    """Three sentences of 6-10 words in every language: {language: [(audio, phones), ...]}."""
    found = {}
    for language, voice in VOICES.items():
        rng = np.random.default_rng(7)
        found[language] = [synthesise(sentence(language, int(rng.integers(6, 11)), rng), f"{voice}+m{k + 1}",
                                      rate=150 + 20 * k) for k in range(3)]
    return found


def frame_db(audio: np.ndarray, hop: int = SR // 100) -> np.ndarray:
    """Energy of every 10 ms frame, in dB below the loudest frame."""
    frames = audio[:len(audio) // hop * hop].astype(np.float64).reshape(-1, hop)
    energy = np.mean(np.square(frames), axis=1)
    return 10 * np.log10(energy / energy.max() + 1e-12)


def shift_ms(clean: np.ndarray, out: np.ndarray, max_ms: float = 40.0) -> float:
    """Lag of ``out`` behind ``clean`` (ms) at the peak of their waveforms' cross-correlation."""
    correlation = signal.correlate(out.astype(np.float64), clean.astype(np.float64), mode="full")
    middle, most = len(clean) - 1, int(max_ms * SR / 1000)
    return (int(np.argmax(correlation[middle - most:middle + most + 1])) - most) * 1000 / SR


# --------------------------------------------------------------------------------- from events to phones

def test_phones_from_events_skip_pauses_switches_and_stress():
    events = [Event(EVENT_PHONEME, 100, "h"), Event(EVENT_PHONEME, 300, "'oU"), Event(EVENT_PHONEME, 600, "(fr)"),
              Event(EVENT_PHONEME, 700, "_:"), Event(EVENT_PHONEME, 900, "n"), Event(EVENT_PHONEME, 900, "!"),
              Event(EVENT_PHONEME, 1000, "a"), Event(EVENT_PHONEME, 1000, "b"), Event(EVENT_END, 1200)]
    phones = phones_from_events(events, 1300, 1000)
    # 'oU runs over the language switch to the pause; n ends where Dutch's pause "!" starts (zero
    # length: left out); a is as long as nothing (b at the same sample); b ends at END
    assert phones == [(0.1, 0.3, "h"), (0.3, 0.7, "oU"), (1.0, 1.2, "b")]


def test_neighbours_and_frame_labels_of_a_clip():
    phones = [[0.012, 0.03, "b"], [0.03, 0.05, "a"], [0.08, 0.1, "t"]]
    assert alignments.neighbours(phones) == [("SIL", "a"), ("b", "SIL"), ("SIL", "SIL")]
    # frames centred at 5, 15, ..., 105 ms; 1760 samples: 11 frames
    assert alignments.frame_labels(phones, 1760, SR) == \
        ["SIL", "b", "b", "a", "a", "SIL", "SIL", "SIL", "t", "t", "SIL"]
    assert alignments.record_phones([(-0.00001, 0.01234, "x"), (0.2, 0.20001, "y"), (0.5, 0.70004, "z")], 0.70003) == \
        [[0.0, 0.0123, "x"], [0.5, 0.7, "z"]]


# ------------------------------------------------------------------------------------------ on real speech

def test_audio_is_bit_identical_with_phoneme_events_on_and_off():
    """Each engine in a fresh process (eSpeak NG's state is global): the same utterances, seeded
    the same, with espeakINITIALIZE_PHONEME_EVENTS and with options 0 as before alignments."""
    script = (
        "import hashlib, sys, numpy as np\n"
        "from eqssl.corpus.espeak import ESpeak\n"
        "from eqssl.corpus.text import sentence\n"
        "tts = ESpeak(phoneme_events=sys.argv[1] == 'on')\n"
        "digest, n = hashlib.sha256(), 0\n"
        "voices = [('en', 'en-us+m1'), ('fr', 'fr+f2'), ('nl', 'nl+m3'),\n"
        "          ('tr', 'tr+m4'), ('ta', 'ta+f3'), ('de', 'de+m2')]\n"
        "for k, (language, voice) in enumerate(voices):\n"
        "    rng = np.random.default_rng(k)\n"
        "    for j in range(3):\n"
        "        tts.set_random_seed(100 * k + j)\n"
        "        audio = tts.synthesise(sentence(language, 8, rng), voice, rate=150 + 15 * j, pitch=40 + 10 * j)\n"
        "        digest.update(audio.tobytes()); n += len(audio)\n"
        "print(n, digest.hexdigest())\n"
    )
    runs = {events: subprocess.Popen([sys.executable, "-c", script, events], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for events in ("on", "off")}
    outputs = {}
    for events, process in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        outputs[events] = stdout.split()
    assert int(outputs["on"][0]) > 22050 * 18  # 18 sentences at 22.05 kHz, over a second each
    assert outputs["on"] == outputs["off"]


def test_phones_lie_in_their_clip_in_order_and_last_a_plausible_time(utterances):
    for language, clips in utterances.items():
        durations = []
        for audio, phones in clips:
            assert len(phones) >= 10, language
            previous_offset = 0.0
            for onset, offset, phone in phones:
                assert previous_offset <= onset < offset <= len(audio) / SR + 1e-3, (language, phone, onset, offset)
                assert phone and not phone.startswith("_") and not phone.startswith("(") and "'" not in phone
                previous_offset = offset
            durations += [offset - onset for onset, offset, _ in phones]
        assert 0.040 < np.mean(durations) < 0.200, (language, np.mean(durations))


@pytest.mark.parametrize("text, voice", [("hello", "en-us+m1"), ("Hello. Morning. Welcome.", "en-us+m3"),
                                         ("bonjour, madame", "fr+f2"), ("Kiitos, hyvää huomenta.", "fi+m4")])
def test_phones_cover_the_voiced_part_and_pauses_are_silent(text, voice):
    """A clip silent but for its words (half a second of silence each side, and eSpeak NG's
    pauses between clauses): the loud frames lie in aligned phones (or within a frame of one:
    a vowel's decay), and nearly all of the aligned time is voiced."""
    audio, phones = synthesise(text, voice)
    pad = np.zeros(SR // 2, dtype=np.float32)
    audio = np.concatenate([pad, audio, pad])
    phones = [(onset + 0.5, offset + 0.5, phone) for onset, offset, phone in phones]
    db = frame_db(audio)
    centres = (np.arange(len(db)) + 0.5) / 100
    aligned = np.zeros(len(db), dtype=bool)
    near = np.zeros(len(db), dtype=bool)
    for onset, offset, _ in phones:
        aligned |= (centres >= onset) & (centres < offset)
        near |= (centres >= onset - 0.01) & (centres < offset + 0.01)
    assert not np.any((db > -30) & ~near), centres[(db > -30) & ~near]
    assert np.mean(db[aligned] > -50) >= 0.9
    pauses = ~near & (centres > phones[0][0]) & (centres < phones[-1][1])
    if "." in text or "," in text:
        # a pause of 100 ms or more, quiet (eSpeak NG lets a clause's last phone fade out into it)
        assert pauses.sum() >= 10 and np.median(db[pauses]) < -35


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_timing_survives_every_domain(domain, utterances):
    """The domain's output matches the clean clip best at (almost) no lag, so the clean clip's
    alignment is the domain clip's: telephone's causal filters delay it by about a millisecond."""
    clips = utterances["en"]
    lags = []
    for k, (audio, _) in enumerate(clips):
        babble = [other for j, (other, _) in enumerate(clips) if j != k]
        out = apply_domain(domain, audio, np.random.default_rng(100 + k), babble)
        lags.append(shift_ms(audio, out))
    assert max(abs(lag) for lag in lags) <= MAX_SHIFT_MS[domain], (domain, lags)
    assert np.median(np.abs(lags)) <= (0.5 if domain == "meeting" else MAX_SHIFT_MS[domain]), lags  # mostly 0
    if domain == "telephone":
        assert all(0.5 <= lag <= 1.5 for lag in lags), lags  # a delay, and as documented


def test_meeting_keeps_the_direct_sound_in_place():
    """meeting aligns the reverberant clip to its room impulse response's peak (domains.reverberate):
    in the rooms it draws that peak is the direct sound, so speech starts at its aligned time."""
    for seed in range(4):
        room = domains.draw_room(np.random.default_rng(seed), 0)
        rir = domains.room_impulse_responses(room, np.random.default_rng(seed))[0]
        distance = float(np.linalg.norm(np.subtract(room.target, room.mic)))
        # pyroomacoustics centres each path on a fractional-delay filter of frac_delay_length taps
        direct = distance / pra.constants.get("c") * SR + pra.constants.get("frac_delay_length") // 2
        assert abs(int(np.argmax(np.abs(rir))) - direct) <= 1.0, (seed, room)


# ------------------------------------------------------------------------------------------ a built corpus

def read_split(folder: Path, split: str) -> tuple:
    manifest = [line.split("\t") for line in (folder / f"{split}.tsv").read_text().splitlines()[1:]]
    items = [line.split() for line in (folder / f"{split}.item").read_text(encoding="utf-8").splitlines()]
    frames = [line.split() for line in (folder / f"{split}.phn").read_text(encoding="utf-8").splitlines()]
    return manifest, items, frames


def test_item_and_phn_files_agree_with_the_manifests(multilingual_corpus):
    rows = {}
    for record in (multilingual_corpus / "chunks").glob("*.json"):
        for row in json.loads(record.read_text(encoding="utf-8"))["rows"]:
            rows[row["path"]] = row
    checked = 0
    for manifest_file in sorted(multilingual_corpus.glob("*/*/*.tsv")):
        folder, split = manifest_file.parent, manifest_file.stem
        manifest, items, frames = read_split(folder, split)
        assert items[0] == ["#file", "onset", "offset", "#phone", "prev-phone", "next-phone", "speaker"]
        assert len(frames) == len(manifest) > 0
        samples = {}
        for (path, n), line in zip(manifest, frames):
            stem = Path(path).stem
            assert line[0] == stem and len(line) - 1 == int(n) // 160, (manifest_file, stem)
            samples[stem] = int(n)
            phones = rows[path]["phones"]
            assert {label for label in line[1:]} <= {p for _, _, p in phones} | {"SIL"}
            assert len(set(line[1:]) - {"SIL"}) > 5
        assert len(samples) == len(manifest)  # stems are unique within a split
        assert len(items) - 1 == sum(len(rows[path]["phones"]) for path, _ in manifest)
        speakers = {Path(path).stem: rows[path]["voice"] for path, _ in manifest}
        for stem, onset, offset, phone, before, after, speaker in items[1:]:
            assert 0 <= float(onset) < float(offset) <= samples[stem] / SR, (manifest_file, stem, onset, offset)
            assert speaker == speakers[stem] and "+" in speaker
            assert phone != "SIL" and before and after
        checked += 1
    assert checked == 3 * 2 + 4 * 4  # every pre-training and fine-tuning split of the preset


def test_an_old_corpus_gains_alignments_with_the_same_audio(multilingual_corpus, tmp_path):
    """Chunk records without "phones" (as made before alignments) are incomplete: resynthesised
    in place into the same audio (same SHA-256), their alignments back as they were."""
    copy = tmp_path / "corpus"
    shutil.copytree(multilingual_corpus, copy)
    for path in copy.rglob("*.tsv"):  # rerooted, as if made in this folder
        lines = path.read_text().splitlines()
        lines[0] = str(copy / "audio")
        path.write_text("\n".join(lines) + "\n")
    for path in [*copy.rglob("*.item"), *copy.rglob("*.phn")]:
        path.unlink()
    old = sorted((copy / "chunks").glob("*.json"))[::9]
    before = {}
    for record_file in old:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        before[record_file.name] = record["rows"]
        record["rows"] = [{k: v for k, v in row.items() if k != "phones"} for row in record["rows"]]
        record_file.write_text(json.dumps(record))
        assert not generator.chunk_is_complete(dict(record, done_file=str(record_file), audio_root=str(copy / "audio")))
    generator.make_corpus(str(copy), "multilingual", "tiny", seed=0, workers=1, progress=False)
    for record_file in old:
        assert json.loads(record_file.read_text(encoding="utf-8"))["rows"] == before[record_file.name]
    for path in multilingual_corpus.rglob("*"):
        if path.suffix in (".flac", ".item", ".phn"):
            assert (copy / path.relative_to(multilingual_corpus)).read_bytes() == path.read_bytes(), path
