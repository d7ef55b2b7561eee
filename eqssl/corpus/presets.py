"""Corpus presets: which pre-training shards and fine-tuning sets the built-in corpus synthesises.

A preset is a YAML file (docs/corpus.md). The built-in ones are ``recipes/corpus/NAME.yaml``,
selected by NAME (``multidomain`` and ``multilingual`` mirror the paper's two settings in
miniature); any other file is selected by its path (a value ending in ``.yaml``/``.yml`` or
holding a ``/``) and named after its file name.

A speaker is an eSpeak NG voice (language or accent) with a voice variant, a speaking rate and
a pitch. Rate and pitch are drawn for every utterance from the same ranges in every set, so two
sets share speakers exactly when they share a voice with a variant: pre-training and fine-tuning
sets must not (by default fine-tuning sets draw from variants that pre-training does not use),
so that every fine-tuning set has speakers, and by sampling sentences, never heard in pre-training.

:func:`load_preset` reads a preset and checks it before any synthesis; every problem raises one
:class:`PresetError` naming the file and the field (``pretrain[2].voices[0]``, counted from 0)
and listing what is available. :func:`inventory` lists what presets can use.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import yaml

PRETRAIN_VARIANTS = ("m1", "m2", "m3", "f1", "f2")
HELD_OUT_VARIANTS = ("m4", "m5", "f3", "f4")


@dataclass(frozen=True)
class SetSpec:
    """One shard (pre-training) or one labelled language/domain (fine-tuning)."""

    name: str
    language: str
    """wordfreq language of the text."""
    voices: Tuple[str, ...]
    """eSpeak NG voices (languages or accents) speakers are drawn from."""
    domain: str
    variants: Tuple[str, ...] = PRETRAIN_VARIANTS
    seen: bool = True
    """Whether this language/domain (and these speakers) occur in pre-training."""


@dataclass(frozen=True)
class Size:
    pretrain: Dict[str, int]
    finetune: Dict[str, int]
    words: Tuple[int, int]
    """Words per utterance; eSpeak NG speaks about 2.5 words a second."""


SIZES = {
    "tiny": Size({"train": 32, "valid": 8}, {"train_10m": 8, "train_1h": 16, "dev": 6, "test": 8}, (4, 12)),
    "small": Size({"train": 600, "valid": 60}, {"train_10m": 120, "train_1h": 720, "dev": 100, "test": 150}, (5, 30)),
    "full": Size({"train": 6000, "valid": 300}, {"train_10m": 120, "train_1h": 720, "dev": 300, "test": 500}, (5, 30)),
}


@dataclass(frozen=True)
class Preset:
    description: str
    pretrain: List[SetSpec] = field(default_factory=list)
    finetune: List[SetSpec] = field(default_factory=list)
    sizes: Dict[str, Size] = field(default_factory=dict)
    """Sizes of this preset's own (the ``sizes`` field), besides and before :data:`SIZES`."""


def recipes_folder() -> str:
    """The recipes folder: the repository's (an editable install or a checkout), else the copy a
    plain ``pip install`` puts under ``<prefix>/share/eqssl/recipes`` (setup.py's data_files)."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes")
    installed = os.path.join(sys.prefix, "share", "eqssl", "recipes")
    return checkout if os.path.isdir(checkout) or not os.path.isdir(installed) else installed


RECIPES = recipes_folder()
"""The recipes folder (eqssl.cli.reproduce uses the same), whatever the working folder."""
PRESET_DIR = os.path.join(RECIPES, "corpus")
"""The built-in presets: ``NAME.yaml``, selected by NAME."""

SET_FIELDS = {"pretrain": ("name", "language", "voices", "domain", "variants"),
              "finetune": ("name", "language", "voices", "domain", "variants", "seen")}
REQUIRED_SET_FIELDS = {"pretrain": ("name", "language", "voices", "domain"),
                       "finetune": ("name", "language", "voices", "domain", "seen")}
DEFAULT_VARIANTS = {"pretrain": PRETRAIN_VARIANTS, "finetune": HELD_OUT_VARIANTS}
"""A set without ``variants``: pre-training sets draw these, fine-tuning sets the held-out ones."""
PRESET_FIELDS = ("description", "pretrain", "finetune", "sizes")
SIZE_SPLITS = {"pretrain": ("train", "valid"), "finetune": ("train_10m", "train_1h", "dev", "test")}
"""The splits a size gives counts for: what the fairseq task and the fine-tuning recipes read."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
"""Set and size names: they become folder names and fairseq's per-shard log keys."""


