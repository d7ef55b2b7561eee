"""Several audio shards under one fairseq dataset, and how an update's batches are drawn from them.

Each shard is an ordinary fairseq ``FileAudioDataset``. ``ShardedAudioDataset`` puts them under
one index space so that fairseq's ``EpochBatchIterator`` (checkpointed position, worker
sharding, prefetching) drives them unchanged; a "batch" of it is the union of one sub-batch per
shard taking part in the update, and its collater returns ``{"shards": {name: fairseq sample}}``.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from fairseq.data import FairseqDataset, FileAudioDataset, data_utils

from .manifests import DataError, check_audio, read_manifest

logger = logging.getLogger(__name__)

# What reading a clip raises when its file broke: fairseq's FileAudioDataset retries soundfile
# three times, then raises a bare Exception("Failed to load PATH").
UNREADABLE = (Exception,)


def clip_path(dataset: FileAudioDataset, index: int) -> str:
    """The audio file of clip ``index``, as FileAudioDataset finds it (names are stored compressed)."""
    name = dataset.fnames[index]
    name = name if isinstance(dataset.fnames, list) else name.as_py()
    return os.path.join(dataset.root_dir, dataset.text_compressor.decompress(name))


class ShardedAudioDataset(FairseqDataset):
    """Audio datasets of several shards behind one index space."""

    def __init__(self, split: str, shards: "OrderedDict[str, FairseqDataset]", seed: int = 1) -> None:
        super().__init__()
        self.split = split
        self.seed = seed
        self.epoch = 1
        self.names = list(shards)
        self.datasets = list(shards.values())
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets]).tolist()
        self.sizes = np.concatenate([np.asarray(d.sizes) for d in self.datasets])
        self.audio_dtype: Optional[torch.dtype] = None
        """Set by the task from the model: the dtype of the collated audio (None: float32)."""

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple:
        """(shard position, index inside that shard) of a global index."""
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def __getitem__(self, index: int) -> dict:
        shard, local = self.locate(index)
        try:
            item = self.datasets[shard][local]
        except UNREADABLE as error:
            # The manifests were checked at the start; a file that broke since (deleted, truncated
            # on a failing disk) must not end a run of days: the clip is left out and counted.
            path = clip_path(self.datasets[shard], local)
            logger.warning("shard %s (%s): %s is unreadable now, left out (counted in unreadable_%s): %s",
                           self.names[shard], self.split, path, self.names[shard], error)
            return {"id": index, "shard": shard, "unreadable": True}
        item["shard"] = shard
        return item

    def collater(self, samples: List[dict]) -> dict:
        by_shard: Dict[int, List[dict]] = OrderedDict()
        unreadable: Dict[str, int] = {}
        for item in samples:
            if item.get("unreadable"):
                name = self.names[item["shard"]]
                unreadable[name] = unreadable.get(name, 0) + 1
                continue
            by_shard.setdefault(item["shard"], []).append(item)
        batches = OrderedDict()
        for shard, items in sorted(by_shard.items()):
            batch = self.datasets[shard].collater(self._crop(shard, items))
            if batch and self.audio_dtype is not None:
                batch["net_input"]["source"] = batch["net_input"]["source"].to(self.audio_dtype)
            if batch:
                batches[self.names[shard]] = batch
        if not batches:
            return {}
        return {"shards": batches, "unreadable": unreadable} if unreadable else {"shards": batches}

    def _crop(self, shard: int, items: List[dict]) -> List[dict]:
        """Crop the clips as fairseq's collater would, but with a generator seeded by the batch.

        fairseq crops with the global np.random, from the data loader's background thread:
        that races with the training thread's seeded numpy, so neither would repeat on resume.
        """
        dataset = self.datasets[shard]
        sizes = [len(item["source"]) for item in items]
        target = min(max(sizes) if dataset.pad else min(sizes), dataset.max_sample_size)
        rng = np.random.RandomState(
            hash((self.seed, self.epoch, shard, *(int(i["id"]) for i in items))) % 2**32
        )
        for item, size in zip(items, sizes):
            if size > target:
                start = rng.randint(0, size - target + 1)
                item["source"] = item["source"][start:start + target]
        return items

    def num_tokens(self, index: int) -> int:
        shard, local = self.locate(index)
        return self.datasets[shard].num_tokens(local)

    def size(self, index: int) -> int:
        shard, local = self.locate(index)
        return self.datasets[shard].size(local)

    def ordered_indices(self) -> np.ndarray:
        return np.arange(len(self))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for dataset in self.datasets:
            dataset.set_epoch(epoch)

    @property
    def supports_prefetch(self) -> bool:
        return False


def load_shards(data: str, names: Sequence[str], split: str, sample_rate: int, check_headers: bool = True,
                seed: int = 1, **dataset_options) -> ShardedAudioDataset:
    """Every shard's ``{split}.tsv`` under ``data``, checked (names the file and line of any
    problem) and loaded as fairseq ``FileAudioDataset``s (``dataset_options``: max_sample_size,
    min_sample_size, pad, normalize, num_buckets)."""
    shards = OrderedDict()
    for name in names:
        manifest_path = os.path.join(data, name, f"{split}.tsv")
        manifest = read_manifest(manifest_path)
        if check_headers:
            check_audio(manifest, sample_rate)
        shards[name] = FileAudioDataset(manifest_path=manifest_path, sample_rate=sample_rate, **dataset_options)
    return ShardedAudioDataset(split, shards, seed=seed)


@dataclass
class Batching:
    """How the batches of one epoch are built; see the task config for each field's meaning."""

    max_tokens: Optional[int]
    max_sentences: Optional[int]
    required_batch_size_multiple: int
    min_samples: int
    seed: int
    sampling: str = "all"
    batch_size: str = "proportional"
    shards_per_update: int = 0
    temperature: float = 2.0


