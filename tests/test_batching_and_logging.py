"""How an epoch's update batches are drawn from the shards, how a batch is collated, and what the
criterion logs per shard.

The batching tests build real fairseq ``FileAudioDataset`` objects from the toy corpus's manifests
under a real ``ShardedAudioDataset``; expected values are computed here from the manifests.
One ``fairseq-train`` run checks temperature sampling end to end.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from fairseq import metrics
from fairseq.data import FileAudioDataset

from conftest import fairseq_train
from eqssl.bilevel import ShardRecord
from eqssl.criterions import equilibrium_wav2vec as criterion_module
from eqssl.criterions.equilibrium_wav2vec import EquilibriumWav2vecCriterion
from eqssl.data.shards import (
    Batching,
    ShardedAudioDataset,
    per_shard_max_tokens,
    sampling_probabilities,
    shard_batches,
    training_batches,
    validation_batches,
)

SHARDS = ["noisy", "read", "telephone"]
"""The corpus fixture's shards, in the task's (sorted) order."""
SAMPLE_RATE = 16000
MAX_SAMPLE_SIZE = 24000
"""--max-sample-size of conftest.TRAIN_FLAGS: longer clips are cropped to it."""
TRAIN_MIN_SAMPLE_SIZE = 8000
"""--min-sample-size of conftest.TRAIN_FLAGS."""
LN2 = math.log(2)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def manifest_sizes(data: Path, shard: str, split: str) -> np.ndarray:
    """Samples per clip as listed in ``<shard>/<split>.tsv`` (line 1 is the audio root)."""
    lines = (data / shard / f"{split}.tsv").read_text().splitlines()[1:]
    return np.array([int(line.split("\t")[1]) for line in lines if line.strip()], dtype=np.int64)


def load(data: Path, split: str, min_sample_size: int = 0, seed: int = 1) -> ShardedAudioDataset:
    """The shards as the task loads them; ``min_sample_size=0`` keeps every listed clip, so a
    shard's local index is its manifest entry's index."""
    shards = OrderedDict(
        (name, FileAudioDataset(
            manifest_path=str(data / name / f"{split}.tsv"), sample_rate=SAMPLE_RATE,
            max_sample_size=MAX_SAMPLE_SIZE, min_sample_size=min_sample_size,
        ))
        for name in SHARDS
    )
    return ShardedAudioDataset(split, shards, seed=seed)


def batching(min_samples: int = 0, max_tokens: int = 48000, seed: int = 1, **kwargs) -> Batching:
    return Batching(max_tokens=max_tokens, max_sentences=None, required_batch_size_multiple=1,
                    min_samples=min_samples, seed=seed, **kwargs)


def by_shard(data: ShardedAudioDataset, batch) -> Dict[int, List[int]]:
    """The local indices of each shard in a batch of global indices, in batch order."""
    parts: Dict[int, List[int]] = OrderedDict()
    for index in batch:
        shard, local = data.locate(int(index))
        parts.setdefault(shard, []).append(local)
    return parts


def usable_audio(sizes: np.ndarray, min_samples: int) -> float:
    """Samples a shard contributes to an epoch: clips long enough, each cropped to the maximum."""
    return float(np.minimum(sizes[sizes >= min_samples], MAX_SAMPLE_SIZE).sum())


def budget_respected(sizes: np.ndarray, locals_: List[int], budget: int) -> bool:
    """fairseq's rule: a batch costs (longest cropped clip) x (number of clips)."""
    return int(np.minimum(sizes[locals_], MAX_SAMPLE_SIZE).max()) * len(locals_) <= budget


def spread(counts: List[int]) -> float:
    return max(counts) / min(counts)


@pytest.fixture
def unbalanced(corpus_copy) -> Path:
    """The corpus with shards of 8 (noisy), 4 (read) and 2 (telephone) training clips."""
    for shard, keep in (("read", 4), ("telephone", 2)):
        manifest = corpus_copy / shard / "train.tsv"
        lines = manifest.read_text().splitlines()
        manifest.write_text("\n".join(lines[:1 + keep]) + "\n")
    return corpus_copy


