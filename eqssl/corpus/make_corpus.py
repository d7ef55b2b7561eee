"""Generate the built-in corpus: eSpeak NG speech of real words, in several domains or languages.

    eqssl-make-corpus OUT --preset multidomain --size tiny [--seed 0] [--workers N]
    eqssl-make-corpus OUT --preset my_preset.yaml --size tiny     # a preset of your own (docs/corpus.md)
    eqssl-make-corpus --list          # the languages, voices, variants and domains a preset can use

writes ``OUT/pretrain/{shard}/{train,valid}.tsv`` (the ``equilibrium_pretraining`` layout),
``OUT/finetune/{name}/{train_10m,train_1h,dev,test}.{tsv,wrd,ltr}`` with ``dict.ltr.txt``, the
audio as 16 kHz mono FLAC under ``OUT/audio/``, and ``OUT/corpus.json`` describing every set.
Every split also gets its phone alignment, from eSpeak NG's phoneme events, as ``{split}.item``
(ZeroSpeech item file) and ``{split}.phn`` (10 ms frame labels): eqssl.corpus.alignments.

Deterministic: the same preset, size and seed give byte-identical files whatever ``--workers``.
eSpeak NG carries state from one utterance to the next inside a process, so utterances are
made in fixed chunks, each in a fresh worker process, every utterance from its own seed.
A rerun into the same folder keeps finished chunks and redoes the rest.
"""

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import textwrap
from dataclasses import asdict
from typing import Dict, List, Tuple

import numpy as np
import soundfile
import soxr
from tqdm import tqdm

from ..locking import LOCK_NAME, FolderLockedError, folder_lock
from . import alignments, labels
from .domains import DOMAINS, apply_domain
from .espeak import engine
from .presets import (  # noqa: F401  (PresetError: the one error of a bad preset, a CorpusError)
    DEFAULT_VARIANTS, PRESET_DIR, SIZES, CorpusError, Preset, PresetError, SetSpec, Size, builtin_names,
    inventory, load_preset, preset_name, settings_of,
)
from .text import sentence

GENERATOR_VERSION = "1"
# Still "1" with phone alignments: the audio is bit-identical with eSpeak NG's phoneme events on
# (tests/test_alignments.py), and a new version would make claim_folder refuse every existing
# corpus. A chunk recorded before alignments lacks "phones" instead, so chunk_is_complete sends it
# back to synthesis, which rewrites the same files and adds the alignment.
SAMPLE_RATE = 16000
CHUNK = 8  # utterances per fresh process: fixes what eSpeak NG's carried-over state can be
DICTIONARY_SPLITS = ("train_10m", "train_1h", "dev", "test")


ORIGINAL_BUILTINS = {
    "multidomain": "77a2dd719b2a4e06cedc100847622da35952a08081dab4cb7d7c860e7d917526",
    "multilingual": "d1a0820a04493ee6e2aa397cbb3f57a96a4b519d1b6c697240f5247d87fe5c41",
}
"""definition_digest of the built-in presets as they were defined in Python, before corpus.json
recorded a preset's definition: a corpus made then, with one of these exactly, still resumes."""


def definition_digest(definition: dict) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def utterance_rng(seed: int, *keys) -> np.random.Generator:
    """A generator of its own for every utterance, from the corpus seed and the item's names."""
    words = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "little") for k in keys]
    return np.random.default_rng([seed, *words])


