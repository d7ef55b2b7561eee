"""eqssl.cli.evaluate: scoring and greedy CTC by hand, then a real fine-tuned checkpoint end to end.

The end-to-end fixture generates the multilingual tiny corpus, pre-trains a tiny eqssl model
(2 updates), fine-tunes it with recipes/finetune/ctc_tiny.yaml on the Swedish set (20 updates)
and then moves the pre-training checkpoint away, so every evaluation below also shows that the
fine-tuned checkpoint is self-contained. The scores of so short a training are bad; what is
checked is that they are computed, consistent and reported, and that bad input is refused.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from fairseq.data import Dictionary

from conftest import REPO, fairseq_train, run
from eqssl.cli.evaluate import main
from eqssl.measures.evaluation import greedy_decode, score

TURKISH_I = "\u0130"  # İ, one code point (NFC)


# ---------------------------------------------------------------------------------------------
# score(): hand-computed WER/CER and S/D/I
# ---------------------------------------------------------------------------------------------

def test_score_turkish_one_substitution_one_deletion():
    reference = f"ÇOK GÜZEL B{TURKISH_I}R GÜN"     # 4 words, 17 characters (3 spaces)
    hypothesis = "ÇOK GÖZEL GÜN"                    # GÜZEL -> GÖZEL (S), BİR deleted (D)
    result = score([reference], [hypothesis])
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (1, 1, 0)
    assert result["words"] == 4 and result["hits"] == 2
    assert result["wer"] == pytest.approx(2 / 4)
    # characters: Ü -> Ö (1 S), "BİR " deleted (4 D); 17 reference characters
    assert (result["char_substitutions"], result["char_deletions"], result["char_insertions"]) == (1, 4, 0)
    assert result["characters"] == 17
    assert result["cer"] == pytest.approx(5 / 17)


def test_score_swedish_substitution_and_insertion():
    result = score(["SJÖN ÄR BLÅ"], ["SJÖN ÄR BLA OCH"])  # BLÅ -> BLA (S), OCH inserted (I)
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (1, 0, 1)
    assert result["words"] == 3 and result["wer"] == pytest.approx(2 / 3)
    # Å -> A (1 S), " OCH" inserted (4 I); "SJÖN ÄR BLÅ" has 11 characters
    assert (result["char_substitutions"], result["char_deletions"], result["char_insertions"]) == (1, 0, 4)
    assert result["characters"] == 11 and result["cer"] == pytest.approx(5 / 11)


def test_score_is_corpus_level_and_handles_empty_hypothesis():
    result = score(["A B C", "D E", "HEJ DÅ"], ["A X C", "D E F", ""])
    # words: 1 S, 1 I, 2 D (the empty hypothesis) over 3 + 2 + 2 = 7 reference words
    assert (result["substitutions"], result["deletions"], result["insertions"]) == (1, 2, 1)
    assert result["words"] == 7 and result["wer"] == pytest.approx(4 / 7)
    # characters: B -> X (1 S), " F" (2 I), "HEJ DÅ" all deleted (6 D) over 5 + 3 + 6 = 14
    assert (result["char_substitutions"], result["char_deletions"], result["char_insertions"]) == (1, 6, 2)
    assert result["characters"] == 14 and result["cer"] == pytest.approx(9 / 14)
    assert result["utterances"] == 3


def test_score_refuses_empty_reference_and_length_mismatch():
    with pytest.raises(ValueError, match="empty"):
        score(["A", "  "], ["A", "B"])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        score(["A", "B"], ["A"])


# ---------------------------------------------------------------------------------------------
# greedy_decode(): repeats collapsed, blanks dropped, padding frames ignored
# ---------------------------------------------------------------------------------------------

def _letters() -> Dictionary:
    dictionary = Dictionary()  # <s>=0 (the CTC blank), <pad>=1, </s>=2, <unk>=3
    for symbol in ["|", "H", "E", "J", "L"]:
        dictionary.add_symbol(symbol)
    return dictionary


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    d = _letters()
    b, bar, h, e, j, l = d.bos(), d.index("|"), d.index("H"), d.index("E"), d.index("J"), d.index("L")
    assert b == 0
    # "HELL HEJ": the double L needs a blank between; LL without a blank is one L
    first = [h, h, b, e, l, l, b, l, bar, bar, h, b, b, e, j, j, bar]
    second = [j, j, e, b, l, l, bar, h, h, h, h, h, h, h, h, h, h]  # "JEL" then 10 padding frames
    frames = torch.tensor([first, second])
    emissions = torch.nn.functional.one_hot(frames, len(d)).float() * 5 - 1  # (B, T, V) scores
    assert greedy_decode(emissions, d) == ["HELL HEJ", "JEL H"]
    assert greedy_decode(emissions, d, lengths=[17, 7]) == ["HELL HEJ", "JEL"]
    assert greedy_decode(emissions[0], d) == ["HELL HEJ"]  # one clip, (T, V)
    assert greedy_decode(torch.zeros(1, 4, len(d)), d) == [""]  # all blank


# ---------------------------------------------------------------------------------------------
# End to end on a real fine-tuned checkpoint
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled(multilingual_corpus) -> Path:
    """The multilingual tiny corpus's fine-tuning sets (finetune/{tr,sv,ta,fi}/)."""
    return multilingual_corpus / "finetune"


