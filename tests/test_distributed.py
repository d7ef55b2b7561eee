"""The equilibrium update under fairseq's distributed training: 2 CPU workers (gloo) against one
process over the same batches, with fairseq's legacy_ddp and c10d (torch's DDP) backends,
update_freq, LayerDrop, a frozen feature encoder, different shards per worker, resuming on
another number of workers; and what each update all-reduces."""

import pytest
import torch

from conftest import comm_records, fairseq_train, fairseq_train_workers, train_log_values
from test_bad_input import fill_shard_with_nan

# SGD: its step is proportional to the gradient; Adam's first step, g/|g|, would magnify float
# noise in gradients near zero into whole steps.
ONE_UPDATE = ["--max-update", "1", "--disable-validation", "--inner-steps", "1", "--optimizer", "sgd", "--lr", "0.05"]
# The classic wav2vec 2.0 DDP crashes: parameters without a gradient in some passes.
LAYERDROP_FROZEN_ENCODER = ["--encoder-layerdrop", "0.5", "--feature-grad-mult", "0"]


def parameters(save_dir) -> dict:
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 1
    return state["model"]


# c10d runs through examples/fairseq_train_counting.py, which lets fairseq's torch DDP wrapper
# take a CPU module (fairseq passes device_ids=[0]); legacy_ddp is the recipes' backend.
CASES = {
    # name: (flags of both runs, update_freq per worker)
    "legacy_ddp": (["--ddp-backend", "legacy_ddp"], 1),
    "legacy_ddp-update_freq2": (["--ddp-backend", "legacy_ddp"], 2),
    "legacy_ddp-layerdrop-frozen_encoder": (["--ddp-backend", "legacy_ddp", *LAYERDROP_FROZEN_ENCODER], 1),
    "c10d": (["--ddp-backend", "c10d"], 1),
    "c10d-update_freq2": (["--ddp-backend", "c10d"], 2),
    # torch's DDP needs to be told that some parameters may get no gradient, as in fairseq.
    "c10d-layerdrop-frozen_encoder": (
        ["--ddp-backend", "c10d", "--find-unused-parameters", *LAYERDROP_FROZEN_ENCODER], 1),
}


@pytest.fixture(scope="module")
def single_process(corpus, tmp_path_factory):
    """One process's run of ONE_UPDATE with the given flags and update_freq, run once per distinct
    run: with one process fairseq wraps the model in no DDP wrapper, so the backend flag does not
    change it and the legacy_ddp and c10d cases share their reference."""
    done = {}

    def single(flags: list, update_freq: int):
        training_flags = [f for i, f in enumerate(flags) if f != "--ddp-backend" and flags[i - 1] != "--ddp-backend"
                          and f != "--find-unused-parameters"]
        key = (tuple(training_flags), update_freq)
        if key not in done:
            save_dir = tmp_path_factory.mktemp("single")
            result = fairseq_train(corpus, save_dir, *ONE_UPDATE, *training_flags, "--update-freq", update_freq)
            assert result.returncode == 0, result.stdout[-4000:]
            done[key] = (result, save_dir)
        return done[key]

    return single


@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_equal_one_process_over_the_same_batches(corpus, tmp_path, case, single_process):
    """Worker r takes batches r, r+2, … (fairseq's sharded iterator), so one update of 2 workers
    with update_freq u sees the batches of one process with update_freq 2u: the parameters after
    it must agree to float tolerance (the sums are only added in another order). The gradient is
    all-reduced once per update: the inner passes (one per shard here) add no all-reduce."""
    flags, update_freq = CASES[case]
    comm_log = tmp_path / "comm.jsonl"
    workers = fairseq_train_workers(corpus, tmp_path / "workers", 2, *ONE_UPDATE, *flags,
                                    "--update-freq", update_freq, comm_log=comm_log)
    for rank, result in enumerate(workers):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
    single, single_dir = single_process(flags, 2 * update_freq)

    # Both workers logged the same, all-reduced, per-shard statistics as the single process.
    for key in ("loss_before_read", "loss_after_read", "gap_noisy", "gnorm"):
        expected = train_log_values(single.stdout, key)
        assert expected, key
        assert train_log_values(workers[0].stdout, key) == pytest.approx(expected, rel=1e-3, abs=1e-3), key
    a, b = parameters(tmp_path / "workers"), parameters(single_dir)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)

    # Each worker all-reduced every parameter's float32 gradient exactly once in the update.
    parameter_bytes = 4 * sum(t.numel() for t in b.values() if torch.is_floating_point(t))
    for rank in range(2):
        assert [r["grad_bytes"] for r in comm_records(comm_log, rank)] == [parameter_bytes]
    if case == "legacy_ddp":
        # The comparison can fail: one process over the first worker's batches only differs.
        half = fairseq_train(corpus, tmp_path / "half", *ONE_UPDATE, *flags, "--update-freq", update_freq)
        assert half.returncode == 0, half.stdout[-4000:]
        c = parameters(tmp_path / "half")
        assert max((a[n].float() - c[n].float()).abs().max().item() for n in a) > 1e-5