def usable_indices(dataset: FairseqDataset, min_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffled-then-length-sorted indices of one shard's clips that are long enough to train on."""
    with data_utils.numpy_seed(seed, epoch):
        order = dataset.ordered_indices()
    return order[np.asarray(dataset.sizes)[order] >= min_samples]


def shard_batches(
    data: ShardedAudioDataset, shard: int, max_tokens: Optional[int], batching: Batching, epoch: int
) -> List[np.ndarray]:
    """One shard's batches for an epoch, as global indices."""
    dataset = data.datasets[shard]
    indices = usable_indices(dataset, batching.min_samples, batching.seed + shard, epoch)
    batches = dataset.batch_by_size(
        indices,
        max_tokens=max_tokens,
        max_sentences=batching.max_sentences,
        required_batch_size_multiple=batching.required_batch_size_multiple,
    )
    if len(batches) == 0:
        raise DataError(
            f"shard '{data.names[shard]}' ({data.split}): no batch could be formed from its "
            f"{len(indices)} usable clips (dataset.required_batch_size_multiple="
            f"{batching.required_batch_size_multiple} needs at least that many clips per batch; "
            "set it to 1 for small shards)"
        )
    return [np.asarray(b, dtype=np.int64) + data.offsets[shard] for b in batches]


def shard_audio_samples(data: ShardedAudioDataset, min_samples: int) -> np.ndarray:
    """Audio samples each shard contributes to an epoch, after dropping short clips."""
    return np.array(
        [np.minimum(d.sizes[d.sizes >= min_samples], getattr(d, "max_sample_size", np.inf)).sum()
         for d in data.datasets],
        dtype=np.float64,
    )


def per_shard_max_tokens(data: ShardedAudioDataset, batching: Batching) -> List[Optional[int]]:
    """Each shard's batch budget: ``max_tokens`` for all, or in proportion to its audio (paper)."""
    if batching.max_tokens is None or batching.batch_size == "equal":
        return [batching.max_tokens] * len(data.datasets)
    amount = shard_audio_samples(data, batching.min_samples)
    # Average budget stays max_tokens; a budget never drops below the longest (cropped) clip,
    # which fairseq's batch_by_size would reject.
    budgets = batching.max_tokens * len(amount) * amount / amount.sum()
    longest = [int(np.minimum(d.sizes, getattr(d, "max_sample_size", np.inf)).max()) for d in data.datasets]
    return [max(int(b), l) for b, l in zip(budgets, longest)]


def sampling_probabilities(amount: Sequence[float], temperature: float) -> np.ndarray:
    """XLS-R style shard sampling: p_i ∝ (n_i / Σ n)^(1/T); T=1 follows the data, T→∞ is uniform."""
    share = np.asarray(amount, dtype=np.float64) / np.sum(amount)
    p = share ** (1.0 / temperature)
    return p / p.sum()


def training_batches(data: ShardedAudioDataset, epoch: int, batching: Batching) -> List[np.ndarray]:
    """The epoch's update batches, each the union of one batch per shard taking part."""
    budgets = per_shard_max_tokens(data, batching)
    per_shard = [shard_batches(data, s, budgets[s], batching, epoch) for s in range(len(budgets))]
    rng = np.random.RandomState((batching.seed * 1009 + epoch) % 2**32)
    for batches in per_shard:
        rng.shuffle(batches)
    if batching.sampling == "all":
        # Every update takes one batch of every shard; the surplus batches of larger shards
        # (already shuffled) are skipped.
        updates = min(len(b) for b in per_shard)
        return [np.concatenate([b[u] for b in per_shard]) for u in range(updates)]
    chosen_per_update = batching.shards_per_update or len(per_shard)
    p = sampling_probabilities(shard_audio_samples(data, batching.min_samples), batching.temperature)
    updates = -(-sum(len(b) for b in per_shard) // chosen_per_update)
    cursor = [0] * len(per_shard)
    out = []
    for _ in range(updates):
        chosen = sorted(rng.choice(len(per_shard), chosen_per_update, replace=False, p=p))
        parts = []
        for s in chosen:
            parts.append(per_shard[s][cursor[s] % len(per_shard[s])])
            cursor[s] += 1
        out.append(np.concatenate(parts))
    return out


def validation_batches(data: ShardedAudioDataset, epoch: int, batching: Batching) -> List[np.ndarray]:
    """Every shard's batches, one shard per batch, nothing skipped or balanced."""
    return [b for s in range(len(data.datasets)) for b in shard_batches(data, s, batching.max_tokens, batching, 1)]
