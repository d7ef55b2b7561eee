"""Bad input stops ``fairseq-train`` with one clear error before any training; short clips and a
non-finite inner loss are handled without a crash.

Every test runs the real ``fairseq-train`` command line (tiny model, CPU) on a damaged private
copy of the toy corpus. Manifest line 1 is the audio root folder, so clip ``i`` is on line ``i + 2``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
import soundfile
import torch

from conftest import fairseq_train, train_log_values

SAMPLE_RATE = 16000
RECEPTIVE_FIELD = 400
"""Input samples the tiny model's feature encoder needs for one frame."""
TRAIN_MIN_SAMPLE_SIZE = 8000
"""The --min-sample-size of conftest.TRAIN_FLAGS."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def manifest_lines(manifest: Path) -> List[str]:
    return manifest.read_text().splitlines()


def write_manifest(manifest: Path, lines: List[str]) -> None:
    manifest.write_text("\n".join(lines) + "\n")


def clip_on_line(data: Path, shard: str, split: str, line: int) -> Path:
    """The audio file listed on (1-based) ``line`` of ``<shard>/<split>.tsv``."""
    lines = manifest_lines(data / shard / f"{split}.tsv")
    return Path(lines[0]) / lines[line - 1].split("\t")[0]


def rewrite_clip(data: Path, shard: str, split: str, line: int, audio: np.ndarray,
                 sample_rate: int = SAMPLE_RATE, subtype=None, fix_manifest: bool = True) -> Path:
    """Overwrite the clip on ``line`` with ``audio``; with ``fix_manifest`` its size is updated too."""
    manifest = data / shard / f"{split}.tsv"
    path = clip_on_line(data, shard, split, line)
    soundfile.write(str(path), audio, sample_rate, subtype=subtype)
    if fix_manifest:
        lines = manifest_lines(manifest)
        name = lines[line - 1].split("\t")[0]
        lines[line - 1] = f"{name}\t{len(audio)}"
        write_manifest(manifest, lines)
    return path


def fill_shard_with_nan(data: Path, shard: str, split: str = "train") -> None:
    """Overwrite every clip of ``<shard>/<split>.tsv`` with NaN samples of its own length."""
    manifest = data / shard / f"{split}.tsv"
    for line in range(2, len(manifest_lines(manifest)) + 1):
        frames = soundfile.info(str(clip_on_line(data, shard, split, line))).frames
        rewrite_clip(data, shard, split, line, np.full(frames, np.nan, dtype=np.float32), subtype="FLOAT")


def tone(n_samples: int) -> np.ndarray:
    return (0.3 * np.sin(np.arange(n_samples) * 2 * np.pi * 220 / SAMPLE_RATE)).astype(np.float32)


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_stopped_before_training(result, save_dir: Path, *fragments: str) -> None:
    """Non-zero exit, the last output line names every fragment, no update ran, no checkpoint."""
    out = result.stdout
    final = last_line(out)
    assert result.returncode != 0, f"fairseq-train succeeded on bad input; output ends:\n{out[-3000:]}"
    for fragment in fragments:
        assert fragment in final, (
            f"last output line does not name {fragment!r}:\n  {final}\noutput ends:\n{out[-3000:]}"
        )
    assert "| train_inner |" not in out and "[train_inner]" not in out, "training started before the error"
    assert ", in forward" not in out, f"the error came from deep in the model:\n{out[-3000:]}"
    assert not (save_dir / "checkpoint_last.pt").exists(), "a checkpoint was saved"


# --------------------------------------------------------------------------------------------
# Damage: each function breaks the corpus copy and returns the fragments the error must name.
# --------------------------------------------------------------------------------------------


def missing_shard_folder(data: Path) -> List[str]:
    shutil.rmtree(data / "telephone")
    return ["task.shards", "'telephone'", str(data / "telephone")]


def unknown_shard_name(data: Path) -> List[str]:
    return ["task.shards", "'nope'"]


def empty_manifest(data: Path) -> List[str]:
    (data / "read" / "train.tsv").write_bytes(b"")
    return [str(data / "read" / "train.tsv"), "empty"]


def manifest_without_clips(data: Path) -> List[str]:
    manifest = data / "read" / "train.tsv"
    write_manifest(manifest, manifest_lines(manifest)[:1])
    return [str(manifest), "no audio files"]


def line_without_tab(data: Path) -> List[str]:
    manifest = data / "noisy" / "train.tsv"
    lines = manifest_lines(manifest)
    lines[2] = lines[2].replace("\t", " ")
    write_manifest(manifest, lines)
    return [f"{manifest}:3"]


def size_not_an_integer(data: Path) -> List[str]:
    manifest = data / "telephone" / "train.tsv"
    lines = manifest_lines(manifest)
    lines[4] = lines[4].split("\t")[0] + "\tmany"
    write_manifest(manifest, lines)
    return [f"{manifest}:5"]


def missing_audio_file(data: Path) -> List[str]:
    path = clip_on_line(data, "read", "train", 4)
    path.unlink()
    return [f"{data / 'read' / 'train.tsv'}:4", str(path)]


def missing_valid_audio_file(data: Path) -> List[str]:
    path = clip_on_line(data, "telephone", "valid", 3)
    path.unlink()
    return [f"{data / 'telephone' / 'valid.tsv'}:3", str(path)]


def unreadable_audio_file(data: Path) -> List[str]:
    path = clip_on_line(data, "noisy", "train", 6)
    path.write_bytes(b"this is not a RIFF header\x00\x01\x02" * 40)
    return [f"{data / 'noisy' / 'train.tsv'}:6", str(path)]


def wrong_sample_rate(data: Path) -> List[str]:
    path = rewrite_clip(data, "read", "train", 2, tone(12000), sample_rate=8000)
    return [f"{data / 'read' / 'train.tsv'}:2", str(path), "8000"]


def stereo_clip(data: Path) -> List[str]:
    path = rewrite_clip(data, "telephone", "train", 7, np.stack([tone(12000)] * 2, axis=1))
    return [f"{data / 'telephone' / 'train.tsv'}:7", str(path), "2 channels"]


def wrong_sample_count(data: Path) -> List[str]:
    manifest = data / "noisy" / "train.tsv"
    lines = manifest_lines(manifest)
    name, size = lines[8].split("\t")
    lines[8] = f"{name}\t{int(size) + 123}"
    write_manifest(manifest, lines)
    return [f"{manifest}:9", str(int(size) + 123)]


def intact(data: Path) -> List[str]:
    return []


CASES = [
    # (damage, extra fairseq-train flags, fragments named by the damage function + these)
    pytest.param(missing_shard_folder, ["--shards", "read,telephone,noisy"], [], id="missing-shard-folder"),
    pytest.param(unknown_shard_name, ["--shards", "read,nope"], [], id="unknown-shard-name"),
    pytest.param(empty_manifest, [], [], id="empty-manifest"),
    pytest.param(manifest_without_clips, [], [], id="manifest-without-clips"),
    pytest.param(line_without_tab, [], [], id="manifest-line-without-tab"),
    pytest.param(size_not_an_integer, [], [], id="manifest-size-not-integer"),
    pytest.param(missing_audio_file, [], [], id="missing-audio-file"),
    pytest.param(missing_valid_audio_file, [], [], id="missing-valid-audio-file"),
    pytest.param(unreadable_audio_file, [], [], id="unreadable-audio-file"),
    pytest.param(wrong_sample_rate, [], [], id="sample-rate-mismatch"),
    pytest.param(stereo_clip, [], [], id="stereo-clip"),
    pytest.param(wrong_sample_count, [], [], id="manifest-sample-count-mismatch"),
    pytest.param(intact, ["--inner-steps", "-1"], ["task.inner_steps", "got -1"], id="negative-inner-steps"),
    pytest.param(intact, ["--inner-lr", "0"], ["task.inner_lr", "got 0"], id="zero-inner-lr"),
    pytest.param(intact, ["--inner-lr", "-0.001"], ["task.inner_lr", "got -0.001"], id="negative-inner-lr"),
    pytest.param(intact, ["--shard-weights", "read:2,nope:1"], ["task.shard_weights", "'nope'"],
                 id="unknown-shard-weight"),
]


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, extra, named", CASES)
def test_bad_input_stops_before_training(corpus_copy, tmp_path, damage: Callable, extra, named):
    """Each kind of bad input or setting stops fairseq-train with one error naming it, before any update."""
    fragments = damage(corpus_copy) + named
    save_dir = tmp_path / "checkpoints"
    result = fairseq_train(corpus_copy, save_dir, "--max-update", "2", *extra)
    assert_stopped_before_training(result, save_dir, *fragments)


def test_missing_data_folder_stops_before_training(corpus_copy, tmp_path):
    """A task.data folder that does not exist stops fairseq-train with an error naming it."""
    data = corpus_copy.parent / "no-such-corpus"
    save_dir = tmp_path / "checkpoints"
    result = fairseq_train(data, save_dir, "--max-update", "2")
    assert_stopped_before_training(result, save_dir, "task.data", str(data))


SHORT_CLIPS = [
    # (clip length, extra flags, the threshold the warning/error must name)
    pytest.param(300, ["--min-sample-size", "0"], RECEPTIVE_FIELD, id="below-receptive-field"),
    pytest.param(4000, [], TRAIN_MIN_SAMPLE_SIZE, id="below-min-sample-size"),
]


@pytest.mark.parametrize("length, extra, threshold", SHORT_CLIPS)
def test_short_clips_are_skipped_and_counted(corpus_copy, tmp_path, length, extra, threshold):
    """Some too-short clips in a shard are skipped with a warning counting them; training runs."""
    short_lines = [2, 5, 8]
    for line in short_lines:
        rewrite_clip(corpus_copy, "noisy", "train", line, tone(length))
    save_dir = tmp_path / "checkpoints"
    result = fairseq_train(corpus_copy, save_dir, "--max-update", "2", *extra)
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    warning = f"skipped {len(short_lines)} clips shorter than {threshold} samples"
    assert any("noisy" in line and warning in line for line in out.splitlines()), (
        f"no warning '{warning}' for shard noisy:\n{out[-3000:]}"
    )
    # The intact shards skip nothing.
    assert not any(f"shard {s} (train): skipped" in out for s in ("read", "telephone"))
    assert len(train_log_values(out, "num_updates")) == 2
    assert (save_dir / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("length, extra, threshold", SHORT_CLIPS)
def test_shard_of_only_short_clips_stops_before_training(corpus_copy, tmp_path, length, extra, threshold):
    """A train.tsv whose every clip is too short stops fairseq-train with an error naming it."""
    manifest = corpus_copy / "read" / "train.tsv"
    for line in range(2, len(manifest_lines(manifest)) + 1):
        rewrite_clip(corpus_copy, "read", "train", line, tone(length))
    save_dir = tmp_path / "checkpoints"
    result = fairseq_train(corpus_copy, save_dir, "--max-update", "2", *extra)
    assert_stopped_before_training(result, save_dir, str(manifest), str(threshold))


def test_non_finite_inner_loss_never_reaches_the_parameters(corpus_copy, tmp_path):
    """A shard whose loss is NaN is left out of each update with a counted warning; weights stay finite."""
    fill_shard_with_nan(corpus_copy, "noisy")
    save_dir = tmp_path / "checkpoints"
    result = fairseq_train(corpus_copy, save_dir, "--inner-steps", "1", "--max-update", "3")
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    assert any("shard noisy left out" in line for line in out.splitlines()), (
        f"no warning that shard noisy was left out:\n{out[-3000:]}"
    )
    dropped = train_log_values(out, "dropped_noisy")
    assert len(dropped) == 3 and sum(dropped) > 0, dropped
    assert sum(train_log_values(out, "dropped_read") + train_log_values(out, "dropped_telephone")) == 0
    assert all(math.isfinite(v) for v in train_log_values(out, "loss")), train_log_values(out, "loss")

    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["model"], "checkpoint has no parameters"
    for name, tensor in state["model"].items():
        if torch.is_floating_point(tensor):
            assert torch.isfinite(tensor).all(), f"parameter {name} is not finite"
