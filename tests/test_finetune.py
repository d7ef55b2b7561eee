"""CTC fine-tuning of eqssl checkpoints with the recipes, in characters and SentencePiece units."""

import shutil
from pathlib import Path

import pytest
from fairseq import checkpoint_utils

from conftest import REPO, fairseq_train, run
from eqssl.measures.evaluation import evaluate, greedy_decode
from eqssl.cli.spm import main as train_spm
from eqssl.experiment.fairseq_log import validations


def valid_values(output: str, key: str) -> list:
    return [stats[key] for stats in validations(output.splitlines(), subset=None) if key in stats]


@pytest.fixture(scope="module")
def labelled(multilingual_corpus) -> Path:
    return multilingual_corpus / "finetune"


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("pt")
    result = fairseq_train(corpus, save, "--inner-steps", "1", "--max-update", "2")
    assert result.returncode == 0, result.stdout[-3000:]
    return save / "checkpoint_last.pt"


def finetune(data: Path, w2v: Path, save: Path, *overrides) -> str:
    # From the save folder's parent, not the repository: recipes run from any folder.
    save.parent.mkdir(parents=True, exist_ok=True)
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/finetune", "--config-name", "ctc_tiny",
                  f"task.data={data}", f"model.w2v_path={w2v}", f"checkpoint.save_dir={save}", *overrides],
                 cwd=save.parent)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def test_tiny_recipe_learns_its_training_data(labelled, pretrained, tmp_path):
    """Characters: CER (fairseq's uer) on the fine-tuning data itself falls below 100 %,
    i.e. the model emits more than blanks."""
    output = finetune(labelled / "sv", pretrained, tmp_path / "ft", "optimization.max_update=150",
                      "dataset.valid_subset=train_1h")
    cer = valid_values(output, "uer")
    assert len(cer) >= 3, output[-3000:]
    assert cer[-1] < 100 and cer[-1] < cer[0]


def test_sentencepiece_units_and_a_self_contained_checkpoint(labelled, pretrained, tmp_path):
    """units=spm fine-tunes on a shared SentencePiece vocabulary; the checkpoint then loads with
    its dictionary after the pre-training checkpoint and the data folder are gone."""
    data = tmp_path / "data"
    for language in ("sv", "tr"):
        shutil.copytree(labelled / language, data / language)
    train_spm([str(tmp_path / "shared"), str(data / "sv"), str(data / "tr"), "--vocab-size", "120"])
    pieces = (data / "sv" / "dev.spm").read_text(encoding="utf-8").splitlines()
    assert pieces and all("▁" in line for line in pieces)
    moved = tmp_path / "pretrained.pt"
    shutil.copy(pretrained, moved)
    output = finetune(data / "sv", moved, tmp_path / "ft", "units=spm", "optimization.max_update=8")
    assert valid_values(output, "uer"), output[-3000:]
    report = evaluate(str(tmp_path / "ft" / "checkpoint_last.pt"), [f"sv={data / 'sv'}:test"])
    assert report["decoder"].endswith("post_process sentencepiece")
    assert report["sets"]["sv"]["words"] == sum(
        len(line.split()) for line in (data / "sv" / "test.wrd").read_text(encoding="utf-8").splitlines())

    moved.unlink()
    shutil.rmtree(data)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(tmp_path / "ft" / "checkpoint_last.pt")])
    assert type(models[0]).__name__ == "Wav2VecCtc"
    assert cfg.task.labels == "spm"
    symbols = set(task.target_dictionary.symbols)
    assert "▁" in "".join(symbols) and len(symbols) > 20


def test_greedy_decoding_joins_sentencepiece_pieces():
    """Pieces decode to words at their '▁' marks, blanks and repeats removed."""
    import torch
    from fairseq.data import Dictionary

    dictionary = Dictionary()  # <s> (index 0) is CTC's blank
    ids = [dictionary.add_symbol(piece) for piece in ("▁HE", "LLO", "▁WORLD")]
    frames = [0, ids[0], ids[0], 0, ids[1], 0, 0, ids[2], ids[2]]
    emissions = torch.nn.functional.one_hot(torch.tensor(frames), len(dictionary)).float()
    assert greedy_decode(emissions, dictionary, post_process_as="sentencepiece") == ["HELLO WORLD"]