@pytest.fixture(scope="module")
def checkpoints(corpus, labelled, tmp_path_factory) -> dict:
    """A CTC checkpoint fine-tuned on sv; its pre-training checkpoint then moved elsewhere."""
    work = tmp_path_factory.mktemp("evaluate")
    pretrained = work / "pretrain" / "checkpoint_last.pt"
    result = fairseq_train(corpus, work / "pretrain", "--inner-steps", "0", "--max-update", "2")
    assert result.returncode == 0, result.stdout[-3000:]
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/finetune", "--config-name",
                  "ctc_tiny", f"task.data={labelled / 'sv'}", f"model.w2v_path={pretrained}",
                  f"checkpoint.save_dir={work / 'ctc'}", "optimization.max_update=20"])
    assert result.returncode == 0, result.stdout[-3000:]
    moved = work / "elsewhere" / "pretrained.pt"
    moved.parent.mkdir()
    shutil.move(str(pretrained), moved)
    shutil.rmtree(work / "pretrain")
    assert not pretrained.exists()
    return {"finetuned": work / "ctc" / "checkpoint_last.pt", "pretrained": moved}


def copy_set(source: Path, target: Path, split: str = "test") -> Path:
    """A private copy of one labelled set (the manifest's absolute root still finds the audio)."""
    target.mkdir(parents=True)
    for suffix in ("tsv", "wrd", "ltr"):
        shutil.copy(source / f"{split}.{suffix}", target)
    shutil.copy(source / "dict.ltr.txt", target)
    return target


def evaluate_in_process(capsys, *argv) -> tuple:
    """(exit status, stdout, stderr) of eqssl.cli.evaluate.main, run here (no interpreter start-up)."""
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_scores_swedish_test_set(checkpoints, labelled, tmp_path):
    out_json, out_md = tmp_path / "scores.json", tmp_path / "scores.md"
    result = run(["python", "-m", "eqssl.cli.evaluate", checkpoints["finetuned"],
                  f"sv={labelled / 'sv'}:test", "--json", out_json, "--markdown", out_md,
                  "--batch-size", "3", "--device", "cpu"])
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads(out_json.read_text(encoding="utf-8"))
    sv = report["sets"]["sv"]
    references = (labelled / "sv" / "test.wrd").read_text(encoding="utf-8").splitlines()
    assert sv["clips"] == sv["utterances"] == len(references) > 0
    assert sv["skipped_empty_references"] == 0 and sv["skipped_lines"] == []
    assert sv["words"] == sum(len(r.split()) for r in references)
    assert sv["characters"] == sum(len(r) for r in references)
    assert sv["wer"] == pytest.approx((sv["substitutions"] + sv["deletions"] + sv["insertions"]) / sv["words"])
    assert sv["cer"] == pytest.approx(
        (sv["char_substitutions"] + sv["char_deletions"] + sv["char_insertions"]) / sv["characters"])
    assert sv["hits"] + sv["substitutions"] + sv["deletions"] == sv["words"]
    assert sv["char_hits"] + sv["char_substitutions"] + sv["char_deletions"] == sv["characters"]
    assert report["dictionary"][0] == "<s>" and "Å" in report["dictionary"]
    row = (f"| sv | {100 * sv['wer']:.2f} | {100 * sv['cer']:.2f} | "
           f"{sv['substitutions']}/{sv['deletions']}/{sv['insertions']} | {sv['words']} |")
    table = out_md.read_text(encoding="utf-8").splitlines()
    assert table[0] == "| set | WER (%) | CER (%) | S/D/I | words |"
    assert table[2:] == [row]
    assert row in result.stdout  # the table is printed too


def test_ltr_references_when_no_wrd_give_the_same_scores(checkpoints, labelled, tmp_path, capsys):
    with_wrd = copy_set(labelled / "sv", tmp_path / "wrd")
    only_ltr = copy_set(labelled / "sv", tmp_path / "ltr")
    (only_ltr / "test.wrd").unlink()
    status, out, err = evaluate_in_process(capsys, checkpoints["finetuned"], f"a={with_wrd}:test",
                                           f"b={only_ltr}:test", "--json", tmp_path / "r.json")
    assert status == 0, err
    sets = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["sets"]
    assert sets["b"]["references"].endswith("test.ltr")
    drop = ("folder", "manifest", "references")
    assert {k: v for k, v in sets["a"].items() if k not in drop} == \
           {k: v for k, v in sets["b"].items() if k not in drop}