def speak(spec: SetSpec, rng: np.random.Generator, n_words: Tuple[int, int]) -> dict:
    """One utterance of ``spec``: its text, speaker, clean 16 kHz audio and its phones
    ((onset, offset, phone) in seconds: they survive resampling as they are)."""
    text = sentence(spec.language, int(rng.integers(n_words[0], n_words[1] + 1)), rng)
    voice = f"{spec.voices[rng.integers(len(spec.voices))]}+{spec.variants[rng.integers(len(spec.variants))]}"
    rate, pitch = int(rng.integers(140, 200)), int(rng.integers(30, 70))
    tts = engine()
    tts.set_random_seed(int(rng.integers(2**31)))
    audio, phones = tts.synthesise_aligned(text, voice, rate=rate, pitch=pitch)
    audio = soxr.resample(audio, tts.sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return {"text": text, "voice": voice, "rate": rate, "pitch": pitch, "audio": audio, "phones": phones}


def make_chunk(task: dict) -> dict:
    """Synthesise one chunk of utterances into FLAC files (run in a fresh process)."""
    spec = SetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in task["spec"].items()})
    rows = []
    for index in task["indices"]:
        rng = utterance_rng(task["seed"], task["kind"], spec.name, task["split"], index)
        utt = speak(spec, rng, task["words"])
        babble = [speak(spec, rng, task["words"])["audio"] for _ in range(3)] if spec.domain == "meeting" else []
        audio = apply_domain(spec.domain, utt["audio"], rng, babble)
        relative = f"{task['kind']}/{spec.name}/{task['split']}/{index:06d}.flac"
        path = os.path.join(task["audio_root"], relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        soundfile.write(path, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
        # Every domain keeps the clean clip's timing (telephone delays it by about 1 ms, meeting's
        # direct sound stays in place: tests/test_alignments.py), so the clean alignment is the clip's.
        phones = alignments.record_phones(utt["phones"], len(audio) / SAMPLE_RATE)
        rows.append({"path": relative, "samples": len(audio), "sha256": _sha256(path), "text": utt["text"],
                     "voice": utt["voice"], "rate": utt["rate"], "pitch": utt["pitch"], "phones": phones})
    record = dict(task, rows=rows)
    _write_json_atomically(task["done_file"], record)
    return record


def _write_json_atomically(path: str, value) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
    os.replace(temporary, path)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def chunk_is_complete(task: dict) -> bool:
    """Finished and verified: its record exists, has every row's phone alignment (a record made
    before alignments has none: redone, into the same audio), and every file it lists has the
    recorded hash (a truncated FLAC keeps a valid header, so its length alone proves nothing)."""
    if not os.path.isfile(task["done_file"]):
        return False
    with open(task["done_file"], encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    for row in rows:
        if "phones" not in row:
            return False
        path = os.path.join(task["audio_root"], row["path"])
        if not os.path.isfile(path) or _sha256(path) != row.get("sha256"):
            return False
    return True


def plan(out: str, chosen: Preset, counts: Size, seed: int) -> List[dict]:
    """Every chunk of the corpus, in a fixed order."""
    tasks = []
    for kind, specs, splits in (("pretrain", chosen.pretrain, counts.pretrain),
                                ("finetune", chosen.finetune, counts.finetune)):
        for spec in specs:
            for split, total in splits.items():
                for start in range(0, total, CHUNK):
                    name = f"{kind}-{spec.name}-{split}-{start:06d}"
                    tasks.append({
                        "kind": kind, "spec": asdict(spec), "split": split, "seed": seed,
                        "indices": list(range(start, min(start + CHUNK, total))), "words": counts.words,
                        "audio_root": os.path.join(os.path.realpath(out), "audio"),
                        "done_file": os.path.join(out, "chunks", name + ".json"),
                    })
    return tasks


def check_inputs(preset: str, size: str) -> Tuple[str, Preset, Size]:
    """The preset's name, the preset and the size, all checked (unknown preset or size, a preset
    that names a language, voice, variant or domain there is not, or whose fine-tuning sets share
    speakers with pre-training): one clear error before any work."""
    chosen = load_preset(preset)
    sizes = {**SIZES, **chosen.sizes}
    if size not in sizes:
        raise CorpusError(f"unknown size {size!r}; available: {', '.join(sizes)}")
    return preset_name(preset), chosen, sizes[size]


def claim_folder(out: str, settings: dict, legacy_ok: bool = False, write: bool = True) -> None:
    """Use ``out`` only if it is new, empty, or holds this very corpus (then resume). With
    ``legacy_ok`` (a built-in preset exactly as it was defined in Python), a corpus made before
    corpus.json recorded the preset's definition is this corpus if everything else matches.
    ``write=False`` only checks (nothing is created)."""
    description = os.path.join(out, "corpus.json")
    if os.path.isfile(description):
        with open(description, encoding="utf-8") as f:
            existing = json.load(f).get("settings") or {}
        if legacy_ok and "preset_definition" not in existing:
            existing = dict(existing, preset_definition=settings.get("preset_definition"))
        if existing != settings:
            differ = sorted(k for k in {**existing, **settings} if existing.get(k) != settings.get(k))
            raise CorpusError(
                f"{out} holds a different corpus (preset {existing.get('preset')}, size {existing.get('size')}, "
                f"seed {existing.get('seed')}; it differs in {', '.join(differ)}); rerun with its settings "
                "to resume it, or choose another folder"
            )
        return
    if os.path.isdir(out) and set(os.listdir(out)) - {LOCK_NAME}:
        raise CorpusError(f"{out} is not empty and holds no eqssl corpus; choose another folder")
    if not write:
        return
    os.makedirs(os.path.join(out, "chunks"), exist_ok=True)
    _write_json_atomically(description, {"settings": settings, "complete": False})


def write_manifests(out: str, records: List[dict]) -> Dict[str, dict]:
    """fairseq manifests (and labels for fine-tuning sets) from the chunk records, and beside
    every manifest its phone alignment (``{split}.item``, ``{split}.phn``)."""
    grouped: Dict[Tuple[str, str, str], List[dict]] = {}
    for record in records:
        grouped.setdefault((record["kind"], record["spec"]["name"], record["split"]), []).extend(record["rows"])
    root = os.path.join(os.path.realpath(out), "audio")
    summary: Dict[str, dict] = {}
    for (kind, name, split), rows in sorted(grouped.items()):
        folder = os.path.join(out, kind, name)
        os.makedirs(folder, exist_ok=True)
        if kind == "pretrain":
            labels.write_manifest(folder, split, root, [(r["path"], r["samples"]) for r in rows])
        else:
            language = next(rec["spec"]["language"] for rec in records if rec["spec"]["name"] == name)
            labels.write_labelled_split(folder, split, root, [
                (r["path"], r["samples"], labels.normalise_transcript(r["text"], language)) for r in rows
            ])
        alignments.write_alignments(folder, split, [(r["path"], r["samples"], r["voice"], r["phones"]) for r in rows],
                                    SAMPLE_RATE)
        entry = summary.setdefault(f"{kind}/{name}", {"splits": {}})
        entry["splits"][split] = {
            "utterances": len(rows), "hours": round(sum(r["samples"] for r in rows) / SAMPLE_RATE / 3600, 4),
            "voices": sorted({r["voice"] for r in rows}),
        }
    for key in summary:
        kind, name = key.split("/")
        if kind == "finetune":
            labels.write_letter_dictionary(os.path.join(out, kind, name), list(DICTIONARY_SPLITS))
    return summary


def make_corpus(out: str, preset: str = "multidomain", size: str = "tiny", seed: int = 0,
                workers: int = 0, progress: bool = True) -> dict:
    """Generate (or resume) the corpus; returns what corpus.json records. Raises FolderLockedError
    at once if another process is writing ``out``."""
    name, chosen, counts = check_inputs(preset, size)
    settings = {"preset": name, "size": size, "seed": seed, "generator_version": GENERATOR_VERSION,
                "preset_definition": settings_of(chosen)}
    legacy_ok = ORIGINAL_BUILTINS.get(name) == definition_digest(settings["preset_definition"])
    claim_folder(out, settings, legacy_ok, write=False)  # a foreign folder is refused before the lock file
    with folder_lock(out, "eqssl-make-corpus"):
        claim_folder(out, settings, legacy_ok)
        return _make_corpus(out, name, chosen, counts, settings, seed, workers, progress)


def _make_corpus(out: str, name: str, chosen: Preset, counts: Size, settings: dict, seed: int, workers: int,
                 progress: bool) -> dict:
    tasks = plan(out, chosen, counts, seed)
    todo = [t for t in tasks if not chunk_is_complete(t)]
    workers = workers or os.cpu_count() or 1
    # A fresh process per chunk, forked from a server that never ran eSpeak NG: no chunk sees
    # state left by another chunk, or by whatever this process synthesised before.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with context.Pool(workers, maxtasksperchild=1) as pool:
        for _ in tqdm(pool.imap_unordered(make_chunk, todo), total=len(todo), disable=not progress,
                      desc=f"{name}/{settings['size']}", unit="chunk"):
            pass
    records = []
    for task in tasks:
        with open(task["done_file"], encoding="utf-8") as f:
            records.append(json.load(f))
    summary = write_manifests(out, records)
    description = {
        "settings": settings, "complete": True, "description": chosen.description,
        "sample_rate": SAMPLE_RATE,
        "sets": {
            f"{kind}/{spec.name}": dict(summary[f"{kind}/{spec.name}"], language=spec.language,
                                         voices=list(spec.voices), variants=list(spec.variants),
                                         seen_in_pretraining=spec.seen, domain=spec.domain,
                                         domain_parameters=DOMAINS[spec.domain].params)
            for kind, specs in (("pretrain", chosen.pretrain), ("finetune", chosen.finetune)) for spec in specs
        },
    }
    _write_json_atomically(os.path.join(out, "corpus.json"), description)
    return description


def format_inventory() -> str:
    """What ``--list`` prints: everything a preset can name, from the eSpeak NG data and wordfreq."""
    found = inventory()
    wrap = functools.partial(textwrap.fill, width=100, initial_indent="  ", subsequent_indent="  ",
                             break_on_hyphens=False)
    width = max(map(len, found["voices"])) + 2
    lines = [f"Languages with a wordfreq word list and an eSpeak NG voice ({len(found['languages'])}), "
             "for a set's `language`, each with the voices that speak it:"]
    lines += [f"  {code:<5} {', '.join(voices)}" for code, voices in found["languages"].items()]
    lines += ["", f"Voices of eSpeak NG ({len(found['voices'])}), for a set's `voices` (a voice may read "
                  "another language's text: an accent):"]
    lines += [f"  {name:<{width}} {voice.title}" for name, voice in found["voices"].items()]
    lines += ["", f"Voice variants of eSpeak NG ({len(found['variants'])}), for a set's `variants` (default: "
                  f"{', '.join(DEFAULT_VARIANTS['pretrain'])} in pre-training sets, "
                  f"{', '.join(DEFAULT_VARIANTS['finetune'])} in fine-tuning sets):",
              wrap(", ".join(found["variants"]))]
    lines += ["", f"Domains ({len(found['domains'])}), for a set's `domain`:"]
    lines += [f"  {name:<10} {description}" for name, description in found["domains"].items()]
    lines += ["", "Sizes (--size; a preset may add its own under `sizes`):"]
    lines += [f"  {name:<6} pre-training {', '.join(f'{k} {v}' for k, v in size.pretrain.items())}; fine-tuning "
              f"{', '.join(f'{k} {v}' for k, v in size.finetune.items())} utterances per set; "
              f"{size.words[0]}-{size.words[1]} words each" for name, size in SIZES.items()]
    lines += ["", f"Built-in presets (--preset NAME: {PRESET_DIR}/NAME.yaml):", wrap(", ".join(found["presets"]))]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="eqssl-make-corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="folder to write into (new, or one holding this corpus to resume)")
    parser.add_argument("--preset", default="multidomain",
                        help=f"a built-in preset ({', '.join(builtin_names())}) or a preset .yaml file")
    parser.add_argument("--size", default="tiny", help=f"one of {', '.join(SIZES)}, or one of the preset's sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="processes (0: every core)")
    parser.add_argument("--list", action="store_true",
                        help="print the languages, voices, variants, domains, sizes and presets there are, and exit")
    args = parser.parse_args(argv)
    if args.list:
        print(format_inventory())
        return
    if args.out is None:
        parser.error("the following argument is required: out (or --list)")
    try:
        description = make_corpus(args.out, args.preset, args.size, args.seed, args.workers)
    except (CorpusError, FolderLockedError, ValueError) as error:
        parser.exit(2, f"eqssl-make-corpus: error: {error}\n")
    hours = sum(s["hours"] for entry in description["sets"].values() for s in entry["splits"].values())
    print(f"{args.out}: {len(description['sets'])} sets, {hours:.2f} h of audio; see corpus.json")


if __name__ == "__main__":
    main()
