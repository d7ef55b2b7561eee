"""Corpus presets as YAML files: the built-ins unchanged, a preset of one's own that fairseq trains
on, one clear error for every bad preset, and ``eqssl-make-corpus --list``."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from fairseq.data import Dictionary, FileAudioDataset

from conftest import REPO, fairseq_train, run
from eqssl.corpus import presets
from eqssl.corpus.make_corpus import ORIGINAL_BUILTINS, claim_folder, definition_digest
from eqssl.corpus.presets import (
    HELD_OUT_VARIANTS, PRESETS, SIZES, CorpusError, Preset, PresetError, SetSpec, Size, load_preset,
)
from eqssl.tasks.equilibrium_pretraining import discover_shards

# The built-in presets and sizes as eqssl/corpus/presets.py defined them in Python, before they
# became recipes/corpus/*.yaml: the YAML files must give exactly these.
US = ("en-us",)
OLD_PRESETS = {
    "multidomain": Preset(
        "English in several domains; fine-tuning on seen domains and on unseen ones "
        "(far-field meetings and unseen accents), with held-out speakers",
        pretrain=[
            SetSpec("read", "en", US, "read"),
            SetSpec("telephone", "en", US, "telephone"),
            SetSpec("broadcast", "en", US, "broadcast"),
            SetSpec("accent", "en", ("en-gb-scotland", "en-029", "en-gb-x-rp"), "accent"),
        ],
        finetune=[
            SetSpec("read", "en", US, "read", HELD_OUT_VARIANTS, seen=True),
            SetSpec("telephone", "en", US, "telephone", HELD_OUT_VARIANTS, seen=True),
            SetSpec("meeting", "en", US, "meeting", HELD_OUT_VARIANTS, seen=False),
            SetSpec("accent_unseen", "en", ("en-gb-x-gbcwmd", "en-us-nyc", "en-gb-x-gbclan"), "accent",
                    HELD_OUT_VARIANTS, seen=False),
        ],
    ),
    "multilingual": Preset(
        "read speech in English, French and Dutch for pre-training; fine-tuning on languages "
        "never seen in pre-training (Turkish, Swedish, Tamil, Finnish; Welsh, the paper's fourth, "
        "has no offline word list)",
        pretrain=[
            SetSpec("en", "en", US, "read"),
            SetSpec("fr", "fr", ("fr",), "read"),
            SetSpec("nl", "nl", ("nl",), "read"),
        ],
        finetune=[
            SetSpec(lang, lang, (lang,), "read", HELD_OUT_VARIANTS, seen=False)
            for lang in ("tr", "sv", "ta", "fi")
        ],
    ),
}
OLD_SIZES = {
    "tiny": Size({"train": 32, "valid": 8}, {"train_10m": 8, "train_1h": 16, "dev": 6, "test": 8}, (4, 12)),
    "small": Size({"train": 600, "valid": 60}, {"train_10m": 120, "train_1h": 720, "dev": 100, "test": 150}, (5, 30)),
    "full": Size({"train": 6000, "valid": 300}, {"train_10m": 120, "train_1h": 720, "dev": 300, "test": 500}, (5, 30)),
}

# A preset with languages no built-in preset uses, and a size of its own that keeps the test fast.
GOOD = {
    "description": "German and Spanish pre-training; Polish (unseen) and German (seen) fine-tuning",
    "pretrain": [
        {"name": "de", "language": "de", "voices": ["de"], "domain": "read"},
        {"name": "es", "language": "es", "voices": ["es", "es-419"], "domain": "telephone"},
    ],
    "finetune": [
        {"name": "pl", "language": "pl", "voices": ["pl"], "domain": "read", "seen": False},
        {"name": "de_heldout", "language": "de", "voices": ["de"], "domain": "read", "seen": True},
    ],
    "sizes": {"mini": {"pretrain": {"train": 8, "valid": 4},
                       "finetune": {"train_10m": 2, "train_1h": 4, "dev": 2, "test": 3}, "words": [3, 6]}},
}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def good() -> dict:
    return json.loads(json.dumps(GOOD))  # a deep copy to damage


def test_builtin_yaml_files_are_the_old_definitions():
    """recipes/corpus/{multidomain,multilingual}.yaml give exactly the SetSpecs the Python
    definitions gave, so the corpus is the same; the sizes are unchanged."""
    for name, old in OLD_PRESETS.items():
        assert (REPO / "recipes" / "corpus" / f"{name}.yaml").is_file()
        assert PRESETS[name] == old, name
        assert load_preset(name) == old, name  # and it passes every check
        # corpora made before corpus.json recorded the definition still resume (make_corpus)
        assert ORIGINAL_BUILTINS[name] == definition_digest(presets.settings_of(old))
    assert SIZES == OLD_SIZES
    assert {"multidomain", "multilingual", "example_german_spanish"} <= set(PRESETS)
    example = load_preset(str(REPO / "recipes" / "corpus" / "example_german_spanish.yaml"))
    used = {s.language for name in OLD_PRESETS for s in OLD_PRESETS[name].pretrain + OLD_PRESETS[name].finetune}
    assert not {s.language for s in example.pretrain + example.finetune} & used


def test_a_preset_of_ones_own_makes_a_corpus_fairseq_trains_on(tmp_path):
    """de/es pre-training, pl and held-out-speaker de fine-tuning, with the preset's own size:
    eqssl-make-corpus (run from another folder, with a relative path) writes the layout, and the
    equilibrium_pretraining task trains on its shards."""
    folder = tmp_path / "mine"
    folder.mkdir()
    write(folder / "de_es.yaml", GOOD)
    made = run(["eqssl-make-corpus", "corpus", "--preset", "mine/de_es.yaml", "--size", "mini", "--workers", "2"],
               cwd=tmp_path)
    assert made.returncode == 0, made.stdout[-3000:]
    out = tmp_path / "corpus"
    assert discover_shards(str(out / "pretrain"), "") == ["de", "es"]
    for shard in ("de", "es"):
        assert len(FileAudioDataset(str(out / "pretrain" / shard / "train.tsv"), 16000)) == 8
    words = (out / "finetune" / "pl" / "test.wrd").read_text(encoding="utf-8").splitlines()
    assert len(words) == 3 and any(c in "ĄĆĘŁŃÓŚŹŻ" for c in "".join(words))
    assert Dictionary.load(str(out / "finetune" / "de_heldout" / "dict.ltr.txt"))
    description = json.loads((out / "corpus.json").read_text())
    assert description["settings"]["preset"] == "de_es" and description["settings"]["size"] == "mini"
    assert description["settings"]["preset_definition"]["sizes"]["mini"]["words"] == [3, 6]
    assert description["sets"]["finetune/pl"]["seen_in_pretraining"] is False
    voices = {kind: {v for key, entry in description["sets"].items() if key.startswith(kind)
                     for split in entry["splits"].values() for v in split["voices"]}
              for kind in ("pretrain", "finetune")}
    assert voices["pretrain"] and voices["finetune"] and not voices["pretrain"] & voices["finetune"]
    assert {v.split("+")[1] for v in voices["finetune"]} <= set(HELD_OUT_VARIANTS)
    # the same preset, changed, is another corpus: refused, not resumed
    changed = good()
    changed["pretrain"][1]["domain"] = "broadcast"
    write(folder / "de_es.yaml", changed)
    again = run(["eqssl-make-corpus", "corpus", "--preset", "mine/de_es.yaml", "--size", "mini"], cwd=tmp_path)
    assert again.returncode == 2 and "holds a different corpus" in again.stdout and "preset_definition" in again.stdout
    trained = fairseq_train(out / "pretrain", tmp_path / "run", "--inner-steps", "1", "--max-update", "2")
    assert trained.returncode == 0, trained.stdout[-3000:]
    assert "loss_before_de=" in trained.stdout and "loss_after_es=" in trained.stdout


def _set(data, path, value):
    """data[path] = value for a dotted path with list indices; value None deletes."""
    *parents, last = path
    for key in parents:
        data = data[key]
    if value is None:
        del data[last]
    else:
        data[last] = value


BAD = [
    # (where, value (None: delete), the field the message names, what else it must say)
    (("pretrain", 1, "language"), "cy", "pretrain[1].language", "'cy' has no wordfreq word list"),
    (("pretrain", 1, "language"), "fil", "pretrain[1].language", "'fil' has a wordfreq word list but no eSpeak NG"),
    (("pretrain", 0, "voices"), ["de", "xx-nope"], "pretrain[0].voices[1]", "unknown eSpeak NG voice 'xx-nope'"),
    (("pretrain", 0, "voices"), ["fr-fr"], "pretrain[0].voices[0]", "'fr-fr' is a language of the voice(s) fr:"),  # no such voice file
    (("pretrain", 0, "voices"), ["fo"], "pretrain[0].voices[0]", "unknown eSpeak NG voice 'fo'"),  # no dictionary
    (("finetune", 0, "domain"), "studio", "finetune[0].domain",
     "unknown domain 'studio' (set 'pl'); available: read, telephone, meeting, broadcast, accent"),
    (("finetune", 0, "variants"), ["m4", "m9"], "finetune[0].variants[1]", "unknown eSpeak NG voice variant 'm9'"),
    (("pretrain", 1, "name"), "de", "pretrain[1].name", "'de' is already the name of pretrain[0]"),
    (("finetune", 1, "variants"), ["m4", "m1", "f2"], "finetune[1].variants",
     "shares speakers with pre-training set pretrain[0] ('de'): de+f2, de+m1"),
    (("pretrain", 0, "voices"), None, "pretrain[0]", "missing field 'voices'"),
    (("finetune", 0, "seen"), None, "finetune[0]", "missing field 'seen'"),
    (("pretrain", 0, "voice"), ["de"], "pretrain[0].voice", "unknown field (did you mean 'voices'?)"),
    (("pretrain", 0, "seen"), True, "pretrain[0].seen", "unknown field"),
    (("pretraining",), [], "pretraining", "unknown field (did you mean 'pretrain'?)"),
    (("description",), None, "", "missing field 'description'"),
    (("pretrain", 0, "voices"), "de", "pretrain[0].voices", "expected a non-empty list of strings, got a string"),
    (("pretrain", 0, "voices"), [], "pretrain[0].voices", "expected a non-empty list of strings"),
    (("pretrain", 0, "voices"), ["de", "de"], "pretrain[0].voices[1]", "'de' is listed twice"),
    (("pretrain", 0, "language"), False, "pretrain[0].language", "YAML reads unquoted yes/no"),
    (("pretrain", 0, "name"), 12, "pretrain[0].name", "expected a non-empty string, got a number"),
    (("pretrain", 0, "name"), "a/b", "pretrain[0].name", "not a usable name"),
    (("finetune", 0, "seen"), "no", "finetune[0].seen", "expected true or false, got a string"),
    (("finetune",), {"pl": 1}, "finetune", "expected a non-empty list of sets"),
    (("finetune",), [], "finetune", "expected a non-empty list of sets"),
    (("pretrain", 0), "de", "pretrain[0]", "expected a mapping"),
    (("finetune", 0, "seen"), True, "finetune[0].seen", "true, but no pre-training set has set 'pl'"),
    (("finetune", 1, "seen"), False, "finetune[1].seen", "false, but pre-training set pretrain[0] ('de')"),
    (("sizes", "mini", "words"), [6, 3], "sizes.mini.words", "1 <= fewest <= most"),
    (("sizes", "mini", "finetune", "dev"), 0, "sizes.mini.finetune.dev", "a whole number of utterances >= 1"),
    (("sizes", "mini", "pretrain", "valid"), None, "sizes.mini.pretrain", "missing field 'valid'"),
]


@pytest.mark.parametrize("where,value,field,message", BAD, ids=[f"{'.'.join(map(str, b[0]))}={b[1]!r}" for b in BAD])
def test_every_bad_preset_is_one_clear_error(tmp_path, where, value, field, message):
    data = good()
    _set(data, where, value)
    path = write(tmp_path / "bad.yaml", data)
    with pytest.raises(PresetError) as caught:
        load_preset(str(path))
    text = str(caught.value)
    assert text.startswith(f"{path}: {field}: " if field else f"{path}: "), text
    assert message in text, text


def test_default_variants_keep_speakers_apart(tmp_path):
    """Without ``variants``, pre-training sets draw m1-m3, f1-f2 and fine-tuning sets the held-out
    m4, m5, f3, f4: the same voice in both is then allowed (other speakers)."""
    data = good()
    data["finetune"][0]["voices"] = ["pl", "de"]
    loaded = load_preset(str(write(tmp_path / "ok.yaml", data)))
    assert loaded.pretrain[0].variants == presets.PRETRAIN_VARIANTS
    assert loaded.finetune[0].variants == HELD_OUT_VARIANTS
    assert not presets.speakers(loaded.finetune[0]) & presets.speakers(loaded.pretrain[0])


def test_lists_of_what_is_available(tmp_path):
    """Errors list the choices: languages with both a word list and a voice, voices, variants."""
    data = good()
    data["pretrain"][0]["language"] = "cy"
    with pytest.raises(PresetError, match=r"languages with both; available: ar, .*de, .*pl, .*zh$"):
        load_preset(str(write(tmp_path / "a.yaml", data)))
    data = good()
    data["pretrain"][0]["voices"] = ["german"]
    with pytest.raises(PresetError, match=r"'german' is eSpeak NG's description of the voice\(s\) de\); "
                                          r"available: af, .*de, .*en-gb-scotland, .*en-us, .*pl, "):
        load_preset(str(write(tmp_path / "b.yaml", data)))
    data = good()
    data["finetune"][0]["variants"] = ["m10"]
    with pytest.raises(PresetError, match=r"available: .*f1, .*klatt, .*m1, .*m4, .*whisper"):
        load_preset(str(write(tmp_path / "c.yaml", data)))


def test_unreadable_files_and_names(tmp_path):
    with pytest.raises(PresetError, match=r"bad.yaml: not valid YAML"):
        load_preset(str(write(tmp_path / "bad.yaml", "pretrain: [\n")))
    with pytest.raises(PresetError, match=r"empty.yaml: is empty; a preset has: description, pretrain, finetune"):
        load_preset(str(write(tmp_path / "empty.yaml", "")))
    with pytest.raises(PresetError, match=r"list.yaml: expected a mapping with description, pretrain, finetune"):
        load_preset(str(write(tmp_path / "list.yaml", "- a\n")))
    with pytest.raises(PresetError, match=r"missing.yaml: no such preset file"):
        load_preset(str(tmp_path / "missing.yaml"))
    with pytest.raises(PresetError, match=r"unknown preset 'nope'; available: .*multidomain, multilingual"):
        load_preset("nope")
    assert issubclass(PresetError, CorpusError)  # one error for eqssl-make-corpus to catch


def test_command_lines_print_the_error_and_exit_before_any_work(tmp_path):
    """eqssl-make-corpus and eqssl-reproduce: the message, exit status 2 / 1, no traceback, no folder."""
    data = good()
    data["pretrain"][1]["voices"] = ["es", "spanish"]
    path = write(tmp_path / "bad.yaml", data)
    made = run(["eqssl-make-corpus", tmp_path / "out", "--preset", path])
    assert made.returncode == 2, made.stdout
    assert f"eqssl-make-corpus: error: {path}: pretrain[1].voices[1]: unknown eSpeak NG voice 'spanish'" in made.stdout
    reproduced = run(["eqssl-reproduce", "--preset", "multilingual", path, "--out", tmp_path / "out"])
    assert reproduced.returncode == 1, reproduced.stdout
    assert f"eqssl-reproduce: {path}: pretrain[1].voices[1]: unknown eSpeak NG voice 'spanish'" in reproduced.stdout
    for result in (made, reproduced):
        assert "Traceback" not in result.stdout
    assert not (tmp_path / "out").exists()


def test_reproduce_plans_the_experiment_of_a_preset_file(tmp_path):
    """eqssl-reproduce names the experiment's folders after the file; a multilingual preset of
    one's own gets the temperature-sampling baseline, as the built-in multilingual does."""
    from eqssl.experiment.plan import ReproduceError, finetune_sets, load_settings, plan_pretraining, resolve_presets

    path = write(tmp_path / "de_es.yaml", GOOD)
    settings = load_settings("tiny")
    settings["preset_files"] = resolve_presets([str(path), "multidomain"], settings)
    assert settings["preset_files"] == {"de_es": str(path)}
    assert finetune_sets("de_es", settings) == {"pl": False, "de_heldout": True}
    assert "cssl.1-temp" in [r.name for r in plan_pretraining("de_es", settings)]
    assert "cssl.1-temp" in [r.name for r in plan_pretraining("multilingual", settings)]
    assert "cssl.1-temp" not in [r.name for r in plan_pretraining("multidomain", settings)]
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ReproduceError, match="two presets named de_es"):
        resolve_presets([str(path), str(write(other / "de_es.yaml", GOOD))], settings)
    with pytest.raises(ReproduceError, match="corpus_size huge: preset de_es has no such size; it has tiny, small, "
                                             "full, mini"):
        resolve_presets([str(path)], dict(settings, corpus_size="huge"))


