"""A thin ctypes binding to eSpeak NG, from the library and voice data that the
``espeakng-loader`` wheel ships (so no system package is needed).

Only what speech synthesis needs: initialise once per process, pick a voice (with variant,
e.g. ``en-gb-scotland+f3``), set rate and pitch, and synthesise UTF-8 text to 16-bit samples,
with the phone alignment eSpeak NG reports as phoneme events (:meth:`ESpeak.synthesise_aligned`).
eSpeak NG keeps global state, so a process synthesises one utterance at a time; parallelism
comes from worker processes.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import List, Optional, Tuple

import espeakng_loader
import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
ESPEAK_RATE, ESPEAK_PITCH, ESPEAK_RANGE = 1, 3, 4
INITIALIZE_PHONEME_EVENTS = 0x0001  # speak_lib.h: espeakINITIALIZE_PHONEME_EVENTS
# espeak_EVENT_TYPE values (speak_lib.h) that the alignment reads
EVENT_LIST_TERMINATED, EVENT_END, EVENT_MSG_TERMINATED, EVENT_PHONEME = 0, 5, 6, 7
PAUSE_PREFIX = "_"
"""eSpeak NG's pause phonemes (``_``, ``_:``, ``_!``, ``_|`` ...) are silence, not phones."""
OTHER_PAUSES = frozenset({"!"})
"""Pauses not named with ``_``: Dutch's ``!`` (a break inside compounds), a pause in the nl
phoneme table and in no table a sound (read from the wheel's ``phontab``)."""
LANGUAGE_SWITCH = "("
"""``(en)``: eSpeak NG switched language for a word. A marker, not a sound: neither a phone nor
the end of one."""
STRESS_MARKS = "',"
"""Primary and secondary stress, which eSpeak NG prefixes to a stressed syllable's vowel
(``'oU``): stress, not a phone of its own, so the alignment drops it (``oU``)."""