class CorpusError(ValueError):
    """eqssl-make-corpus cannot do what was asked; nothing was synthesised."""


class PresetError(CorpusError):
    """A preset that cannot be used; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------- finding presets

def builtin_names() -> List[str]:
    """The built-in presets: the YAML files of recipes/corpus."""
    if not os.path.isdir(PRESET_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def is_file(preset: str) -> bool:
    """Whether ``preset`` names a file (ends in .yaml/.yml or holds a folder) rather than a built-in."""
    return preset.endswith((".yaml", ".yml")) or "/" in preset or os.sep in preset


def preset_name(preset: str) -> str:
    """The preset's name (a built-in's name, or a file's name without .yaml): folder names use it."""
    return os.path.splitext(os.path.basename(preset))[0] if is_file(preset) else preset


def preset_path(preset: str) -> str:
    """The file of a built-in name or a file path; PresetError if there is none."""
    if is_file(preset):
        if not os.path.isfile(preset):
            raise PresetError(f"{preset}: no such preset file")
        return preset
    names = builtin_names()
    if preset not in names:
        raise PresetError(f"unknown preset {preset!r}; available: {', '.join(names)} "
                          f"(the files of {PRESET_DIR}), or a preset .yaml file")
    return os.path.join(PRESET_DIR, preset + ".yaml")


def load_preset(preset: str, check: bool = True) -> Preset:
    """A built-in preset by name or a preset file by path, read and (``check``) checked against
    the eSpeak NG voices, word lists and domains there are; PresetError on any problem."""
    path = preset_path(preset)
    chosen = read_preset(path)
    if check:
        check_preset(chosen, path)
    return chosen


class _BuiltIn(Mapping):
    """name -> Preset of every built-in preset, read when asked for (not checked: see load_preset)."""

    def __getitem__(self, name: str) -> Preset:
        if name not in builtin_names():
            raise KeyError(name)
        return read_preset(os.path.join(PRESET_DIR, name + ".yaml"))

    def __iter__(self) -> Iterator[str]:
        return iter(builtin_names())

    def __len__(self) -> int:
        return len(builtin_names())


PRESETS: Mapping[str, Preset] = _BuiltIn()


# ---------------------------------------------------------------------------------------------- reading a file