def test_a_corpus_made_before_presets_were_files_still_resumes(tmp_path):
    """corpus.json without the preset's definition: this corpus if the preset is the original
    built-in (make_corpus's legacy_ok), another corpus otherwise."""
    settings = {"preset": "multilingual", "size": "tiny", "seed": 0, "generator_version": "1"}
    (tmp_path / "corpus.json").write_text(json.dumps({"settings": settings, "complete": True}))
    now = dict(settings, preset_definition=presets.settings_of(load_preset("multilingual")))
    claim_folder(str(tmp_path), now, legacy_ok=True)
    with pytest.raises(CorpusError, match="holds a different corpus .* differs in preset_definition"):
        claim_folder(str(tmp_path), now, legacy_ok=False)


def test_list_prints_what_the_espeak_data_and_wordfreq_have():
    listed = run(["eqssl-make-corpus", "--list"], cwd="/")
    assert listed.returncode == 0, listed.stdout[-3000:]
    text = listed.stdout[listed.stdout.index("Languages with a wordfreq word list"):]  # after any warning
    for line in ("  de    de\n", "  pl    pl\n", "  en-us", "English (America)", "  en-gb-scotland", "  meeting    far-field",
                 "m4, m5", "f3, f4", "whisper", "multidomain, multilingual"):
        assert line in text, line
    languages, voices = (section.splitlines()[1:] for section in text.split("\n\n")[:2])
    codes = [line.split()[0] for line in languages]
    assert codes == list(presets.languages()) and len(codes) >= 30
    assert "de" in codes and "cy" not in codes and "fil" not in codes  # cy: no word list; fil: no voice
    names = [line.split()[0] for line in voices]
    assert "cy" in names and "fo" not in names  # Welsh speaks; Faroese has no dictionary: silence


def test_every_listed_voice_speaks_and_every_variant_is_eSpeak_NGs():
    """In a fresh process (eSpeak NG keeps state): each listed voice is accepted by eSpeak NG and
    speaks; an unlisted variant name would silently fall back to the plain voice."""
    script = (
        "import numpy as np\n"
        "from eqssl.corpus.espeak import engine\n"
        "from eqssl.corpus.presets import espeak_voices, espeak_variants\n"
        "e = engine()\n"
        "for name in espeak_voices():\n"
        "    e.set_random_seed(1)\n"
        "    x = e.synthesise('a b c', name + '+m4')\n"
        "    assert len(x) > 2000 and np.abs(x).max() > 0.01, name\n"
        "assert {'m1', 'm5', 'f1', 'f4', 'klatt'} <= set(espeak_variants())\n"
        "print('spoke', len(espeak_voices()))\n"
    )
    result = run([Path(sys.executable).name, "-c", script])
    assert result.returncode == 0 and "spoke" in result.stdout, result.stdout[-3000:]
