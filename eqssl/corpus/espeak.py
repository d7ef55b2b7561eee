"""A thin ctypes binding to eSpeak NG, from the library and voice data that the
``espeakng-loader`` wheel ships (so no system package is needed).

Only what speech synthesis needs: initialise once per process, pick a voice (with variant,
e.g. ``en-gb-scotland+f3``), set rate and pitch, and synthesise UTF-8 text to 16-bit samples.
eSpeak NG keeps global state, so a process synthesises one utterance at a time; parallelism
comes from worker processes.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import List, Optional

import espeakng_loader
import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
ESPEAK_RATE, ESPEAK_PITCH, ESPEAK_RANGE = 1, 3, 4

_libc = ctypes.CDLL(None)
_libc.srand.argtypes = [ctypes.c_uint]
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


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


class ESpeak:
    """The process's eSpeak NG engine (use :func:`engine`)."""

    def __init__(self) -> None:
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
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if self.sample_rate <= 0:
            raise ESpeakError(f"eSpeak NG failed to initialise from {data.decode()}")
        self._chunks: List[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: eSpeak calls it later
        self.lib.espeak_SetSynthCallback(self._callback)
        self._voices: Optional[List[Voice]] = None

    def _collect(self, samples, count, events) -> int:
        if count > 0 and samples:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
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
        ``+variant``): float32 samples in [-1, 1] at :attr:`sample_rate`."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ESpeakError(
                f"unknown eSpeak NG voice {voice!r}; languages available: {', '.join(self.languages())}"
            )
        for parameter, value in ((ESPEAK_RATE, rate), (ESPEAK_PITCH, pitch), (ESPEAK_RANGE, pitch_range)):
            self.lib.espeak_SetParameter(parameter, int(value), 0)
        encoded = text.encode("utf-8") + b"\0"
        self._chunks = []
        status = self.lib.espeak_Synth(encoded, len(encoded), 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
        if status != 0:
            raise ESpeakError(f"eSpeak NG could not synthesise {text[:40]!r} (error {status})")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)
        self._chunks = []
        return audio.astype(np.float32) / 32768.0


_engine: Optional[ESpeak] = None
_lock = threading.Lock()


def engine() -> ESpeak:
    """This process's engine, initialised on first use."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = ESpeak()
        return _engine
