"""Bad input to every eqssl command is one line that names the argument the user gave, with no
traceback: an unreadable, a truncated and a wrong-family checkpoint for each command that takes
one (eqssl-probe, -gap, -evaluate, -export), and a bad argument for the others (-reproduce,
-make-corpus, -import). Each command's ``main`` runs here, as its console script would."""

from pathlib import Path
from typing import Callable, List, Tuple

import pytest
import torch

from eqssl.cli.evaluate import main as evaluate_main
from eqssl.cli.export import main as export_main
from eqssl.cli.gap import main as gap_main
from eqssl.cli.probe import main as probe_main
from eqssl.cli.reproduce import main as reproduce_main
from eqssl.corpus.import_cli import main as import_main
from eqssl.corpus.make_corpus import main as make_corpus_main


def fairseq_checkpoint(path: Path, model: str, task: str) -> Path:
    """A complete fairseq checkpoint, as fairseq's loader reads it, of ``model`` and ``task``."""
    torch.save({"args": None, "cfg": {"model": {"_name": model}, "task": {"_name": task}},
                "model": {"weight": torch.zeros(4, 2)},
                "optimizer_history": [{"num_updates": 0, "lr_scheduler_state": {}, "optimizer_name": "adam"}],
                "extra_state": {}, "last_optimizer_state": None}, path)
    return path


def other_family(path: Path) -> Path:
    """A complete fairseq checkpoint of another model family (a language model)."""
    return fairseq_checkpoint(path, "transformer_lm", "language_modeling")


def unreadable(path: Path) -> Path:
    path.write_text("not a checkpoint\n")
    return path


def truncated(path: Path) -> Path:
    whole = other_family(path.with_name("whole.pt")).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


DAMAGES = {  # how each checkpoint is made -> what the one line must say about it
    "unreadable": (unreadable, "not a PyTorch checkpoint"),
    "truncated": (truncated, "truncated or corrupt checkpoint"),
    "wrong-family": (other_family, "'transformer_lm'"),
}


@pytest.fixture(scope="module")
def labelled(corpus, tmp_path_factory) -> Path:
    """A labelled set over the toy corpus's read shard (train_1h = its train clips, test = its valid
    clips, every transcript 'a b'), enough for the probe to reach its upstream."""
    folder = tmp_path_factory.mktemp("labelled")
    for split, source in (("train_1h", "train"), ("test", "valid")):
        manifest = (corpus / "read" / f"{source}.tsv").read_text()
        (folder / f"{split}.tsv").write_text(manifest)
        clips = len(manifest.splitlines()) - 1
        (folder / f"{split}.wrd").write_text("a b\n" * clips)
        (folder / f"{split}.ltr").write_text("a | b |\n" * clips)
    (folder / "dict.ltr.txt").write_text("| 4\na 2\nb 2\n")
    return folder


def one_error(command: Callable, argv: List[str], capsys) -> Tuple[object, str]:
    """(exit status, the error text) of one command run in this process; fails on a traceback
    (any exception other than SystemExit reaches pytest) or on output to stdout."""
    try:
        status = command([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    message = captured.err if isinstance(status, int) or status is None else captured.err + f"{status}\n"
    assert status not in (0, None), (status, captured.out, message)
    assert captured.out == "", captured.out
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in message, message
    return status, lines[0]


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_bad_checkpoint_is_one_line_naming_the_argument(damage, corpus, labelled, tmp_path, capsys):
    make, reason = DAMAGES[damage]
    bad = make(tmp_path / "model.pt")
    commands = {  # command: (argv, how the line names the checkpoint)
        "eqssl-probe": (probe_main, [bad, labelled, "--cache", tmp_path / "cache"], f"upstream {bad}"),
        "eqssl-gap": (gap_main, [corpus, bad], f"checkpoint {bad}"),
        "eqssl-evaluate": (evaluate_main, [bad, f"read={labelled}:test"], f"checkpoint {bad}"),
        "eqssl-export": (export_main, [bad, tmp_path / "exported.pt"], f"input {bad}"),
    }
    for name, (command, argv, named) in commands.items():
        _, line = one_error(command, argv, capsys)
        assert line.startswith(f"{name}: ") and f"{named}: " in line and reason in line, (name, line)
        if damage == "wrong-family":  # the hint for fine-tuned checkpoints is not given to others
            assert "fine-tuned checkpoint:" not in line, line
    assert not (tmp_path / "exported.pt").exists()


def test_a_fine_tuned_checkpoint_where_a_pretrained_one_belongs_says_which_to_give(corpus, tmp_path, capsys):
    finetuned = fairseq_checkpoint(tmp_path / "checkpoint_best.pt", "wav2vec_ctc", "audio_finetuning")
    _, line = one_error(gap_main, [corpus, finetuned], capsys)
    assert line.startswith(f"eqssl-gap: checkpoint {finetuned}: holds a 'wav2vec_ctc' model"), line
    assert line.endswith("a fine-tuned checkpoint: give the pre-training checkpoint it started from"), line


def test_bad_folders_and_names_are_one_line_naming_the_argument(corpus, tmp_path, capsys):
    missing = tmp_path / "missing"
    cases = [
        (probe_main, ["fbank", corpus / "read"], f"eqssl-probe: folder {corpus / 'read'}: no dict.ltr.txt"),
        (probe_main, [missing / "model.pt", corpus / "read"], f"eqssl-probe: upstream {missing / 'model.pt'}: no such file"),
        (gap_main, [missing, "model.pt"], f"eqssl-gap: data {missing}: no such folder"),
        (gap_main, [tmp_path, "model.pt"], f"eqssl-gap: data {tmp_path}: no shard sub-folder with a train.tsv"),
        (gap_main, [corpus, "model.pt", "--shards", "read,nope"], "eqssl-gap: --shards: unknown shard 'nope'"),
        (evaluate_main, [missing / "model.pt", f"read={corpus}:test"], f"checkpoint {missing / 'model.pt'}: no such file"),
        (export_main, [missing / "model.pt", tmp_path / "out.pt"], f"input {missing / 'model.pt'}: no such file"),
        (reproduce_main, ["--size", tmp_path / "mine.yaml", "--out", tmp_path / "run"],
         f"eqssl-reproduce: --size {tmp_path / 'mine.yaml'}: no such settings file"),
        (reproduce_main, ["--preset", "nosuch", "--out", tmp_path / "run"], "eqssl-reproduce: unknown preset 'nosuch'"),
        (make_corpus_main, [tmp_path / "corpus", "--preset", "nosuch"], "eqssl-make-corpus: error: unknown preset 'nosuch'"),
        (make_corpus_main, [tmp_path / "corpus", "--size", "huge"], "eqssl-make-corpus: error: unknown size 'huge'"),
        (import_main, ["folder", missing, tmp_path / "imported"], f"eqssl-import: error: SOURCE {missing}: no such folder"),
    ]
    for command, argv, expected in cases:
        _, line = one_error(command, argv, capsys)
        assert expected in line, (argv, line)
    assert not (tmp_path / "run").exists() and not (tmp_path / "imported").exists()