class _Reader:
    """Type checks of a parsed YAML preset, each failure one PresetError naming source and field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> PresetError:
        return PresetError(f"{self.source}: {where}: {problem}" if where else f"{self.source}: {problem}")

    @staticmethod
    def _show(value: Any) -> str:
        kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
                dict: "a mapping", type(None): "nothing"}.get(type(value), type(value).__name__)
        hint = " (YAML reads unquoted yes/no/on/off/true/false as booleans: quote it)" if isinstance(value, bool) \
            else " (quote it)" if isinstance(value, (int, float)) else ""
        return f"{kind}, {value!r}{hint}"

    def mapping(self, value: Any, where: str, allowed: Sequence[str], required: Sequence[str],
                what: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping with {', '.join(required)}, got {self._show(value)}")
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                raise self.fail(f"{where}.{key}" if where else str(key),
                                f"unknown field{f' (did you mean {close[0]!r}?)' if close else ''}; "
                                f"{what} has: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                raise self.fail(where, f"missing field {key!r}; {what} has: {', '.join(allowed)} "
                                       f"(required: {', '.join(required)})")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a non-empty string, got {self._show(value)}")
        return value

    def name(self, value: Any, where: str) -> str:
        value = self.string(value, where)
        if not NAME.match(value):
            raise self.fail(where, f"{value!r} is not a usable name: letters, digits, _ and - only, "
                                   "starting with a letter or digit (it becomes a folder name)")
        return value

    def strings(self, value: Any, where: str) -> Tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"expected a non-empty list of strings, got {self._show(value)}")
        items = tuple(self.string(item, f"{where}[{i}]") for i, item in enumerate(value))
        for i, item in enumerate(items):
            if item in items[:i]:
                raise self.fail(f"{where}[{i}]", f"{item!r} is listed twice")
        return items

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {self._show(value)}")
        return value

    def count(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(where, f"expected a whole number of utterances >= 1, got {self._show(value)}")
        return value


def read_preset(path: str) -> Preset:
    """Parse a preset file into a Preset: fields, types and names (not voices or languages:
    :func:`check_preset`). PresetError on any problem."""
    reader = _Reader(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as error:
        raise reader.fail("", f"cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise reader.fail("", f"not valid YAML: {error}") from None
    if data is None:
        raise reader.fail("", "is empty; a preset has: " + ", ".join(PRESET_FIELDS))
    data = reader.mapping(data, "", PRESET_FIELDS, ("description", "pretrain", "finetune"), "a preset")
    description = reader.string(data["description"], "description").strip()
    sets: Dict[str, List[SetSpec]] = {}
    for kind in ("pretrain", "finetune"):
        items = data[kind]
        if not isinstance(items, list) or not items:
            raise reader.fail(kind, f"expected a non-empty list of sets, got {reader._show(items)}")
        sets[kind] = []
        for i, item in enumerate(items):
            where = f"{kind}[{i}]"
            what = "a pre-training set" if kind == "pretrain" else "a fine-tuning set"
            item = reader.mapping(item, where, SET_FIELDS[kind], REQUIRED_SET_FIELDS[kind], what)
            name = reader.name(item["name"], f"{where}.name")
            for j, earlier in enumerate(sets[kind]):
                if earlier.name == name:
                    raise reader.fail(f"{where}.name", f"{name!r} is already the name of {kind}[{j}]; "
                                                       "every set of a list needs its own name")
            sets[kind].append(SetSpec(
                name, reader.string(item["language"], f"{where}.language"),
                reader.strings(item["voices"], f"{where}.voices"),
                reader.string(item["domain"], f"{where}.domain"),
                reader.strings(item["variants"], f"{where}.variants") if "variants" in item else DEFAULT_VARIANTS[kind],
                reader.boolean(item["seen"], f"{where}.seen") if kind == "finetune" else True,
            ))
    sizes: Dict[str, Size] = {}
    raw_sizes = data.get("sizes")
    if raw_sizes is not None:
        if not isinstance(raw_sizes, dict) or not raw_sizes:
            raise reader.fail("sizes", f"expected a mapping of size names to sizes, got {reader._show(raw_sizes)}")
        for size_name, raw in raw_sizes.items():
            where = f"sizes.{size_name}"
            reader.name(size_name, where)
            raw = reader.mapping(raw, where, ("pretrain", "finetune", "words"), ("pretrain", "finetune", "words"),
                                 "a size")
            counts = {}
            for kind, splits in SIZE_SPLITS.items():
                part = reader.mapping(raw[kind], f"{where}.{kind}", splits, splits,
                                      f"{'pre-training' if kind == 'pretrain' else 'fine-tuning'} utterances per set")
                counts[kind] = {split: reader.count(part[split], f"{where}.{kind}.{split}") for split in splits}
            words = raw["words"]
            if not (isinstance(words, list) and len(words) == 2
                    and all(isinstance(w, int) and not isinstance(w, bool) for w in words)
                    and 1 <= words[0] <= words[1]):
                raise reader.fail(f"{where}.words", "expected [fewest, most] words per utterance, whole numbers "
                                                    f"with 1 <= fewest <= most, got {reader._show(words)}")
            sizes[size_name] = Size(counts["pretrain"], counts["finetune"], (words[0], words[1]))
    return Preset(description, sets["pretrain"], sets["finetune"], sizes)


# ---------------------------------------------------------------------------------------------- what there is

@dataclass(frozen=True)
class VoiceInfo:
    name: str
    """What a preset writes: the voice file's name in lower case (eSpeak NG lower-cases it)."""
    identifier: str
    """eSpeak NG's identifier, e.g. gmw/en-US: one voice, whichever name selected it."""
    title: str
    """eSpeak NG's description, e.g. English (America)."""
    languages: Tuple[str, ...]
    """The languages the voice file declares, its main one first."""


def _espeak_data() -> str:
    import espeakng_loader

    return espeakng_loader.get_data_path()


def _declarations(path: str) -> Dict[str, List[str]]:
    """``keyword value`` lines of an eSpeak NG voice file, by keyword."""
    found: Dict[str, List[str]] = {}
    with open(path, encoding="latin-1") as f:  # some files carry comments in other encodings
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                found.setdefault(parts[0], []).append(parts[1])
    return found


