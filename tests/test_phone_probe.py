"""eqssl.measures.phone_probe: the closed-form phone probe on constructed frames, its label
placement, and its checks of the .phn file against the manifest."""

import pytest
import torch

from eqssl.data.manifests import DataError
from eqssl.measures.phone_probe import SILENCE, fit_and_score, labels_at, read_frame_labels


def _frames(phones, per_phone, dim, noise, seed):
    """Frames of a few phones: each phone a fixed random direction, plus Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    centres = {p: torch.randn(dim, generator=torch.Generator().manual_seed(100 + i)) for i, p in enumerate(phones)}
    labels = [p for p in phones for _ in range(per_phone)]
    x = torch.stack([centres[p] for p in labels]) + noise * torch.randn(len(labels), dim, generator=generator)
    return x.double(), labels


def test_separable_frames_score_zero_and_the_score_is_deterministic():
    phones = ["a", "e", "i", "o", "u", SILENCE]
    train_x, train_y = _frames(phones, 40, 16, 0.05, seed=1)
    test_x, test_y = _frames(phones, 20, 16, 0.05, seed=2)
    first = fit_and_score(train_x, train_y, test_x, test_y)
    assert first["error"] == 0.0
    assert first["frames"] == 5 * 20  # silence is fitted, not scored
    assert first["phones"] == 5
    assert fit_and_score(train_x, train_y, test_x, test_y) == first


def test_random_frames_score_near_chance():
    phones = [f"p{i}" for i in range(8)]
    generator = torch.Generator().manual_seed(3)
    train_x = torch.randn(800, 16, generator=generator).double()
    test_x = torch.randn(800, 16, generator=generator).double()
    train_y = [phones[i % 8] for i in range(800)]
    test_y = [phones[(i * 7 + 3) % 8] for i in range(800)]
    result = fit_and_score(train_x, train_y, test_x, test_y)
    assert result["error"] > 75.0  # chance is 87.5 % with 8 balanced phones


def test_a_phone_never_seen_in_training_is_an_error():
    train_x, train_y = _frames(["a", "e"], 30, 8, 0.01, seed=4)
    test_x, test_y = _frames(["a", "e"], 10, 8, 0.01, seed=5)
    test_y = test_y[:10] + ["z"] * 10
    result = fit_and_score(train_x, train_y, test_x, test_y)
    assert result["error"] == pytest.approx(50.0) and result["unseen_in_train"] == 10


def test_labels_are_taken_at_each_frame_centre():
    ten_ms = ["SIL", "a", "a", "b", "b", "b", "c"]
    assert labels_at(ten_ms, 7, 0.01) == ten_ms
    # 20 ms frames stand at 10, 30, 50, 70 ms: the 10 ms labels 1, 3, 5 and past the end
    assert labels_at(ten_ms, 4, 0.02) == ["a", "b", "b", "SIL"]


def test_phone_labels_must_match_the_manifest(tmp_path):
    (tmp_path / "test.tsv").write_text("/audio\nx/000001.flac\t1600\nx/000002.flac\t1600\n")
    audio = ["/audio/x/000001.flac", "/audio/x/000002.flac"]
    with pytest.raises(DataError, match=r"test\.phn: no phone labels"):
        read_frame_labels(str(tmp_path), "test", audio)
    (tmp_path / "test.phn").write_text("000001 SIL a a\n")
    with pytest.raises(DataError, match=r"test\.phn: 1 lines, but its manifest test\.tsv lists 2 clips"):
        read_frame_labels(str(tmp_path), "test", audio)
    (tmp_path / "test.phn").write_text("000001 SIL a a\n000003 SIL b\n")
    with pytest.raises(DataError, match=r"test\.phn:2: expected the id '000002'"):
        read_frame_labels(str(tmp_path), "test", audio)
    (tmp_path / "test.phn").write_text("000001 SIL a a\n000002 SIL b\n")
    assert read_frame_labels(str(tmp_path), "test", audio) == [["SIL", "a", "a"], ["SIL", "b"]]