@pytest.mark.parametrize("layout", ["2 workers -> 1", "1 -> 2 workers"])
def test_resume_on_another_number_of_workers(corpus, tmp_path, layout):
    """A run saved after one update continues on another number of workers with the same
    effective batch (update_freq changed inversely): the update count, lr schedule and optimizer
    state carry over. Resuming on 2 workers, fairseq's rank 0 loads the checkpoint and broadcasts
    it pickled; torch >= 2.6 refused to unpickle its config on the other rank until eqssl
    allowed OmegaConf's classes."""
    save_dir = tmp_path / "run"
    # Small batches, so that each of 2 workers still has batches left in the epoch after
    # skipping as many as were taken (fairseq's rule; else its "dataloader mismatch" error).
    schedule = ["--disable-validation", "--lr-scheduler", "polynomial_decay", "--warmup-updates", "4",
                "--total-num-update", "10", "--max-tokens", "24000"]

    def train(workers: int, max_update: int) -> str:
        if workers == 1:
            result = fairseq_train(corpus, save_dir, *schedule, "--update-freq", "2", "--max-update", max_update)
            assert result.returncode == 0, result.stdout[-4000:]
            return result.stdout
        results = fairseq_train_workers(corpus, save_dir, 2, *schedule, "--max-update", max_update)
        for rank, result in enumerate(results):
            assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
        return results[0].stdout

    before, after = (2, 1) if layout == "2 workers -> 1" else (1, 2)
    first = train(before, 1)
    resumed = train(after, 2)
    assert "(epoch 1 @ 1 updates)" in resumed
    assert train_log_values(resumed, "num_updates") == [2.0]
    assert train_log_values(resumed, "lr") == pytest.approx([2 * train_log_values(first, "lr")[0]])
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 2
    assert state["last_optimizer_state"]["state"]  # Adam's moments came along


# K=0 drops the NaN shard after its outer forward through DDP (a non-finite loss), K=1 before it.
@pytest.mark.parametrize("backend,inner_steps", [("legacy_ddp", 1), ("c10d", 1), ("c10d", 0)])
def test_workers_holding_different_shards_one_dropping_its_own_do_not_hang(corpus_copy, tmp_path, backend,
                                                                           inner_steps):
    """Temperature sampling, one shard per update: the 2 workers mostly hold different shards,
    and the one holding the all-NaN shard leaves it out of its update. Both finish, the drops
    are counted, and the parameters stay finite. No hang: legacy_ddp's all-reduce is one call
    per update whatever each worker did; under c10d it rides on the backward of the update's
    last shard, which the dropping worker replaces by a pass that adds nothing."""
    fill_shard_with_nan(corpus_copy, "noisy")
    comm_log = tmp_path / "comm.jsonl"
    workers = fairseq_train_workers(
        corpus_copy, tmp_path / "run", 2, "--ddp-backend", backend, "--inner-steps", inner_steps,
        "--shard-sampling", "temperature", "--shards-per-update", "1", "--max-update", "4",
        "--disable-validation", timeout=180, comm_log=comm_log)
    for rank, result in enumerate(workers):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
    assert sum(train_log_values(workers[0].stdout, "dropped_noisy")) > 0
    state = torch.load(tmp_path / "run" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 4
    for name, tensor in state["model"].items():
        if torch.is_floating_point(tensor):
            assert torch.isfinite(tensor).all(), name
    # Every update all-reduced the gradient once on both workers, dropping or not.
    parameter_bytes = 4 * sum(t.numel() for t in state["model"].values() if torch.is_floating_point(t))
    for rank in range(2):
        assert [r["grad_bytes"] for r in comm_records(comm_log, rank)] == [parameter_bytes] * 4