@functools.lru_cache(maxsize=None)
def espeak_voices() -> Dict[str, VoiceInfo]:
    """Every voice of the eSpeak NG data in the espeakng-loader wheel that can speak, by name.

    A voice is selected by its file's name (``espeak_SetVoiceByName``: ``en-us``, ``fr``, also the
    accents ``en-gb-scotland``); a language code that is not a file name (``fr-fr``, ``en-gb``) is
    refused by eSpeak NG. Voices whose pronunciation dictionary the wheel lacks (Faroese ``fo``,
    ``kaa``, ``xex``) synthesise silence and are left out."""
    from .espeak import engine

    data = _espeak_data()
    voices: Dict[str, VoiceInfo] = {}
    for voice in engine().voices():
        declared = _declarations(os.path.join(data, "lang", voice.identifier))
        # eSpeak NG's default dictionary: the main language up to its first '-'
        dictionary = (declared.get("dictionary") or [voice.language.split("-")[0]])[0]
        if not os.path.isfile(os.path.join(data, f"{dictionary}_dict")):
            continue
        name = voice.identifier.rsplit("/", 1)[-1].lower()
        voices.setdefault(name, VoiceInfo(name, voice.identifier, voice.name.strip(),
                                          tuple(declared.get("language") or [voice.language])))
    return dict(sorted(voices.items()))


@functools.lru_cache(maxsize=None)
def espeak_variants() -> Tuple[str, ...]:
    """The voice variants of the eSpeak NG data (``voices/!v``): what follows ``+`` in ``en-us+m4``."""
    folder = os.path.join(_espeak_data(), "voices", "!v")
    return tuple(sorted((f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))),
                        key=lambda v: (v.lower(), v)))


@functools.lru_cache(maxsize=None)
def languages() -> Dict[str, Tuple[str, ...]]:
    """The languages presets can use: those with a wordfreq word list that an eSpeak NG voice
    declares (itself or a regional form, ``en`` for ``en-us``), each with those voices."""
    from .text import available_languages

    found = {}
    for code in available_languages():
        speakers = tuple(v.name for v in espeak_voices().values()
                         if any(lang.lower() == code or lang.lower().startswith(code + "-") for lang in v.languages))
        if speakers:
            found[code] = speakers
    return found


def domains() -> Dict[str, str]:
    """The acoustic domains (eqssl.corpus.domains), each with its description."""
    from .domains import DOMAINS

    return {name: domain.description for name, domain in DOMAINS.items()}


def inventory() -> Dict[str, Any]:
    """What a preset can use: languages (with their voices), voices, variants, domains, sizes, presets."""
    return {"languages": languages(), "voices": espeak_voices(), "variants": espeak_variants(),
            "domains": domains(), "sizes": list(SIZES), "presets": builtin_names()}


# ---------------------------------------------------------------------------------------------- checking

def _choices(value: str, available: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, available, n=3, cutoff=0.6)
    return (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else "") + \
        f"; available: {', '.join(available)}"


