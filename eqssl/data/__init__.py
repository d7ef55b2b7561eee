"""Manifests, shard datasets and batch balancing for equilibrium pre-training."""

from .manifests import DataError, Manifest, check_audio, read_manifest, receptive_field  # noqa: F401
