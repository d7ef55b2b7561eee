"""The equilibrium update under fairseq's distributed training: 2 CPU workers (gloo) against one
process over the same batches (legacy_ddp), update_freq, LayerDrop, a frozen feature encoder,
different shards per worker, resuming on another number of workers."""

import numpy as np
import pytest
import soundfile
import torch

from conftest import fairseq_train, fairseq_train_workers, train_log_values
from test_bad_input import clip_on_line, manifest_lines, rewrite_clip

# SGD: its step is proportional to the gradient; Adam's first step, g/|g|, would magnify float
# noise in gradients near zero into whole steps.
ONE_UPDATE = ["--max-update", "1", "--disable-validation", "--inner-steps", "1", "--optimizer", "sgd", "--lr", "0.05"]


def parameters(save_dir) -> dict:
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 1
    return state["model"]


# fairseq's c10d backend cannot run on CPU (it passes device_ids=[0], which torch's DDP refuses
# for CPU modules); legacy_ddp is the backend of fairseq's wav2vec 2.0 recipes.
CASES = {
    # name: (flags of both runs, update_freq per worker)
    "legacy_ddp": (["--ddp-backend", "legacy_ddp"], 1),
    "legacy_ddp-update_freq2": (["--ddp-backend", "legacy_ddp"], 2),
    # The classic wav2vec 2.0 DDP crashes: parameters without a gradient in some passes.
    "legacy_ddp-layerdrop-frozen_encoder": (
        ["--ddp-backend", "legacy_ddp", "--encoder-layerdrop", "0.5", "--feature-grad-mult", "0"], 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_equal_one_process_over_the_same_batches(corpus, tmp_path, case):
    """Worker r takes batches r, r+2, … (fairseq's sharded iterator), so one update of 2 workers
    with update_freq u sees the batches of one process with update_freq 2u: the parameters after
    it must agree to float tolerance (the sums are only added in another order)."""
    flags, update_freq = CASES[case]
    workers = fairseq_train_workers(corpus, tmp_path / "workers", 2, *ONE_UPDATE, *flags,
                                    "--update-freq", update_freq)
    for rank, result in enumerate(workers):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
    single = fairseq_train(corpus, tmp_path / "single", *ONE_UPDATE, *flags, "--update-freq", 2 * update_freq)
    assert single.returncode == 0, single.stdout[-4000:]

    # Both workers logged the same, all-reduced, per-shard statistics as the single process.
    for key in ("loss_before_read", "loss_after_read", "gap_noisy", "gnorm"):
        expected = train_log_values(single.stdout, key)
        assert expected, key
        assert train_log_values(workers[0].stdout, key) == pytest.approx(expected, rel=1e-3, abs=1e-3), key
    a, b = parameters(tmp_path / "workers"), parameters(tmp_path / "single")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    if case == "legacy_ddp":
        # The comparison can fail: one process over the first worker's batches only differs.
        half = fairseq_train(corpus, tmp_path / "half", *ONE_UPDATE, *flags, "--update-freq", update_freq)
        assert half.returncode == 0, half.stdout[-4000:]
        c = parameters(tmp_path / "half")
        assert max((a[n].float() - c[n].float()).abs().max().item() for n in a) > 1e-5


def test_resume_on_another_number_of_workers(corpus, tmp_path):
    """2 workers save after one update; one process (with twice the update_freq, the same
    effective batch) resumes from it and continues the update count, lr schedule and optimizer."""
    save_dir = tmp_path / "run"
    schedule = ["--disable-validation", "--lr-scheduler", "polynomial_decay", "--warmup-updates", "4",
                "--total-num-update", "10"]
    workers = fairseq_train_workers(corpus, save_dir, 2, *schedule, "--max-update", "1")
    for rank, result in enumerate(workers):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
    resumed = fairseq_train(corpus, save_dir, *schedule, "--update-freq", "2", "--max-update", "2")
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "(epoch 1 @ 1 updates)" in resumed.stdout
    assert train_log_values(resumed.stdout, "num_updates") == [2.0]
    assert train_log_values(resumed.stdout, "lr") == pytest.approx([2 * train_log_values(workers[0].stdout, "lr")[0]])
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 2
    assert state["last_optimizer_state"]["state"]  # Adam's moments came along


def test_workers_holding_different_shards_one_dropping_its_own_do_not_hang(corpus_copy, tmp_path):
    """Temperature sampling, one shard per update: the 2 workers mostly hold different shards,
    and the one holding the all-NaN shard leaves it out of its update. Both finish (no hang:
    legacy_ddp's all-reduce is one call per update whatever each worker did), the drops are
    counted, and the parameters stay finite."""
    manifest = corpus_copy / "noisy" / "train.tsv"
    for line in range(2, len(manifest_lines(manifest)) + 1):
        frames = soundfile.info(str(clip_on_line(corpus_copy, "noisy", "train", line))).frames
        rewrite_clip(corpus_copy, "noisy", "train", line, np.full(frames, np.nan, dtype=np.float32),
                     subtype="FLOAT")
    workers = fairseq_train_workers(
        corpus_copy, tmp_path / "run", 2, "--ddp-backend", "legacy_ddp", "--inner-steps", "1",
        "--shard-sampling", "temperature", "--shards-per-update", "1", "--max-update", "4",
        "--disable-validation", timeout=300)
    for rank, result in enumerate(workers):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
    assert sum(train_log_values(workers[0].stdout, "dropped_noisy")) > 0
    state = torch.load(tmp_path / "run" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 4
    for name, tensor in state["model"].items():
        if torch.is_floating_point(tensor):
            assert torch.isfinite(tensor).all(), name
