"""Frozen features of an upstream: a pre-training checkpoint's layers (wav2vec 2.0, BEST-RQ, CPC) or
FBANK (80 log-mel filterbanks per 10 ms, normalised per utterance: SUPERB's floor), and their cache.

Features (every transformer, Conformer or LSTM block's output, in eval mode, no masking) are
computed once per checkpoint, set and split and cached as
``CACHE/<checkpoint SHA-256>/<set folder hash>/<split>.pt``: every measure of the same checkpoint
reuses them, and a changed checkpoint has another SHA-256, so its stale features are never read.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..checkpoints import file_sha256

FBANK = "fbank"
FBANK_FRAME_STEP = 0.01
"""Seconds between FBANK frames (Kaldi's 10 ms shift)."""


class Upstream:
    """A frozen feature extractor: fbank, or a pre-training checkpoint's layers (wav2vec 2.0, BEST-RQ, CPC)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.key = FBANK if source == FBANK else file_sha256(source)

    @functools.cached_property
    def _network(self) -> tuple:
        """(frozen model or None for fbank, whether it expects layer-normalised audio); loaded
        on first use only, so that a probe whose features are all cached never loads it."""
        if self.source == FBANK:
            return None, False
        from .gap import load_model

        model, cfg = load_model(self.source, given_as="upstream ")
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model, bool(cfg["task"].get("normalize", False))

    @property
    def model(self):
        return self._network[0]

    @property
    def normalize(self) -> bool:
        return self._network[1]

    @property
    def frame_step(self) -> float:
        """Seconds between the features' frames (what ABX and the phone probe place frames by)."""
        return FBANK_FRAME_STEP if self.model is None else model_frame_step(self.model)

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        """(layers, frames, dim) features of one mono 16 kHz clip."""
        if self.model is None:
            import torchaudio

            fbank = torchaudio.compliance.kaldi.fbank(wav.unsqueeze(0) * 32768, num_mel_bins=80,
                                                      sample_frequency=16000, dither=0.0)
            fbank = (fbank - fbank.mean(0)) / (fbank.std(0) + 1e-5)
            return fbank.unsqueeze(0)
        if self.normalize:
            wav = F.layer_norm(wav, wav.shape)
        out = self.model.extract_features(wav.unsqueeze(0), padding_mask=None, mask=False)
        return torch.stack([x.squeeze(1) for x, *_ in out["layer_results"]])


def cached_features(upstream: Upstream, folder: str, split: str, cache: str, audio: List[str]) -> List[torch.Tensor]:
    """Per clip (layers, frames, dim) float16 features: from the cache, else computed and cached."""
    from .evaluation import read_audio

    folder_key = hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:16]
    path = os.path.join(cache, upstream.key, folder_key, f"{split}.pt")
    if os.path.exists(path):
        stored = torch.load(path)
        if stored["audio"] == audio:
            return stored["features"]
    features = [upstream(read_audio(a, 16000, upstream.normalize)).to(torch.float16) for a in audio]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"source": upstream.source, "audio": audio, "features": features}, tmp)
    os.replace(tmp, path)  # whole or absent
    return features




def model_frame_step(model) -> float:
    """Seconds between a pre-training network's output frames: its convolutions' total stride
    (wav2vec 2.0: 20 ms; CPC: 10 ms), or BEST-RQ's stacked 10 ms frames."""
    from ..models.eq_bestrq import EqBestRqModel
    from ..models.eq_cpc import FRAME_SHIFT_SAMPLES, EqCpcModel

    if isinstance(model, EqBestRqModel):
        return 0.01 * model.cfg.stack_frames
    if isinstance(model, EqCpcModel):
        return FRAME_SHIFT_SAMPLES / 16000
    strides = [layer[2] for layer in eval(model.cfg.conv_feature_layers)]
    return math.prod(strides) / 16000


def manifest_audio(manifest: str) -> List[str]:
    """Absolute audio paths of a fairseq manifest (.tsv), in its order."""
    from ..data.manifests import read_manifest

    parsed = read_manifest(manifest)
    return [parsed.audio_path(entry) for entry in parsed.entries]


def item_audio(item_file: str, audio_root: Optional[str] = None) -> Dict[str, str]:
    """Each clip id of an ABX item file's ``#file`` column -> its audio: the rows of the manifest
    beside it (SPLIT.tsv for SPLIT.item, as eqssl-make-corpus writes them), or else every .flac
    or .wav under ``audio_root`` by its name without extension, as libri-light finds them."""
    from ..data.manifests import DataError

    manifest = os.path.splitext(item_file)[0] + ".tsv"
    if audio_root is None and os.path.isfile(manifest):
        paths = manifest_audio(manifest)
        where = manifest
    elif audio_root is not None:
        if not os.path.isdir(audio_root):
            raise DataError(f"--audio-root {audio_root}: no such folder")
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(audio_root) for f in files
                       if f.endswith((".flac", ".wav")))
        where = audio_root
    else:
        raise DataError(f"{item_file}: no manifest {os.path.basename(manifest)} beside it; "
                        "give --audio-root, the folder that holds its audio files")
    found: Dict[str, str] = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in found:
            raise DataError(f"{where}: two audio files share the id {stem!r} ({found[stem]}, {path}); "
                            "an item file names clips by file name without extension")
        found[stem] = path
    return found