# --------------------------------------------------------------------------------------------
# 1. sampling "all"
# --------------------------------------------------------------------------------------------


def test_all_sampling_takes_one_batch_of_every_shard_per_update(corpus):
    """Every update holds clips of every shard, one valid batch of each; no clip twice in an
    epoch; as many updates as the shard with fewest batches; short clips never appear."""
    data = load(corpus, "train")
    sizes = [manifest_sizes(corpus, s, "train") for s in SHARDS]
    min_samples = 16000
    usable = [set(np.flatnonzero(s >= min_samples).tolist()) for s in sizes]
    assert all(0 < len(u) < len(s) for u, s in zip(usable, sizes)), "every shard needs short clips"
    config = batching(min_samples=min_samples, sampling="all")
    budgets = per_shard_max_tokens(data, config)

    for epoch in (1, 2, 3):
        updates = training_batches(data, epoch, config)
        per_shard = [shard_batches(data, s, budgets[s], config, epoch) for s in range(len(SHARDS))]
        counts = [len(b) for b in per_shard]
        assert len(updates) == min(counts)
        # Each shard's batches split its usable clips exactly once.
        for s, batches in enumerate(per_shard):
            locals_ = [local for b in batches for local in by_shard(data, b)[s]]
            assert sorted(locals_) == sorted(usable[s])

        everything = np.concatenate(updates)
        assert len(everything) == len(set(everything.tolist())), f"epoch {epoch}: a clip repeats"
        shard_sets = [{tuple(sorted(b.tolist())) for b in batches} for batches in per_shard]
        for update in updates:
            parts = by_shard(data, update)
            assert list(parts) == [0, 1, 2]
            for s, locals_ in parts.items():
                assert set(locals_) <= usable[s], f"a clip shorter than {min_samples} samples was used"
                assert budget_respected(sizes[s], locals_, budgets[s])
                global_ = tuple(sorted(local + data.offsets[s] for local in locals_))
                assert global_ in shard_sets[s], "an update's part is not one of the shard's batches"
    # The check above is not vacuous: the shards do not all have the same number of batches.
    assert len(set(counts)) > 1 or min(counts) >= 2


def test_all_sampling_is_reproducible_per_seed_and_epoch(corpus):
    config = batching(min_samples=TRAIN_MIN_SAMPLE_SIZE, sampling="all")
    first = training_batches(load(corpus, "train"), 1, config)
    again = training_batches(load(corpus, "train"), 1, config)
    other_epoch = training_batches(load(corpus, "train"), 2, config)

    def same(a, b):
        return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    assert len(first) >= 3
    assert same(first, again)
    assert not same(first, other_epoch)


def test_all_sampling_skips_a_different_surplus_each_epoch(unbalanced):
    """With equal budgets the big shard has surplus batches; they are skipped at random per
    epoch, so over enough epochs every clip of it is trained on, and the order changes."""
    data = load(unbalanced, "train")
    config = batching(TRAIN_MIN_SAMPLE_SIZE, 30000, sampling="all", batch_size="equal")
    budgets = per_shard_max_tokens(data, config)
    counts = [len(shard_batches(data, s, budgets[s], config, 1)) for s in range(3)]
    assert counts[0] >= 2 * counts[2], "precondition: the noisy shard has surplus batches"
    used, orders = set(), set()
    for epoch in range(1, 41):
        updates = training_batches(data, epoch, config)
        assert len(updates) == min(counts)
        noisy = [tuple(by_shard(data, u)[0]) for u in updates]
        used.update(local for batch in noisy for local in batch)
        orders.add(tuple(noisy))
    assert used == set(range(8))
    assert len(orders) > 1


# --------------------------------------------------------------------------------------------
# 2. per-shard batch budgets
# --------------------------------------------------------------------------------------------


