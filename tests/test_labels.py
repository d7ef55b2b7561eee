"""Transcript normalisation and the label files fairseq's fine-tuning reads."""

import numpy as np
import pytest
import soundfile

from eqssl.corpus.labels import (
    letters,
    normalise_transcript,
    write_labelled_split,
    write_letter_dictionary,
    write_manifest,
)


@pytest.mark.parametrize("text, language, expected", [
    ("Hello, world!", "en", "HELLO WORLD"),
    ("  many\t spaces\n here ", "en", "MANY SPACES HERE"),
    ("istanbul'da ılık bir gün", "tr", "İSTANBUL'DA ILIK BİR GÜN"),
    ("istanbul", "tr-TR", "İSTANBUL"),
    ("istanbul", "en", "ISTANBUL"),
    ("Bakı şəhəri", "az", "BAKI ŞƏHƏRİ"),
    ("Å är ö, på väg.", "sv", "Å ÄR Ö PÅ VÄG"),
    ("Straße und Fuß", "de", "STRAßE UND FUß"),
    ("L’homme qu'il a vu : « oui ».", "fr", "L'HOMME QU'IL A VU OUI"),
    ("aujourd'hui, 'cité' rock 'n' roll", "fr", "AUJOURD'HUI CITÉ ROCK N ROLL"),
    ("façade — çok; señor?", "es", "FAÇADE ÇOK SEÑOR"),
    ("தமிழ் நாடு.", "ta", "தமிழ் நாடு"),
    ("Привет, мир!", "ru", "ПРИВЕТ МИР"),
    ("3 dogs, 25% (approx.)", "en", "3 DOGS 25 APPROX"),
    ("well-known/self-made", "en", "WELL KNOWN SELF MADE"),
    ("...!?", "en", ""),
    ("", "en", ""),
])
def test_normalise_transcript(text, language, expected):
    assert normalise_transcript(text, language) == expected


def test_normalise_uses_nfc():
    decomposed = "cafe\u0301"  # e + combining acute
    assert normalise_transcript(decomposed, "fr") == "CAF\u00c9"


def test_letters_format_is_libri_labels():
    assert letters("HELLO WORLD") == "H E L L O | W O R L D |"
    assert letters("A") == "A |"
    assert letters("தமிழ்") == "த ம ி ழ ் |"
    with pytest.raises(ValueError):
        letters("")


def _clips(folder, count=3):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        n = 4000 + 800 * i
        soundfile.write(folder / f"clip{i}.flac", np.random.RandomState(i).uniform(-0.3, 0.3, n), 16000)
        rows.append((f"clip{i}.flac", n))
    return rows


def test_fairseq_reads_the_written_files(tmp_path):
    from fairseq.data import Dictionary, FileAudioDataset

    rows = _clips(tmp_path / "audio")
    texts = [normalise_transcript(t, lang) for t, lang in
             [("Hello, world!", "en"), ("Straße in İzmir", "tr"), ("தமிழ் l'été", "fr")]]
    out = tmp_path / "finetune"
    write_labelled_split(str(out), "train", str(tmp_path / "audio"), [(p, n, t) for (p, n), t in zip(rows, texts)])
    write_labelled_split(str(out), "dev", str(tmp_path / "audio"), [(*rows[0], texts[0])])
    write_letter_dictionary(str(out), ["train", "dev"])

    assert (out / "train.wrd").read_text(encoding="utf-8").splitlines() == texts
    assert (out / "train.ltr").read_text(encoding="utf-8").splitlines() == [letters(t) for t in texts]
    counts = [line.rsplit(" ", 1) for line in (out / "dict.ltr.txt").read_text(encoding="utf-8").splitlines()]
    assert [int(c) for _, c in counts] == sorted((int(c) for _, c in counts), reverse=True)
    assert "|" in [s for s, _ in counts] and "ß" in [s for s, _ in counts]

    dictionary = Dictionary.load(str(out / "dict.ltr.txt"))
    for line in (out / "train.ltr").read_text(encoding="utf-8").splitlines():
        encoded = dictionary.encode_line(line, append_eos=False, add_if_not_exist=False)
        assert dictionary.unk() not in encoded.tolist()
        assert dictionary.string(encoded) == line

    dataset = FileAudioDataset(str(out / "train.tsv"), sample_rate=16000)
    assert len(dataset) == 3 and list(dataset.sizes) == [n for _, n in rows]
    assert dataset[2]["source"].shape[0] == rows[2][1]


def test_write_manifest_refuses_different_content(tmp_path):
    rows = _clips(tmp_path / "audio", 2)
    root = str(tmp_path / "audio")
    path = write_manifest(str(tmp_path / "shard"), "train", root, rows)
    assert open(path).read().splitlines() == [root, "clip0.flac\t4000", "clip1.flac\t4800"]
    write_manifest(str(tmp_path / "shard"), "train", root, rows)  # identical: fine
    with pytest.raises(FileExistsError, match="train.tsv"):
        write_manifest(str(tmp_path / "shard"), "train", root, rows[:1])
    with pytest.raises(ValueError, match="absolute"):
        write_manifest(str(tmp_path / "other"), "train", "audio", rows)


def test_labelled_split_refuses_before_writing_anything(tmp_path):
    rows = _clips(tmp_path / "audio", 2)
    root = str(tmp_path / "audio")
    folder = tmp_path / "ft"
    write_labelled_split(str(folder), "dev", root, [(p, n, "A B") for p, n in rows])
    (folder / "dev.ltr").write_text("changed\n")
    with pytest.raises(FileExistsError, match="dev.ltr"):
        write_labelled_split(str(folder), "dev", root, [(p, n, "A B") for p, n in rows])
    with pytest.raises(FileExistsError, match="dev.wrd"):
        write_labelled_split(str(folder), "dev", root, [(p, n, "C D") for p, n in rows])
    assert (folder / "dev.wrd").read_text() == "A B\nA B\n"  # nothing was overwritten
    assert (folder / "dev.ltr").read_text() == "changed\n"