def test_turkish_against_a_swedish_model_is_a_dictionary_mismatch(checkpoints, labelled, tmp_path):
    out_json = tmp_path / "scores.json"
    result = run(["python", "-m", "eqssl.cli.evaluate", checkpoints["finetuned"], f"sv={labelled / 'sv'}:test",
                  f"tr={labelled / 'tr'}:test", "--json", out_json])
    assert result.returncode == 2, result.stdout[-3000:]
    assert f"{labelled / 'tr' / 'dict.ltr.txt'}: dictionary mismatch" in result.stdout
    assert "Ş" in result.stdout  # a Turkish letter the Swedish model does not have
    assert not out_json.exists()  # checked before anything is decoded or written


@pytest.mark.parametrize("labels", ["wrd", "ltr"])
def test_reference_outside_the_dictionary(checkpoints, labelled, tmp_path, capsys, labels):
    folder = copy_set(labelled / "sv", tmp_path / "sv")
    if labels == "ltr":
        (folder / "test.wrd").unlink()
    path = folder / f"test.{labels}"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = "Ş Ç | " + lines[2] if labels == "ltr" else "ŞEKER ÇAY " + lines[2]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    status, out, err = evaluate_in_process(capsys, checkpoints["finetuned"], f"sv={folder}:test",
                                           "--json", tmp_path / "r.json")
    assert status == 2 and out == ""
    assert f"{path}:3: characters not in the checkpoint's dictionary: 'Ç' 'Ş'" in err
    assert not (tmp_path / "r.json").exists()


def test_label_count_differs_from_manifest(checkpoints, labelled, tmp_path, capsys):
    folder = copy_set(labelled / "sv", tmp_path / "sv")
    lines = (folder / "test.wrd").read_text(encoding="utf-8").splitlines()
    (folder / "test.wrd").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    status, out, err = evaluate_in_process(capsys, checkpoints["finetuned"], f"sv={folder}:test")
    assert status == 2 and out == ""
    assert (f"{folder / 'test.wrd'} has {len(lines) - 1} lines but {folder / 'test.tsv'} "
            f"has {len(lines)} clips") in err


def test_empty_reference_is_a_counted_skip(checkpoints, labelled, tmp_path, capsys):
    folder = copy_set(labelled / "sv", tmp_path / "sv")
    lines = (folder / "test.wrd").read_text(encoding="utf-8").splitlines()
    removed = lines[1]
    lines[1] = "   "
    (folder / "test.wrd").write_text("\n".join(lines) + "\n", encoding="utf-8")
    status, out, err = evaluate_in_process(capsys, checkpoints["finetuned"], f"sv={folder}:test",
                                           "--json", tmp_path / "r.json")
    assert status == 0, err
    sv = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["sets"]["sv"]
    assert sv["skipped_empty_references"] == 1 and sv["skipped_lines"] == [2]
    assert sv["clips"] == len(lines) and sv["utterances"] == len(lines) - 1
    assert sv["words"] == sum(len(line.split()) for line in lines) and len(removed.split()) > 0
    assert f"sv: skipped 1 clip(s) with an empty reference ({folder / 'test.wrd'} lines 2)" in out


def test_pretraining_checkpoint_is_refused(checkpoints, labelled, tmp_path, capsys):
    status, out, err = evaluate_in_process(capsys, checkpoints["pretrained"], f"sv={labelled / 'sv'}:test")
    assert status == 2 and out == ""
    assert f"{checkpoints['pretrained']}: not a fine-tuned CTC checkpoint" in err
    assert "'eq_wav2vec2_tiny'" in err

    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint\n")
    status, out, err = evaluate_in_process(capsys, garbage, f"sv={labelled / 'sv'}:test")
    assert status == 2 and f"checkpoint {garbage}: not a PyTorch checkpoint" in err


def test_existing_outputs_are_never_overwritten(checkpoints, labelled, tmp_path, capsys):
    for option in ("--json", "--markdown"):
        existing = tmp_path / f"existing{option[2:]}"
        existing.write_text("keep me\n")
        status, out, err = evaluate_in_process(capsys, checkpoints["finetuned"],
                                               f"sv={labelled / 'sv'}:test", option, existing)
        assert status == 2 and out == ""
        assert f"{existing}: already exists; not overwriting it" in err
        assert existing.read_text() == "keep me\n"


def test_device_cuda(checkpoints, labelled, tmp_path, capsys):
    """On a GPU the scores match the CPU's; without one, --device cuda is a clear error."""
    argv = [checkpoints["finetuned"], f"sv={labelled / 'sv'}:test", "--device", "cuda"]
    if not torch.cuda.is_available():
        status, out, err = evaluate_in_process(capsys, *argv)
        assert status == 2 and "--device cuda: no CUDA device is available" in err
        return
    status, out, err = evaluate_in_process(capsys, *argv, "--json", tmp_path / "gpu.json")
    assert status == 0, err
    status, out, err = evaluate_in_process(capsys, *argv[:2], "--json", tmp_path / "cpu.json")
    assert status == 0, err
    gpu, cpu = (json.loads((tmp_path / f"{d}.json").read_text(encoding="utf-8"))["sets"]["sv"]
                for d in ("gpu", "cpu"))
    assert gpu["words"] == cpu["words"] and abs(gpu["wer"] - cpu["wer"]) <= 2 / cpu["words"]