_libc = ctypes.CDLL(None)
_libc.srand.argtypes = [ctypes.c_uint]


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    """speak_lib.h's espeak_EVENT."""

    _fields_ = [
        ("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
        ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p), ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class Voice:
    name: str
    language: str
    identifier: str


class ESpeakError(RuntimeError):
    pass


@dataclass(frozen=True)
class Event:
    """An eSpeak NG event of one synthesis call that the alignment reads."""

    type: int
    """EVENT_PHONEME, EVENT_END or EVENT_MSG_TERMINATED."""
    sample: int
    """Where it happens, in samples at the engine's rate from the start of this call's audio.
    (``sample``, not ``audio_position``: that is the same point truncated to whole milliseconds.)"""
    name: str = ""
    """The phoneme's eSpeak NG mnemonic (phoneme events only), e.g. ``'oU``, ``_:``."""


Phone = Tuple[float, float, str]
"""(onset, offset, phone): seconds from the start of the clip, the phone without stress marks."""


def is_pause(name: str) -> bool:
    return name.startswith(PAUSE_PREFIX) or name in OTHER_PAUSES


def is_language_switch(name: str) -> bool:
    return name.startswith(LANGUAGE_SWITCH)


def phones_from_events(events: List[Event], n_samples: int, sample_rate: int) -> List[Phone]:
    """The non-pause phones of one synthesis call: each from its phoneme event to the next
    phoneme event (a pause's included; a language switch is no boundary), the last one to the
    END / MSG_TERMINATED event after it or the audio's end. Phones of zero length (two events at
    one sample) are left out."""
    boundaries = sorted((e for e in events if e.type in (EVENT_END, EVENT_MSG_TERMINATED)
                         or (e.type == EVENT_PHONEME and not is_language_switch(e.name))),
                        key=lambda e: e.sample)  # stable: events at one sample keep eSpeak NG's order
    phones: List[Phone] = []
    for i, event in enumerate(boundaries):
        if event.type != EVENT_PHONEME or is_pause(event.name):
            continue
        end = boundaries[i + 1].sample if i + 1 < len(boundaries) else n_samples
        start, end = min(event.sample, n_samples), min(end, n_samples)
        label = event.name.lstrip(STRESS_MARKS)
        if end > start and label:
            phones.append((start / sample_rate, end / sample_rate, label))
    return phones


class ESpeak:
    """The process's eSpeak NG engine (use :func:`engine`)."""

    def __init__(self, phoneme_events: bool = True) -> None:
        """``phoneme_events=False`` initialises as eqssl did before alignments (options 0): the
        tests compare the audio of both, which must be bit-identical."""
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        self.lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        self.lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        data = espeakng_loader.get_data_path().encode()
        options = INITIALIZE_PHONEME_EVENTS if phoneme_events else 0
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data, options)
        if self.sample_rate <= 0:
            raise ESpeakError(f"eSpeak NG failed to initialise from {data.decode()}")
        self._chunks: List[np.ndarray] = []
        self._events: List[Event] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: eSpeak calls it later
        self.lib.espeak_SetSynthCallback(self._callback)
        self._voices: Optional[List[Voice]] = None
        self.phoneme_events = phoneme_events
        self.events: List[Event] = []
        """The phoneme, END and MSG_TERMINATED events of the last :meth:`synthesise`."""

    def _collect(self, samples, count, events) -> int:
        if count > 0 and samples:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        i = 0
        while events and events[i].type != EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type in (EVENT_PHONEME, EVENT_END, EVENT_MSG_TERMINATED):
                # id.string: zero-terminated unless the name fills all 8 bytes (c_char * 8 reads either)
                name = event.id.string.decode("utf-8", "replace") if event.type == EVENT_PHONEME else ""
                self._events.append(Event(event.type, event.sample, name))
            i += 1
        return 0

    def voices(self) -> List[Voice]:
        """Every voice of the shipped data, with its main language."""
        if self._voices is None:
            found = []
            array = self.lib.espeak_ListVoices(None)
            i = 0
            while array[i]:
                voice = array[i].contents
                raw = ctypes.string_at(voice.languages, 64)
                language = raw[1:].split(b"\0", 1)[0].decode()  # first byte: priority
                found.append(Voice(voice.name.decode(), language, voice.identifier.decode()))
                i += 1
            self._voices = found
        return self._voices

    def set_random_seed(self, seed: int) -> None:
        """Seed eSpeak NG's own noise generator (its output also depends on what this process
        synthesised before: see eqssl.corpus.make_corpus)."""
        self.lib.espeak_ng_SetRandSeed(seed)
        _libc.srand(seed % 2**32)  # some code paths of the library call the C library's rand()

    def languages(self) -> List[str]:
        return sorted({v.language for v in self.voices()})

    def synthesise(self, text: str, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> np.ndarray:
        """Speak ``text`` with ``voice`` (a language such as ``fr`` or ``en-gb-scotland``, optionally
        ``+variant``): float32 samples in [-1, 1] at :attr:`sample_rate`. Its events are left in
        :attr:`events`."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ESpeakError(
                f"unknown eSpeak NG voice {voice!r}; languages available: {', '.join(self.languages())}"
            )
        for parameter, value in ((ESPEAK_RATE, rate), (ESPEAK_PITCH, pitch), (ESPEAK_RANGE, pitch_range)):
            self.lib.espeak_SetParameter(parameter, int(value), 0)
        encoded = text.encode("utf-8") + b"\0"
        self._chunks, self._events = [], []
        status = self.lib.espeak_Synth(encoded, len(encoded), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
        if status != 0:
            raise ESpeakError(f"eSpeak NG could not synthesise {text[:40]!r} (error {status})")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
        self._chunks = []
        self.events = self._events
        return audio.astype(np.float32) / 32768.0

    def synthesise_aligned(self, text: str, voice: str, rate: int = 175, pitch: int = 50,
                           pitch_range: int = 50) -> Tuple[np.ndarray, List[Phone]]:
        """:meth:`synthesise`, and the non-pause phones of the audio (:func:`phones_from_events`),
        in seconds from its start. Needs an engine with ``phoneme_events`` (the default)."""
        if not self.phoneme_events:
            raise ESpeakError("this eSpeak NG engine was initialised without phoneme events")
        audio = self.synthesise(text, voice, rate=rate, pitch=pitch, pitch_range=pitch_range)
        return audio, phones_from_events(self.events, len(audio), self.sample_rate)


_engine: Optional[ESpeak] = None
_lock = threading.Lock()


def engine() -> ESpeak:
    """This process's engine, initialised on first use."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = ESpeak()
        return _engine
