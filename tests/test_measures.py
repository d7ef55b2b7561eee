"""eqssl-abx and eqssl-probe --phones from the command line, on the built-in corpus's own phone
alignments (FBANK features: the real feature, DTW and solve paths, in seconds): the same input
gives the same number, twice; bad input gets one line naming the file and line."""

import json

import pytest

from conftest import run


@pytest.fixture(scope="module")
def swedish(multilingual_corpus):
    return multilingual_corpus / "finetune" / "sv"


def test_abx_of_fbank_is_deterministic_and_sees_phones(swedish, tmp_path):
    # train_1h: the tiny size's test split has too few triphone cells for ABX (8 clips)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    for out in (first, second):
        result = run(["eqssl-abx", "fbank", swedish / "train_1h.item", "--json", out, "--cache", tmp_path / "cache"])
        assert result.returncode == 0, result.stdout[-2000:]
    assert "| fbank |" in result.stdout
    scores = json.loads(first.read_text())
    assert scores == json.loads(second.read_text())
    assert set(scores) == {"within", "across"}
    # FBANK tells phones apart far better than chance (50 %), and a speaker change makes it harder
    # (within one eSpeak NG voice, a few triphone cells of the tiny split may all be right: 0 %)
    assert 0 <= scores["within"] <= scores["across"] and 0 < scores["across"] < 35
    again = run(["eqssl-abx", "fbank", swedish / "train_1h.item", "--json", first])
    assert again.returncode != 0 and "exists; not overwritten" in again.stdout


def test_abx_finds_audio_under_a_root_as_libri_light_does(swedish, tmp_path):
    items = tmp_path / "sv.item"  # no manifest beside it: the audio is found by file name
    items.write_text((swedish / "train_1h.item").read_text())
    root = swedish.parent.parent / "audio" / "finetune" / "sv" / "train_1h"
    found = run(["eqssl-abx", "fbank", items, "--audio-root", root, "--json", tmp_path / "a.json",
                 "--cache", tmp_path / "cache"])
    assert found.returncode == 0, found.stdout[-2000:]
    beside = run(["eqssl-abx", "fbank", swedish / "train_1h.item", "--json", tmp_path / "b.json",
                  "--cache", tmp_path / "cache"])
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    lost = run(["eqssl-abx", "fbank", items])
    assert lost.returncode != 0 and "no manifest sv.tsv beside it; give --audio-root" in lost.stdout, lost.stdout


def test_a_bad_item_file_is_one_line_naming_the_file_and_line(swedish, tmp_path):
    lines = (swedish / "train_1h.item").read_text().splitlines()
    file, onset, offset, *rest = lines[3].split()
    bad = tmp_path / "train_1h.item"
    bad.write_text("\n".join(lines[:3] + [" ".join([file, offset, onset, *rest])] + lines[4:]) + "\n")
    (tmp_path / "train_1h.tsv").write_text((swedish / "train_1h.tsv").read_text())
    result = run(["eqssl-abx", "fbank", bad])
    assert result.returncode != 0
    errors = [line for line in result.stdout.splitlines() if line.startswith("eqssl-abx:")]
    assert len(errors) == 1 and f"{bad}:4:" in errors[0], result.stdout[-2000:]
    lines[5] = lines[5].replace(lines[5].split()[0], "999999", 1)
    bad.write_text("\n".join(lines) + "\n")
    result = run(["eqssl-abx", "fbank", bad])
    assert result.returncode != 0 and f"{bad}:6: no audio for '999999'" in result.stdout, result.stdout[-2000:]


def test_phone_probe_of_fbank_is_deterministic(swedish, tmp_path):
    outputs = []
    for name in ("first", "second"):
        out = tmp_path / f"{name}.json"
        result = run(["eqssl-probe", "fbank", swedish, "--phones", "--json", out, "--cache", tmp_path / "cache"])
        assert result.returncode == 0, result.stdout[-2000:]
        outputs.append(json.loads(out.read_text())["layers"]["0"])
    first, second = outputs
    assert first["error"] == pytest.approx(second["error"], abs=1e-6) and first["frames"] == second["frames"]
    # 10 ms FBANK frames tell a good share of the phones apart, with many phones (chance is far above this)
    assert 0 < first["error"] < 80 and first["phones"] > 15
