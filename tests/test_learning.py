"""Pre-training learns on CPU: with the `small` recipe, wav2vec 2.0 leaves its early plateau on a
handful of generated clips within a bounded number of updates (README "Learning curves" shows the
same on the built-in corpus). Deterministic: fixed seed, one thread."""

import os

from conftest import REPO, run

from eqssl.corpus.toy import make_corpus
from eqssl.experiment.fairseq_log import per_shard, validations

UPDATES = 300
CHANCE = 1 / 11  # 10 negatives


def validation_accuracy(log: str) -> dict:
    """{updates: {shard: accuracy}} of every validation in a fairseq log."""
    return {int(stats["num_updates"]): per_shard(stats, "accuracy") for stats in validations(log.splitlines())}


def test_cssl_small_leaves_chance_within_a_bounded_number_of_updates(tmp_path, monkeypatch):
    data = tmp_path / "toy"
    make_corpus(str(data), shards=2, train_clips=8, valid_clips=6, min_seconds=0.8, max_seconds=1.6)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes" / "pretrain", "--config-name", "cssl_small",
                  f"task.data={data}", f"checkpoint.save_dir={tmp_path / 'save'}", f"common.user_dir={REPO / 'eqssl'}",
                  f"optimization.max_update={UPDATES}", "lr_scheduler.warmup_updates=100",
                  "dataset.validate_interval_updates=100", f"checkpoint.save_interval_updates={UPDATES}",
                  # every clip fits one batch, so an epoch is one update: validate and save by updates only
                  "dataset.validate_interval=100000", "checkpoint.save_interval=100000"], timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:]
    points = validation_accuracy(result.stdout)
    assert sorted(points) == list(range(100, UPDATES + 1, 100))
    start, end = points[100], points[UPDATES]
    assert sorted(end) == ["read", "telephone"]
    # Well above chance at the end on every shard, and clearly higher than at the first validation.
    assert min(end.values()) > 3 * CHANCE, points
    assert all(end[shard] > start[shard] + 0.15 for shard in end), points
    assert os.path.exists(tmp_path / "save" / "checkpoint_last.pt")