def test_proportional_budgets_follow_each_shards_audio(corpus):
    """Balanced corpus: no budget is raised, so they average max_tokens and follow the audio."""
    data = load(corpus, "train")
    max_tokens = 48000
    amount = np.array([usable_audio(manifest_sizes(corpus, s, "train"), TRAIN_MIN_SAMPLE_SIZE)
                       for s in SHARDS])
    budgets = per_shard_max_tokens(
        data, batching(TRAIN_MIN_SAMPLE_SIZE, max_tokens, batch_size="proportional"))
    expected = max_tokens * len(SHARDS) * amount / amount.sum()
    assert all(b > MAX_SAMPLE_SIZE for b in expected), "precondition: no budget raised"
    np.testing.assert_allclose(budgets, expected, atol=1.0)
    assert abs(np.mean(budgets) - max_tokens) <= 1.0
    # Ordered like the audio amounts.
    assert list(np.argsort(budgets)) == list(np.argsort(amount))

    assert per_shard_max_tokens(data, batching(TRAIN_MIN_SAMPLE_SIZE, max_tokens, batch_size="equal")) \
        == [max_tokens] * len(SHARDS)


def test_proportional_budgets_balance_batch_counts_of_unequal_shards(unbalanced):
    data = load(unbalanced, "train")
    sizes = [manifest_sizes(unbalanced, s, "train") for s in SHARDS]
    assert [len(s) for s in sizes] == [8, 4, 2]
    max_tokens = 30000
    amount = np.array([usable_audio(s, TRAIN_MIN_SAMPLE_SIZE) for s in sizes])
    longest = [int(np.minimum(s, MAX_SAMPLE_SIZE).max()) for s in sizes]

    proportional = batching(TRAIN_MIN_SAMPLE_SIZE, max_tokens, batch_size="proportional")
    equal = batching(TRAIN_MIN_SAMPLE_SIZE, max_tokens, batch_size="equal")
    budgets = per_shard_max_tokens(data, proportional)
    raw = max_tokens * len(SHARDS) * amount / amount.sum()
    # A budget below the longest clip would make a batch fairseq rejects: it is raised to it.
    assert min(raw[i] - longest[i] for i in range(3)) < 0, "precondition: one budget is raised"
    for b, r, l in zip(budgets, raw, longest):
        assert b == max(int(r), l)
    assert budgets[0] > budgets[1] >= budgets[2]
    assert per_shard_max_tokens(data, equal) == [max_tokens] * 3

    def counts(config):
        b = per_shard_max_tokens(data, config)
        return [len(shard_batches(data, s, b[s], config, 1)) for s in range(3)]

    equal_counts, proportional_counts = counts(equal), counts(proportional)
    assert spread(proportional_counts) < spread(equal_counts), (proportional_counts, equal_counts)
    # With "all", the bigger shards' surplus is skipped: proportional budgets use more of the data.
    def clips_used(batch_size: str) -> int:
        config = batching(TRAIN_MIN_SAMPLE_SIZE, max_tokens, batch_size=batch_size, sampling="all")
        return sum(len(b) for b in training_batches(data, 1, config))

    assert clips_used("proportional") > clips_used("equal")


# --------------------------------------------------------------------------------------------
# 3. sampling "temperature"
# --------------------------------------------------------------------------------------------


def test_sampling_probabilities_follow_share_to_the_power_one_over_t():
    amount = [8.0, 4.0, 2.0]
    share = np.array(amount) / sum(amount)
    np.testing.assert_allclose(sampling_probabilities(amount, 1.0), share, rtol=1e-12)
    for t in (0.5, 2.0, 3.0):
        p = share ** (1 / t)
        np.testing.assert_allclose(sampling_probabilities(amount, t), p / p.sum(), rtol=1e-12)
    # XLS-R's T=2 is sqrt: 8:4:2 -> sqrt(4):sqrt(2):1.
    p2 = sampling_probabilities(amount, 2.0)
    assert p2[0] / p2[2] == pytest.approx(2.0) and p2[1] / p2[2] == pytest.approx(math.sqrt(2))
    np.testing.assert_allclose(sampling_probabilities(amount, 1e6), [1 / 3] * 3, atol=1e-5)
    # Higher T flattens: the largest shard's probability falls, the smallest's rises.
    ps = [sampling_probabilities(amount, t) for t in (1.0, 2.0, 5.0, 50.0)]
    assert all(a[0] > b[0] and a[2] < b[2] for a, b in zip(ps, ps[1:]))
    assert sampling_probabilities(amount, 3.0).sum() == pytest.approx(1.0)


