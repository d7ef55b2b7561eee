"""The deterministic phone probe: linear phone separability of a frozen layer (CPC_audio's
``linear_separability.py`` measure), fitted in closed form so that it has no seed and no noise of
its own.

Labels come from ``SPLIT.phn`` beside the manifest (one line per manifest row: the clip's id, then
one phone per 10 ms frame, ``SIL`` outside phones; eqssl-make-corpus writes it from eSpeak NG's
phoneme events, docs/corpus.md). An upstream frame i stands at (i + ½) × its frame step, as in
ABX, and takes the label of the 10 ms frame that holds that time.

The classifier: ridge regression from the layer's frames (standardised with the train split's
mean and deviation, plus a bias) to one-hot phones, solved in float64 by one linear solve,
``(XᵀX + λ N I) W = XᵀY``, then the arg-max phone of each test frame. The score is the frame phone
error (%) over the test frames that lie inside a phone: silence is a class in the fit, but the
clips' leading and trailing pauses are not scored, so that their share does not dilute the
figure. A phone never seen in training is an error.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch

from ..data.manifests import DataError
from .features import Upstream, cached_features, manifest_audio

SILENCE = "SIL"
LABEL_STEP = 0.01
"""Seconds per label of a ``.phn`` line."""
RIDGE = 1e-3
"""λ, relative to the number of frames: the standardised features' Gram matrix has ones on its
diagonal per frame, so this is a fixed, small share of it for every upstream."""


def read_frame_labels(folder: str, split: str, audio: Sequence[str]) -> List[List[str]]:
    """Per manifest row, its 10 ms phone labels from FOLDER/SPLIT.phn (checked against the manifest)."""
    path = os.path.join(folder, f"{split}.phn")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no phone labels (eqssl-make-corpus writes SPLIT.phn beside each manifest; "
                        "a corpus of your own needs one line per manifest row: id, then a phone per 10 ms)")
    with open(path, encoding="utf-8") as f:
        lines = [line.split() for line in f.read().splitlines()]
    if len(lines) != len(audio):
        raise DataError(f"{path}: {len(lines)} lines, but its manifest {split}.tsv lists {len(audio)} clips")
    for number, (fields, clip) in enumerate(zip(lines, audio), start=1):
        stem = os.path.splitext(os.path.basename(clip))[0]
        if not fields or fields[0] != stem:
            raise DataError(f"{path}:{number}: expected the id {stem!r} of manifest row {number}, "
                            f"got {fields[0] if fields else 'an empty line'!r}")
    return [fields[1:] for fields in lines]


def labels_at(frame_labels: Sequence[str], frames: int, frame_step: float) -> List[str]:
    """The label of each of ``frames`` upstream frames: the 10 ms label at (i + ½) × frame_step
    (``SIL`` past the last label)."""
    labels = []
    for i in range(frames):
        index = int((i + 0.5) * frame_step / LABEL_STEP)
        labels.append(frame_labels[index] if index < len(frame_labels) else SILENCE)
    return labels


def _frames_and_labels(features: Sequence[torch.Tensor], layer: int, labels: Sequence[Sequence[str]],
                       frame_step: float) -> tuple:
    x = torch.cat([f[layer].double() for f in features])
    y = [label for f, clip in zip(features, labels) for label in labels_at(clip, f.size(1), frame_step)]
    return x, y


def fit_and_score(train_x: torch.Tensor, train_y: Sequence[str], test_x: torch.Tensor,
                  test_y: Sequence[str]) -> dict:
    """Ridge fit on the train frames, frame phone error (%) on the test frames inside phones."""
    phones = sorted(set(train_y))
    index = {p: i for i, p in enumerate(phones)}
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5

    def design(x: torch.Tensor) -> torch.Tensor:
        x = (x - mean) / std
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)

    x = design(train_x)
    targets = torch.zeros(len(train_y), len(phones), dtype=torch.float64)
    targets[torch.arange(len(train_y)), torch.tensor([index[p] for p in train_y])] = 1.0
    gram = x.T @ x + RIDGE * len(x) * torch.eye(x.size(1), dtype=x.dtype)
    weights = torch.linalg.solve(gram, x.T @ targets)
    predicted = (design(test_x) @ weights).argmax(1).tolist()
    scored = [(phones[p], y) for p, y in zip(predicted, test_y) if y != SILENCE]
    errors = sum(p != y for p, y in scored)
    return {"error": 100.0 * errors / max(1, len(scored)), "frames": len(scored), "phones": len(phones) - (SILENCE in index),
            "train_frames": len(train_y), "unseen_in_train": sum(y not in index for _, y in scored)}


def phone_probe(upstream: Upstream, folder: str, cache: str, train_split: str = "train_1h",
                test_split: str = "test", layers: Optional[Sequence[int]] = None) -> Dict[int, dict]:
    """Per layer (all by default): the phone probe fitted on FOLDER's train split, scored on its test split."""
    train_audio, test_audio = (manifest_audio(os.path.join(folder, f"{split}.tsv")) for split in (train_split, test_split))
    train_labels = read_frame_labels(folder, train_split, train_audio)
    test_labels = read_frame_labels(folder, test_split, test_audio)
    train_features = cached_features(upstream, folder, train_split, cache, train_audio)
    test_features = cached_features(upstream, folder, test_split, cache, test_audio)
    step = upstream.frame_step
    results = {}
    for layer in layers if layers is not None else range(train_features[0].size(0)):
        train_x, train_y = _frames_and_labels(train_features, layer, train_labels, step)
        test_x, test_y = _frames_and_labels(test_features, layer, test_labels, step)
        results[layer] = fit_and_score(train_x, train_y, test_x, test_y)
    return results