def check_preset(preset: Preset, source: str) -> None:
    """Everything a preset names exists, and no fine-tuning set shares speakers with pre-training
    or says wrongly whether it is seen in pre-training; the first problem raises PresetError."""
    import wordfreq

    reader = _Reader(source)
    words = set(wordfreq.available_languages())
    usable, voices, variants, domain_names = languages(), espeak_voices(), espeak_variants(), list(domains())
    for kind in ("pretrain", "finetune"):
        for i, spec in enumerate(getattr(preset, kind)):
            where = f"{kind}[{i}]"
            if spec.language not in usable:
                why = "has a wordfreq word list but no eSpeak NG voice speaks it" if spec.language in words \
                    else "has no wordfreq word list"
                raise reader.fail(f"{where}.language", f"{spec.language!r} {why} (set {spec.name!r}); languages "
                                                       f"with both{_choices(spec.language, list(usable))}")
            for j, voice in enumerate(spec.voices):
                if voice not in voices:
                    raise reader.fail(f"{where}.voices[{j}]", f"unknown eSpeak NG voice {voice!r} (set {spec.name!r})"
                                                              f"{_voice_hint(voice)}{_choices(voice, list(voices))}")
            if spec.domain not in domain_names:
                raise reader.fail(f"{where}.domain",
                                  f"unknown domain {spec.domain!r} (set {spec.name!r}){_choices(spec.domain, domain_names)}")
            for j, variant in enumerate(spec.variants):
                if variant not in variants:
                    raise reader.fail(f"{where}.variants[{j}]", f"unknown eSpeak NG voice variant {variant!r} "
                                                                f"(set {spec.name!r}){_choices(variant, list(variants))}")
    pretrain_speakers = [speakers(spec) for spec in preset.pretrain]
    for i, spec in enumerate(preset.finetune):
        where = f"finetune[{i}]"
        mine = speakers(spec)
        for j, (shard, theirs) in enumerate(zip(preset.pretrain, pretrain_speakers)):
            shared = sorted(mine & theirs)
            if shared:
                used = {variant for voice, variant in theirs}
                free = [v for v in HELD_OUT_VARIANTS if v not in used] or [v for v in variants if v not in used][:4]
                raise reader.fail(f"{where}.variants", (
                    f"set {spec.name!r} shares speakers with pre-training set pretrain[{j}] ({shard.name!r}): "
                    f"{', '.join(_speaker_names(shared, spec, shard))}. A speaker is a voice with a variant "
                    "(rate and pitch are drawn from the same ranges in every set), so give the fine-tuning set "
                    f"variants no pre-training set uses with its voices (e.g. {', '.join(free)}) or other voices"))
        matches = [j for j, shard in enumerate(preset.pretrain)
                   if shard.language == spec.language and shard.domain == spec.domain
                   and {_voice_id(v) for v in shard.voices} & {_voice_id(v) for v in spec.voices}]
        if spec.seen and not matches:
            raise reader.fail(f"{where}.seen", (
                f"true, but no pre-training set has set {spec.name!r}'s language ({spec.language}) and domain "
                f"({spec.domain}) with any of its voices ({', '.join(spec.voices)}); seen means such a set "
                "exists (with other speakers): write seen: false, or add that pre-training set"))
        if not spec.seen and matches:
            shard = preset.pretrain[matches[0]]
            common = [v for v in spec.voices if _voice_id(v) in {_voice_id(x) for x in shard.voices}]
            raise reader.fail(f"{where}.seen", (
                f"false, but pre-training set pretrain[{matches[0]}] ({shard.name!r}) has set {spec.name!r}'s "
                f"language ({spec.language}), domain ({spec.domain}) and voice(s) ({', '.join(common)}): it is "
                "seen in pre-training (with other speakers); write seen: true"))


def _voice_hint(name: str) -> str:
    """For a language code that is not a voice's name (fr-fr, en-gb): the voices declaring it."""
    found = [[v.name for v in espeak_voices().values() if v.languages[0].lower() == name.lower()],
             [v.name for v in espeak_voices().values() if name.lower() in (lang.lower() for lang in v.languages)]]
    declared = found[0] or found[1]
    if declared:
        return (f" ({name!r} is a language of the voice(s) {', '.join(declared)}: a preset names voices, "
                "as --list prints them)")
    titled = [v.name for v in espeak_voices().values()
              if v.title.lower() == name.lower() or v.title.lower().startswith(name.lower() + " (")]
    return f" ({name!r} is eSpeak NG's description of the voice(s) {', '.join(titled)})" if titled else ""


def _voice_id(name: str) -> str:
    info = espeak_voices().get(name)
    return info.identifier if info else name


def speakers(spec: SetSpec) -> set:
    """The speakers of a set up to rate and pitch: (eSpeak NG voice identifier, variant) pairs."""
    return {(_voice_id(voice), variant) for voice in spec.voices for variant in spec.variants}


def _speaker_names(shared: List[Tuple[str, str]], spec: SetSpec, shard: SetSpec) -> List[str]:
    names = {_voice_id(v): v for v in (*shard.voices, *spec.voices)}
    listed = [f"{names[voice]}+{variant}" for voice, variant in shared]
    return listed[:6] + ([f"… ({len(listed)} in all)"] if len(listed) > 6 else [])


def settings_of(preset: Preset) -> dict:
    """The preset as plain JSON values (lists, not tuples), as corpus.json records it."""
    return {
        "description": preset.description,
        "pretrain": [_set_json(s) for s in preset.pretrain],
        "finetune": [_set_json(s) for s in preset.finetune],
        "sizes": {name: {"pretrain": dict(s.pretrain), "finetune": dict(s.finetune), "words": list(s.words)}
                  for name, s in preset.sizes.items()},
    }


def _set_json(spec: SetSpec) -> dict:
    return {"name": spec.name, "language": spec.language, "voices": list(spec.voices), "domain": spec.domain,
            "variants": list(spec.variants), "seen": spec.seen}

