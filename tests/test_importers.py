"""Each importer on a tiny corpus in that corpus's real layout: what fairseq and the eqssl task
read back, and what happens with bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from eqssl.corpus.import_cli import main
from eqssl.corpus.importers import (
    CorpusImportError,
    LayoutError,
    import_commonvoice,
    import_folder,
    import_librispeech,
    import_mls,
)
from eqssl.corpus.labels import letters
from eqssl.data import check_audio, read_manifest
from eqssl.tasks.equilibrium_pretraining import discover_shards


def write_clip(path: Path, rate: int = 16000, seconds: float = 0.3, channels: int = 1, seed: int = 0, **kw) -> None:
    """A short sine-plus-noise clip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    signal = 0.2 * np.sin(2 * np.pi * (200 + 40 * seed) * t) + 0.02 * np.random.RandomState(seed).randn(n)
    if channels > 1:
        signal = np.stack([signal] * channels, axis=1)
    soundfile.write(str(path), signal.astype("float32"), rate, **kw)


def check_manifest(tsv: Path) -> list:
    """fairseq reads it, every count is the file's frame count, the eqssl checks pass; the rows."""
    from fairseq.data import FileAudioDataset

    manifest = read_manifest(str(tsv))
    check_audio(manifest, 16000)
    dataset = FileAudioDataset(str(tsv), sample_rate=16000)
    paths = [manifest.audio_path(e) for e in manifest.entries]
    assert list(dataset.sizes) == [soundfile.info(p).frames for p in paths]
    assert dataset[0]["source"].shape[0] == dataset.sizes[0]
    return paths


def check_labels(folder: Path, split: str) -> list:
    """.tsv, .wrd and .ltr line up, .ltr is the letters of .wrd, the dictionary covers them."""
    from fairseq.data import Dictionary

    paths = check_manifest(folder / f"{split}.tsv")
    words = (folder / f"{split}.wrd").read_text(encoding="utf-8").splitlines()
    ltr = (folder / f"{split}.ltr").read_text(encoding="utf-8").splitlines()
    assert len(paths) == len(words) == len(ltr)
    assert ltr == [letters(w) for w in words]
    dictionary = Dictionary.load(str(folder / "dict.ltr.txt"))
    for line in ltr:
        assert dictionary.unk() not in dictionary.encode_line(line, append_eos=False, add_if_not_exist=False).tolist()
    return list(zip(paths, words))


# -- LibriSpeech ----------------------------------------------------------------------------------