def test_temperature_sampling_takes_shards_per_update_shards(unbalanced):
    data = load(unbalanced, "train")
    sizes = [manifest_sizes(unbalanced, s, "train") for s in SHARDS]
    for per_update in (1, 2):
        config = batching(TRAIN_MIN_SAMPLE_SIZE, sampling="temperature", shards_per_update=per_update)
        budgets = per_shard_max_tokens(data, config)
        per_shard = [shard_batches(data, s, budgets[s], config, 1) for s in range(3)]
        shard_sets = [{tuple(sorted(b.tolist())) for b in batches} for batches in per_shard]
        for epoch in (1, 2, 3):
            updates = training_batches(data, epoch, config)
            # Every shard batch is seen about once an epoch: ceil(total batches / shards per update).
            assert len(updates) == -(-sum(len(b) for b in per_shard) // per_update)
            for update in updates:
                parts = by_shard(data, update)
                assert len(parts) == per_update
                assert list(parts) == sorted(parts)
                for s, locals_ in parts.items():
                    assert min(sizes[s][locals_]) >= TRAIN_MIN_SAMPLE_SIZE
                    global_ = tuple(sorted(local + data.offsets[s] for local in locals_))
                    assert global_ in shard_sets[s]
        # The same seed and epoch give the same updates.
        a, b = training_batches(data, 2, config), training_batches(data, 2, config)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_temperature_sampling_frequencies_follow_the_probabilities(unbalanced):
    """Over many epochs (fixed seed: deterministic), shards are drawn about as often as p says;
    here p is far enough from both uniform and the data shares to tell them apart."""
    data = load(unbalanced, "train")
    sizes = [manifest_sizes(unbalanced, s, "train") for s in SHARDS]
    temperature = 2.0
    config = batching(TRAIN_MIN_SAMPLE_SIZE, sampling="temperature", shards_per_update=1,
                      temperature=temperature, seed=7)
    amount = [usable_audio(s, TRAIN_MIN_SAMPLE_SIZE) for s in sizes]
    share = np.array(amount) / sum(amount)
    p = share ** (1 / temperature)
    p /= p.sum()
    np.testing.assert_allclose(sampling_probabilities(amount, temperature), p, rtol=1e-12)
    drawn = Counter()
    for epoch in range(1, 201):
        for update in training_batches(data, epoch, config):
            (shard,) = by_shard(data, update)
            drawn[shard] += 1
    total = sum(drawn.values())
    assert total > 1000
    frequency = np.array([drawn[s] / total for s in range(3)])
    np.testing.assert_allclose(frequency, p, atol=0.04)
    assert np.abs(frequency - share).max() > 0.06 and np.abs(frequency - 1 / 3).max() > 0.06


# --------------------------------------------------------------------------------------------
# 4. validation batches
# --------------------------------------------------------------------------------------------


def test_validation_batches_cover_every_usable_clip_once_one_shard_each(corpus):
    data = load(corpus, "valid")
    sizes = [manifest_sizes(corpus, s, "valid") for s in SHARDS]
    n_clips = sum(len(s) for s in sizes)
    for min_samples, max_tokens in ((0, 48000), (16000, 48000), (TRAIN_MIN_SAMPLE_SIZE, 30000)):
        usable = {(s, i) for s in range(3) for i in np.flatnonzero(sizes[s] >= min_samples).tolist()}
        batches = validation_batches(data, 1, batching(min_samples, max_tokens, sampling="all"))
        seen = []
        for batch in batches:
            parts = by_shard(data, batch)
            assert len(parts) == 1, "a validation batch mixes shards"
            seen += [(s, local) for s, locals_ in parts.items() for local in locals_]
        assert len(seen) == len(set(seen)), "a validation clip appears twice"
        assert set(seen) == usable
        if min_samples == 16000:
            assert 0 < len(usable) < n_clips, "precondition: some valid clips are too short"
        if max_tokens == 30000:
            assert len(batches) == n_clips, "one clip per batch under this budget"
    # Every shard's batches are there, in shard order.
    shard_order = [next(iter(by_shard(data, b))) for b in validation_batches(data, 1, batching())]
    assert shard_order == sorted(shard_order) and set(shard_order) == {0, 1, 2}


# --------------------------------------------------------------------------------------------
# 5. collater
# --------------------------------------------------------------------------------------------


def contiguous_start(original: np.ndarray, row: np.ndarray) -> int:
    """Where ``row`` lies in ``original`` as a contiguous slice, or -1."""
    length = len(row)
    candidates = np.flatnonzero(original[: len(original) - length + 1] == row[0])
    for start in candidates:
        if np.array_equal(original[start:start + length], row):
            return int(start)
    return -1


def test_collater_groups_by_shard_and_crops_deterministically(corpus):
    data = load(corpus, "train")
    data.set_epoch(1)
    update = training_batches(data, 1, batching(TRAIN_MIN_SAMPLE_SIZE, 96000, sampling="all"))[0]
    parts = by_shard(data, update)
    assert list(parts) == [0, 1, 2] and all(len(v) >= 2 for v in parts.values())

    first = data.collater([data[int(i)] for i in update])
    second = data.collater([data[int(i)] for i in update])
    assert set(first) == {"shards"}
    assert list(first["shards"]) == SHARDS

    cropped = 0
    for s, name in enumerate(SHARDS):
        sample = first["shards"][name]
        source = sample["net_input"]["source"]
        assert source.dim() == 2 and source.shape[0] == len(parts[s])
        assert sample["id"].tolist() == parts[s]
        originals = [data.datasets[s][local]["source"].numpy() for local in parts[s]]
        assert source.shape[1] == min(min(len(o) for o in originals), MAX_SAMPLE_SIZE)
        for row, original in zip(source.numpy(), originals):
            assert contiguous_start(original, row) >= 0, f"{name}: a row is not a slice of its clip"
            cropped += len(original) > len(row)
        # The same items collate to the same tensors.
        again = second["shards"][name]
        assert torch.equal(again["id"], sample["id"])
        assert torch.equal(again["net_input"]["source"], source)
    assert cropped >= 3, "precondition: some clips were cropped"


def test_collater_of_one_shard_batch_returns_that_shard_only(corpus):
    data = load(corpus, "valid")
    batch = validation_batches(data, 1, batching(0, 48000))[-1]
    out = data.collater([data[int(i)] for i in batch])
    assert list(out["shards"]) == ["telephone"]
    assert data.collater([]) == {}


# --------------------------------------------------------------------------------------------
# 6. criterion logging
# --------------------------------------------------------------------------------------------


def shard_output(correct: int = 3, count: int = 10, code_ppl: float = 12.0, nsentences: int = 2) -> dict:
    return {"ntokens": count, "nsentences": nsentences, "correct": correct, "count": count,
            "code_ppl_per_group": code_ppl}


def reduce(outputs: List[dict]) -> metrics.MetersDict:
    with metrics.aggregate(new_root=True) as agg:
        EquilibriumWav2vecCriterion.reduce_metrics(outputs)
    return agg


@pytest.fixture
def criterion():
    criterion_module._collapsed_shards.clear()
    yield EquilibriumWav2vecCriterion(None)
    criterion_module._collapsed_shards.clear()


def test_reduce_metrics_per_shard_means_in_bits(criterion):
    names = ["a", "b", "c", "d"]  # d never takes part
    updates = [
        # (records, per-shard outputs)
        ({"a": ShardRecord(2.0, 1.5, 1 / 3), "b": ShardRecord(3.0, 2.0, 1 / 3), "c": ShardRecord(4.0, 3.0, 1 / 3)},
         {"a": shard_output(2, 10, 10.0), "b": shard_output(5, 20, 8.0), "c": shard_output(1, 10, 6.0)}),
        # c is absent from this update
        ({"a": ShardRecord(1.0, 0.8, 0.5), "b": ShardRecord(5.0, 4.5, 0.5)},
         {"a": shard_output(4, 10, 14.0), "b": shard_output(0, 20, 12.0)}),
        # b takes part but is dropped (non-finite): counted, never averaged
        ({"a": ShardRecord(3.0, 2.7, 0.5), "b": ShardRecord(float("nan"), float("nan"), 0.5, dropped=True)},
         {"a": shard_output(6, 10, 16.0), "b": shard_output(9, 10, 1.0)}),
    ]
    unreadable = [{}, {"a": 2}, {"b": 1}]  # clips whose audio could not be read, per update
    logs = [criterion.update_logging_output(names, records, outputs, bad)
            for (records, outputs), bad in zip(updates, unreadable)]
    agg = reduce(logs)
    values = agg.get_smoothed_values()

    def mean(values_):
        return sum(values_) / len(values_)

    expected = {
        "a": [(2.0, 1.5), (1.0, 0.8), (3.0, 2.7)],
        "b": [(3.0, 2.0), (5.0, 4.5)],
        "c": [(4.0, 3.0)],
    }
    for name, pairs in expected.items():
        before = mean([b for b, _ in pairs]) / LN2
        after = mean([a for _, a in pairs]) / LN2
        assert agg[f"loss_before_{name}"].avg == pytest.approx(before, rel=1e-12)
        assert agg[f"loss_after_{name}"].avg == pytest.approx(after, rel=1e-12)
        assert agg[f"gap_{name}"].avg == pytest.approx(before - after, rel=1e-9)
        assert values[f"loss_before_{name}"] == pytest.approx(before, abs=5e-4)  # logged rounded
    # Accuracy pools the counts of the updates the shard was kept in; code perplexity averages.
    assert agg["accuracy_a"].avg == pytest.approx(12 / 30)
    assert agg["accuracy_b"].avg == pytest.approx(5 / 40)
    assert agg["code_ppl_a"].avg == pytest.approx(40 / 3)
    assert agg["code_ppl_b"].avg == pytest.approx(10.0)
    assert agg["code_ppl_c"].avg == pytest.approx(6.0)
    assert values["dropped_a"] == 0 and values["dropped_b"] == 1 and values["dropped_c"] == 0
    assert values["dropped_d"] == 0
    assert [values[f"unreadable_{n}"] for n in names] == [2, 1, 0, 0]
    assert not any(k.endswith("_d") and not k.startswith(("dropped", "unreadable")) for k in values)
    # The overall losses: each update's weighted mean over its kept shards, then the update mean.
    update_after = [(1.5 + 2.0 + 3.0) / 3, (0.8 + 4.5) / 2, 2.7]
    update_before = [(2.0 + 3.0 + 4.0) / 3, (1.0 + 5.0) / 2, 3.0]
    assert agg["loss"].avg == pytest.approx(mean(update_after) / LN2, rel=1e-12)
    assert agg["loss_before"].avg == pytest.approx(mean(update_before) / LN2, rel=1e-12)
    assert agg["gap"].avg == pytest.approx((mean(update_before) - mean(update_after)) / LN2, rel=1e-9)
    assert values["nsentences"] == 2 * 3 + 2 * 2 + 2 * 2
    assert all(math.isfinite(v) for k, v in values.items() if isinstance(v, float))


def test_reduce_metrics_absent_shard_leaves_its_means_alone(criterion):
    """Adding an update without shard c changes a's mean but not c's."""
    names = ["a", "c"]
    with_c = criterion.update_logging_output(
        names, {"a": ShardRecord(2.0, 1.0, 0.5), "c": ShardRecord(6.0, 5.0, 0.5)},
        {"a": shard_output(), "c": shard_output()})
    without_c = criterion.update_logging_output(
        names, {"a": ShardRecord(4.0, 3.0, 1.0)}, {"a": shard_output()})
    only = reduce([with_c])
    both = reduce([with_c, without_c])
    assert both["loss_before_c"].avg == pytest.approx(only["loss_before_c"].avg) == pytest.approx(6.0 / LN2)
    assert both["loss_after_c"].avg == pytest.approx(5.0 / LN2)
    assert both["loss_before_a"].avg == pytest.approx(3.0 / LN2)
    # A log made only of updates without c has no loss for c at all (not a zero).
    alone = reduce([without_c]).get_smoothed_values()
    assert "loss_before_c" not in alone and "loss_after_c" not in alone and alone["dropped_c"] == 0


@pytest.mark.parametrize("sick", [
    {"correct": 3, "count": 10, "code_ppl": 1.5},  # perplexity per group below 2
    {"correct": 100, "count": 100, "code_ppl": 12.0},  # accuracy above 0.99
])
def test_collapse_warning_names_the_collapsed_shard_only(criterion, caplog, sick):
    names = ["healthy", "sick"]
    records = {"healthy": ShardRecord(3.0, 2.9, 0.5), "sick": ShardRecord(3.0, 2.9, 0.5)}
    outputs = {"healthy": shard_output(30, 100, 12.0), "sick": shard_output(**sick)}
    log = criterion.update_logging_output(names, records, outputs)
    with caplog.at_level(logging.WARNING, logger=criterion_module.logger.name):
        reduce([log])
    warnings = [r.getMessage() for r in caplog.records if r.name == criterion_module.logger.name]
    assert len(warnings) == 1, warnings
    assert "shard sick" in warnings[0] and "collapse" in warnings[0]
    assert "healthy" not in warnings[0]


def test_collapse_warning_not_given_for_healthy_shards(criterion, caplog):
    names = ["a", "b"]
    records = {"a": ShardRecord(3.0, 2.9, 0.5), "b": ShardRecord(3.0, 2.9, 0.5)}
    # Just on the healthy side of both thresholds.
    outputs = {"a": shard_output(99, 100, 2.5), "b": shard_output(5, 100, 20.0)}
    with caplog.at_level(logging.WARNING, logger=criterion_module.logger.name):
        reduce([criterion.update_logging_output(names, records, outputs)])
    assert not [r for r in caplog.records if r.name == criterion_module.logger.name]


# --------------------------------------------------------------------------------------------
# 7. fairseq-train with temperature sampling
# --------------------------------------------------------------------------------------------


def train_inner_lines(output: str) -> List[Dict[str, str]]:
    """The key=value pairs of every train_inner log line, values as printed."""
    lines = []
    for line in output.splitlines():
        if "| train_inner |" in line:
            fields = {}
            for part in line.split("|")[-1].split(", "):
                name, _, value = part.strip().partition("=")
                fields[name.split()[-1]] = value
            lines.append(fields)
    return lines


def number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def test_fairseq_train_temperature_sampling_one_shard_per_update(corpus, tmp_path):
    result = fairseq_train(corpus, tmp_path / "run", "--shard-sampling", "temperature",
                           "--shards-per-update", "1", "--inner-steps", "1", "--max-update", "4")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "effective batch per update: 1 shards" in result.stdout

    # The same epoch, built here: the task's datasets and batching for --seed 1, epoch 1.
    data = load(corpus, "train", min_sample_size=TRAIN_MIN_SAMPLE_SIZE)
    config = batching(TRAIN_MIN_SAMPLE_SIZE, 48000, sampling="temperature", shards_per_update=1)
    epoch = training_batches(data, 1, config)
    expected = Counter()
    for update in epoch:
        ((shard, locals_),) = by_shard(data, update).items()
        expected[(SHARDS[shard], len(locals_))] += 1
    assert re.search(rf"epoch 001:\s+1 / {len(epoch)} ", result.stdout), "epoch length differs"

    lines = train_inner_lines(result.stdout)
    assert [number(line.get("num_updates")) for line in lines] == [1.0, 2.0, 3.0, 4.0]
    seen = Counter()
    for line in lines:
        present = [s for s in SHARDS if number(line.get(f"loss_before_{s}")) is not None]
        assert len(present) == 1, f"not exactly one shard in an update: {line}"
        (shard,) = present
        assert number(line.get(f"loss_after_{shard}")) is not None
        assert number(line.get(f"gap_{shard}")) is not None
        for s in SHARDS:
            assert number(line.get(f"dropped_{s}")) == 0.0
        # The update's clips are one batch of that shard, as drawn for this epoch.
        seen[(shard, int(number(line["nsentences"])))] += 1
    assert not seen - expected, f"updates {seen} are not batches of one shard ({expected})"
    assert len({shard for shard, _ in seen}) >= 2
