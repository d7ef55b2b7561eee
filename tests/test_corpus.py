"""The built-in corpus: eSpeak NG speech in fairseq's layout, deterministic, resumable."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
from fairseq.data import Dictionary, FileAudioDataset

from conftest import fairseq_train
from eqssl.corpus import make_corpus as generator
from eqssl.corpus.espeak import ESpeakError, engine
from eqssl.corpus.presets import PRESETS, SIZES
from eqssl.corpus.text import UnknownLanguage, sentence
from eqssl.tasks.equilibrium_pretraining import discover_shards


def tree_digest(root: Path) -> dict:
    """Hash of every generated file (manifests, labels, audio), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and "chunks" not in p.parts
    }


@pytest.fixture(scope="module")
def multilingual(multilingual_corpus) -> Path:
    """Generated once per session (conftest), with 2 workers and seed 0."""
    return multilingual_corpus


def test_layout_is_read_by_fairseq_and_the_task(multilingual):
    """Pre-training shards for the task, labelled sets for fairseq's readers, corpus.json."""
    preset = PRESETS["multilingual"]
    assert discover_shards(str(multilingual / "pretrain"), "") == sorted(s.name for s in preset.pretrain)
    for spec in preset.pretrain:
        for split, count in SIZES["tiny"].pretrain.items():
            data = FileAudioDataset(str(multilingual / "pretrain" / spec.name / f"{split}.tsv"), 16000)
            assert len(data) == count
            item = data[0]["source"]
            assert item.dim() == 1 and 16000 < len(item) < 16000 * 15
    for spec in preset.finetune:
        folder = multilingual / "finetune" / spec.name
        dictionary = Dictionary.load(str(folder / "dict.ltr.txt"))
        for split, count in SIZES["tiny"].finetune.items():
            manifest = (folder / f"{split}.tsv").read_text().splitlines()[1:]
            words = (folder / f"{split}.wrd").read_text(encoding="utf-8").splitlines()
            letters = (folder / f"{split}.ltr").read_text(encoding="utf-8").splitlines()
            assert len(manifest) == len(words) == len(letters) == count
            for line in letters:
                encoded = dictionary.encode_line(line, append_eos=False, add_if_not_exist=False)
                assert dictionary.unk() not in encoded.tolist()
            if spec.language == "ta":  # Tamil script survives normalisation
                assert any("\u0b80" <= c <= "\u0bff" for c in "".join(words))
            if spec.language == "tr":
                assert any(c in "ĞŞÇÖÜİ" for c in "".join(words))
    description = json.loads((multilingual / "corpus.json").read_text())
    assert description["complete"] and description["settings"]["preset"] == "multilingual"
    tamil = description["sets"]["finetune/ta"]
    assert tamil["seen_in_pretraining"] is False and tamil["splits"]["test"]["utterances"] == 8
    assert tamil["splits"]["test"]["hours"] > 0
    pretrain_voices = {v for s in preset.pretrain for split in description["sets"][f"pretrain/{s.name}"]["splits"].values() for v in split["voices"]}
    finetune_voices = {v for s in preset.finetune for split in description["sets"][f"finetune/{s.name}"]["splits"].values() for v in split["voices"]}
    assert not {v.split("+")[1] for v in pretrain_voices} & {v.split("+")[1] for v in finetune_voices}
    texts = {}
    for record in (multilingual / "chunks").glob("*.json"):
        chunk = json.loads(record.read_text(encoding="utf-8"))
        texts.setdefault(chunk["kind"], set()).update(row["text"] for row in chunk["rows"])
    assert texts["pretrain"] and texts["finetune"] and not texts["pretrain"] & texts["finetune"]


def test_generation_is_deterministic_whatever_the_workers(multilingual, tmp_path):
    """A second generation with another number of workers is byte-identical."""
    again = tmp_path / "again"
    generator.make_corpus(str(again), "multilingual", "tiny", seed=0, workers=1, progress=False)
    first, second = tree_digest(multilingual), tree_digest(again)
    # Manifests name their own absolute root; everything else must match byte for byte.
    manifests = [k for k in first if k.endswith(".tsv")]
    assert set(first) == set(second)
    assert {k: v for k, v in first.items() if k not in manifests and k != "corpus.json"} == \
        {k: v for k, v in second.items() if k not in manifests and k != "corpus.json"}
    for name in manifests:
        a = (multilingual / name).read_text().splitlines()[1:]
        b = (again / name).read_text().splitlines()[1:]
        assert a == b, name


def test_interrupted_generation_resumes(multilingual, tmp_path):
    """Lost chunk records, a missing and a truncated file are redone; the result is unchanged."""
    copy = tmp_path / "corpus"
    shutil.copytree(multilingual, copy)
    for path in copy.rglob("*.tsv"):  # rerooted, as a run interrupted in this folder would be
        lines = path.read_text().splitlines()
        lines[0] = str(copy / "audio")
        path.write_text("\n".join(lines) + "\n")
    chunks = sorted((copy / "chunks").glob("*.json"))
    os.remove(chunks[0])
    flacs = sorted((copy / "audio").rglob("*.flac"))
    os.remove(flacs[5])
    with open(flacs[40], "r+b") as f:
        f.truncate(100)
    description = json.loads((copy / "corpus.json").read_text())
    description["complete"] = False
    (copy / "corpus.json").write_text(json.dumps(description))
    generator.make_corpus(str(copy), "multilingual", "tiny", seed=0, workers=2, progress=False)
    original, resumed = tree_digest(multilingual), tree_digest(copy)
    audio = [k for k in original if k.endswith(".flac")]
    assert {k: original[k] for k in audio} == {k: resumed[k] for k in audio}
    assert json.loads((copy / "corpus.json").read_text())["complete"]


def test_refuses_a_folder_holding_something_else(multilingual, tmp_path):
    """Another corpus, or foreign files: refused with a clear message, nothing touched."""
    with pytest.raises(generator.CorpusError, match="holds a different corpus"):
        generator.make_corpus(str(multilingual), "multilingual", "tiny", seed=1, progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(generator.CorpusError, match="not empty"):
        generator.make_corpus(str(foreign), "multidomain", "tiny", progress=False)
    assert os.listdir(foreign) == ["notes.txt"]


def test_unknown_names_list_what_is_available():
    """Unknown preset, size, word-list language, voice: each error lists the choices."""
    with pytest.raises(generator.CorpusError, match="available: .*multidomain, multilingual"):
        generator.check_inputs("nope", "tiny")
    with pytest.raises(generator.CorpusError, match="available: tiny, small, full"):
        generator.check_inputs("multidomain", "huge")
    with pytest.raises(UnknownLanguage, match="available: .*sv.*ta.*tr"):
        sentence("cy", 3, np.random.default_rng(0))
    with pytest.raises(ESpeakError, match="languages available: .*fr.*"):
        engine().synthesise("hello", "xx-nope")


def test_main_job_can_pretrain_on_it(multilingual, tmp_path):
    """The equilibrium_pretraining task trains on the generated pre-training shards."""
    result = fairseq_train(multilingual / "pretrain", tmp_path / "run", "--inner-steps", "1", "--max-update", "2")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "loss_before_fr=" in result.stdout and "loss_after_nl=" in result.stdout