LIBRI = {
    "train-clean-100": {("19", "198"): ["NORTHANGER ABBEY", "CHAPTER ONE", "NO ONE WHO HAD EVER SEEN CATHERINE"],
                        ("26", "495"): ["THE DOG'S TAIL", "A B C", "IT WAS ONE OF THOSE"]},
    "dev-clean": {("84", "121123"): ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES"]},
    "test-clean": {("1089", "134686"): ["HE HOPED THERE WOULD BE STEW FOR DINNER", "STUFF IT INTO YOU"]},
}


@pytest.fixture
def librispeech(tmp_path) -> Path:
    source = tmp_path / "LibriSpeech"
    seed = 0
    for split, chapters in LIBRI.items():
        for (speaker, chapter), texts in chapters.items():
            folder = source / split / speaker / chapter
            lines = []
            for i, text in enumerate(texts):
                utterance = f"{speaker}-{chapter}-{i:04d}"
                write_clip(folder / f"{utterance}.flac", seed=seed)
                seed += 1
                lines.append(f"{utterance} {text}\n")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return source


def test_librispeech(librispeech, tmp_path):
    out = tmp_path / "out"
    summary = import_librispeech(str(librispeech), str(out), valid_percent=20)
    assert summary["pretrain"] == {"train-clean-100": {"train": 5, "valid": 1}}
    assert summary["finetune"] == {"librispeech": {"dev": 2, "test": 2}}
    assert summary["bad"] == 0 and summary["converted"] == 0
    assert discover_shards(str(out / "pretrain"), "") == ["train-clean-100"]
    pretrain = check_manifest(out / "pretrain/train-clean-100/train.tsv") + \
        check_manifest(out / "pretrain/train-clean-100/valid.tsv")
    assert sorted(pretrain) == sorted(map(str, librispeech.glob("train-clean-100/*/*/*.flac")))  # in place
    for split in ("dev", "test"):
        for path, words in check_labels(out / "finetune/librispeech", split):
            utterance = Path(path).stem
            speaker, chapter, _ = utterance.split("-")
            assert words == LIBRI[f"{split}-clean"][(speaker, chapter)][int(utterance[-4:])]
    assert "bad: 0" in (out / "import_report.txt").read_text()
    before = {p: p.read_text() for p in out.rglob("*.tsv")}
    assert main(["librispeech", str(librispeech), str(out), "--valid-percent", "20"]) == 0  # identical rerun
    assert {p: p.read_text() for p in out.rglob("*.tsv")} == before


def test_librispeech_shard_map(librispeech, tmp_path):
    shard_map = tmp_path / "speakers.tsv"
    shard_map.write_text("19\tbooks_a\n26\tbooks_b\n")
    out = tmp_path / "out"
    summary = import_librispeech(str(librispeech), str(out), shard_map=str(shard_map), finetune_splits="dev-clean:dev")
    assert set(summary["pretrain"]) == {"books_a", "books_b"}
    assert discover_shards(str(out / "pretrain"), "") == ["books_a", "books_b"]
    assert all("/19/" in p for p in check_manifest(out / "pretrain/books_a/train.tsv"))
    assert summary["finetune"] == {"librispeech": {"dev": 2}}


def test_librispeech_bad_items_are_skipped_and_reported(librispeech, tmp_path):
    chapter = librispeech / "train-clean-100/19/198"
    (chapter / "19-198-0003.flac").write_bytes(b"not audio at all" * 20)
    (chapter / "19-198-0004.flac").write_bytes(b"")
    with open(librispeech / "dev-clean/84/121123/84-121123.trans.txt", "a") as f:
        f.write("this line has no id\n")
    out = tmp_path / "out"
    with pytest.raises(CorpusImportError, match="more than --max-bad-fraction"):
        import_librispeech(str(librispeech), str(out))
    assert not list(out.rglob("*.tsv"))  # nothing written, only the report
    report = (out / "import_report.txt").read_text()
    assert "19-198-0003.flac: unreadable audio" in report and "19-198-0004.flac" in report
    assert "84-121123.trans.txt:3: unparsable transcript line" in report

    summary = import_librispeech(str(librispeech), str(out), max_bad_fraction=0.3)
    assert summary["bad"] == 3 and len(summary["skipped"]) == 3
    paths = check_manifest(out / "pretrain/train-clean-100/train.tsv") + \
        check_manifest(out / "pretrain/train-clean-100/valid.tsv")
    assert len(paths) == 6 and not any(p.endswith(("0003.flac", "0004.flac")) for p in paths)
    check_labels(out / "finetune/librispeech", "dev")


def test_librispeech_wrong_layout(tmp_path):
    source = tmp_path / "not_libri"
    write_clip(source / "books" / "a.wav")
    with pytest.raises(LayoutError) as error:
        import_librispeech(str(source), str(tmp_path / "out"))
    assert "expected split folders such as train-clean-100/" in str(error.value)
    assert "found books/" in str(error.value)


# -- Multilingual LibriSpeech ---------------------------------------------------------------------

def make_mls(source: Path, language: str, extension: str) -> None:
    seed = 0
    for split, count in (("train", 4), ("dev", 2), ("test", 2)):
        lines = []
        for i in range(count):
            utterance = f"10{seed}_20_{i:06d}"
            path = source / f"mls_{language}" / split / "audio" / f"10{seed}" / "20" / f"{utterance}.{extension}"
            kw = {"format": "OGG", "subtype": "OPUS"} if extension == "opus" else {}
            write_clip(path, seed=seed, **kw)
            lines.append(f"{utterance}\tdas ist größer als {language} nummer {i}\n")
            seed += 1
        (source / f"mls_{language}" / split / "transcripts.txt").write_text("".join(lines), encoding="utf-8")


def test_mls_flac_and_opus(tmp_path):
    if "OPUS" not in soundfile.available_subtypes("OGG"):
        pytest.skip("this libsndfile cannot write OGG/Opus, so no Opus fixture")
    source = tmp_path / "mls"
    make_mls(source, "german", "flac")
    make_mls(source, "dutch", "opus")
    with open(source / "mls_german/train/transcripts.txt", "a") as f:
        f.write("999_20_000001\tlisted but missing\n")
    out = tmp_path / "out"
    summary = import_mls(str(source), str(out), valid_percent=25, max_bad_fraction=0.2)
    assert discover_shards(str(out / "pretrain"), "") == ["dutch", "german"]
    assert summary["pretrain"]["german"] == {"train": 3, "valid": 1}
    assert summary["finetune"] == {"dutch": {"dev": 2, "test": 2}, "german": {"dev": 2, "test": 2}}
    assert summary["bad"] == 1 and "999_20_000001.flac: listed in" in summary["skipped"][0]
    assert all(p.endswith(".opus") for p in check_manifest(out / "pretrain/dutch/train.tsv"))
    rows = check_labels(out / "finetune/german", "dev")
    assert rows[0][1] == "DAS IST GRÖßER ALS GERMAN NUMMER 0"


def test_mls_wrong_layout(tmp_path, librispeech):
    with pytest.raises(LayoutError, match="expected mls_LANG/ or LANG/ folders.*found dev-clean/"):
        import_mls(str(librispeech), str(tmp_path / "out"))


# -- Common Voice ---------------------------------------------------------------------------------

CV_HEADER = "\t".join(["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes",
                       "down_votes", "age", "gender", "accents", "variant", "locale", "segment"])
CV_SENTENCES = ["İstanbul'a gidiyorum.", "Bu ılık bir gün!", "Çok güzel, değil mi?",
                "Evet.", "Hayır, hiç.", "Şimdi."]


def cv_row(name: str, sentence: str) -> str:
    return "\t".join(["abc123", name, "s1", sentence, "", "2", "0", "", "", "", "", "tr", ""])


@pytest.fixture
def commonvoice(tmp_path) -> Path:
    try:
        write_clip(tmp_path / "probe.mp3", rate=48000, format="MP3")
    except Exception as error:
        pytest.skip(f"soundfile cannot write MP3 here ({error}), so no Common Voice fixture")
    language = tmp_path / "cv-corpus-17.0" / "tr"
    names = [f"common_voice_tr_{17000000 + i}.mp3" for i in range(len(CV_SENTENCES))]
    for i, name in enumerate(names):
        write_clip(language / "clips" / name, rate=48000, seed=i, format="MP3")
    lists = {"validated": range(6), "train": range(3), "dev": [3], "test": [4]}
    for split, indices in lists.items():
        rows = [cv_row(names[i], CV_SENTENCES[i]) for i in indices]
        (language / f"{split}.tsv").write_text("\n".join([CV_HEADER, *rows]) + "\n", encoding="utf-8")
    return language.parent


def test_commonvoice(commonvoice, tmp_path):
    out = tmp_path / "out"
    summary = import_commonvoice(str(commonvoice), str(out), valid_percent=25)
    assert discover_shards(str(out / "pretrain"), "") == ["tr"]
    assert summary["pretrain"]["tr"]["train"] + summary["pretrain"]["tr"]["valid"] == 4  # not dev/test clips
    assert summary["finetune"] == {"tr": {"train": 3, "dev": 1, "test": 1}}
    assert summary["converted"] == 6 and summary["bad"] == 0
    pretrain = check_manifest(out / "pretrain/tr/train.tsv") + check_manifest(out / "pretrain/tr/valid.tsv")
    assert all(p.startswith(str(out / "audio")) and p.endswith(".flac") for p in pretrain)
    assert not any(p.endswith(("17000003.flac", "17000004.flac")) for p in pretrain)
    for path in pretrain:
        assert soundfile.info(path).samplerate == 16000 and soundfile.info(path).channels == 1
    train = check_labels(out / "finetune/tr", "train")
    assert [w for _, w in train] == ["İSTANBUL'A GİDİYORUM", "BU ILIK BİR GÜN", "ÇOK GÜZEL DEĞİL Mİ"]
    assert import_commonvoice(str(commonvoice / "tr"), str(tmp_path / "out2"), valid_percent=25)["converted"] == 6


def test_commonvoice_bad_rows_and_missing_clips(commonvoice, tmp_path):
    with open(commonvoice / "tr/validated.tsv", "a", encoding="utf-8") as f:
        f.write("only\ttwo fields\n" + cv_row("common_voice_tr_1.mp3", "gone") + "\n")
    out = tmp_path / "out"
    summary = import_commonvoice(str(commonvoice), str(out), max_bad_fraction=0.5)
    assert summary["bad"] == 2
    report = (out / "import_report.txt").read_text(encoding="utf-8")
    assert "validated.tsv:8: expected 13 tab-separated fields" in report
    assert "common_voice_tr_1.mp3: listed in" in report


def test_commonvoice_wrong_layout(tmp_path, librispeech):
    with pytest.raises(LayoutError, match="expected a language folder .* with clips/"):
        import_commonvoice(str(librispeech), str(tmp_path / "out"))


# -- Folder ---------------------------------------------------------------------------------------

@pytest.fixture
def folder_corpus(tmp_path) -> Path:
    source = tmp_path / "domains"
    for i in range(6):
        write_clip(source / "read" / "spk1" / f"utt{i}.flac", seed=i)
        write_clip(source / "phone" / f"call{i}.wav", rate=8000, seed=i)  # needs resampling
    write_clip(source / "broadcast" / "show.wav", rate=44100, channels=2)  # needs downmixing too
    write_clip(source / "broadcast" / "news.wav", rate=16000)
    (source / "read" / "transcripts.tsv").write_text(
        "".join(f"spk1/utt{i}.flac\tSentence number {i}, read aloud.\n" for i in range(6)))
    return source


def test_folder(folder_corpus, tmp_path):
    out = tmp_path / "out"
    summary = import_folder(str(folder_corpus), str(out), language="en", valid_percent=30)
    assert discover_shards(str(out / "pretrain"), "") == ["broadcast", "phone", "read"]
    assert summary["converted"] == 7 and summary["bad"] == 0
    phone = check_manifest(out / "pretrain/phone/train.tsv")
    assert all(p.startswith(str(out / "audio/phone")) for p in phone)
    assert soundfile.info(phone[0]).frames == 4800  # 0.3 s at 16 kHz
    broadcast = check_manifest(out / "pretrain/broadcast/train.tsv") + \
        check_manifest(out / "pretrain/broadcast/valid.tsv")
    assert sorted(Path(p).name for p in broadcast) == ["news.wav", "show.flac"]
    assert set(summary["finetune"]) == {"read"}
    train, dev = check_labels(out / "finetune/read", "train"), check_labels(out / "finetune/read", "dev")
    assert [p for p, _ in train] == check_manifest(out / "pretrain/read/train.tsv")
    assert [p for p, _ in dev] == check_manifest(out / "pretrain/read/valid.tsv")
    assert train[0][1].startswith("SENTENCE NUMBER") and train[0][1].endswith("READ ALOUD")


def test_fairseq_finetuning_task_reads_the_labelled_set(folder_corpus, tmp_path):
    from fairseq.tasks.audio_finetuning import AudioFinetuningConfig, AudioFinetuningTask
    from omegaconf import OmegaConf

    import_folder(str(folder_corpus), str(tmp_path / "out"), valid_percent=30)
    words = (tmp_path / "out/finetune/read/train.wrd").read_text().splitlines()
    cfg = OmegaConf.structured(AudioFinetuningConfig(data=str(tmp_path / "out/finetune/read"), labels="ltr", tpu=False))
    task = AudioFinetuningTask.setup_task(cfg)
    task.load_dataset("train", cfg)
    label = task.datasets["train"][0]["label"]
    assert task.target_dictionary.string(label) == letters(words[0])


def test_folder_bad_items(folder_corpus, tmp_path):
    soundfile.write(str(folder_corpus / "phone" / "empty.wav"), np.zeros(0, "float32"), 16000)
    with open(folder_corpus / "read" / "transcripts.tsv", "a") as f:
        f.write("spk1/missing.flac\tnot there\nno tab on this line\n")
    out = tmp_path / "out"
    summary = import_folder(str(folder_corpus), str(out), max_bad_fraction=0.25)
    assert summary["bad"] == 3
    report = (out / "import_report.txt").read_text()
    assert "empty.wav: empty audio (0 samples)" in report
    assert "missing.flac: listed in" in report and "transcripts.tsv:8: expected" in report
    with pytest.raises(CorpusImportError, match="3 of 17 items are bad"):
        import_folder(str(folder_corpus), str(tmp_path / "out2"), max_bad_fraction=0.1)


def test_folder_wrong_layout(tmp_path):
    source = tmp_path / "flat"
    write_clip(source / "a.wav")
    with pytest.raises(LayoutError, match="expected one sub-folder per shard.*found a.wav"):
        import_folder(str(source), str(tmp_path / "out"))


# -- The output folder and the command line -------------------------------------------------------

def test_refuses_an_output_holding_another_corpus(folder_corpus, librispeech, tmp_path):
    out = tmp_path / "out"
    import_folder(str(folder_corpus), str(out), valid_percent=30)
    import_folder(str(folder_corpus), str(out), valid_percent=30)  # identical rerun: fine
    with pytest.raises(CorpusImportError, match="already holds another import"):
        import_librispeech(str(librispeech), str(out))
    with pytest.raises(FileExistsError, match="tsv already exists with different content"):
        import_folder(str(folder_corpus), str(out), valid_percent=60)
    foreign = tmp_path / "foreign"
    (foreign / "pretrain" / "x").mkdir(parents=True)
    (foreign / "pretrain" / "x" / "train.tsv").write_text("/somewhere\na.wav\t100\n")
    with pytest.raises(CorpusImportError, match="did not write"):
        import_folder(str(folder_corpus), str(foreign))
    with pytest.raises(CorpusImportError, match="must not be inside SOURCE"):
        import_folder(str(folder_corpus), str(folder_corpus / "out"))


def test_cli(librispeech, tmp_path, capsys):
    assert main(["librispeech", str(librispeech), str(tmp_path / "out"), "--valid-percent", "20",
                 "--finetune-splits", "dev-clean:dev"]) == 0
    assert "pretrain/train-clean-100: 5 train, 1 valid" in capsys.readouterr().out
    write_clip(tmp_path / "tiny" / "shard" / "only.wav")
    assert main(["folder", str(tmp_path / "tiny"), str(tmp_path / "x")]) == 1
    assert "needs at least 2" in capsys.readouterr().err
    assert main(["mls", str(librispeech), str(tmp_path / "y")]) == 1
    assert "does not look like Multilingual LibriSpeech" in capsys.readouterr().err
    help_text = subprocess.run([sys.executable, "-m", "eqssl.corpus.import_cli", "librispeech", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--shard-map" in help_text and "--max-bad-fraction" in help_text
