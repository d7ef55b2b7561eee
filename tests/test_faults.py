"""Faults of long runs: SIGKILL and resume, unreadable checkpoints, audio that breaks mid-run, a
non-finite outer gradient."""

import math
import os
import random
import signal
import subprocess

import pytest
import soundfile
import torch

from eqssl.data.shards import clip_path

from conftest import BIN, REPO, TRAIN_FLAGS, fairseq_train, train_log_values
from test_fairseq_plugin import build_trainer, load_state

# Adam and a warm-up: the optimizer state and the schedule must survive a resume too.
RUN = ["--inner-steps", "1", "--lr-scheduler", "polynomial_decay", "--warmup-updates", "3",
       "--total-num-update", "20", "--disable-validation", "--save-interval-updates", "1",
       "--keep-interval-updates", "2"]


def assert_same_parameters(a, b) -> None:
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def updates_saved(save_dir) -> int:
    """Updates in checkpoint_last.pt; -1 when absent or unreadable (the next start repairs it)."""
    try:
        return load_state(save_dir / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"]
    except Exception:
        return -1


def start(corpus, save_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "fairseq-train"), str(corpus), *TRAIN_FLAGS, "--save-dir", str(save_dir), *map(str, extra)],
        cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    """Three SIGKILLs, each a random time after a random update has been logged (so some land
    while a checkpoint is written or copied); every restart resumes from checkpoint_last and
    the run ends with the parameters, bit for bit, of one that was never interrupted."""
    straight = fairseq_train(corpus, tmp_path / "straight", *RUN, "--max-update", "8")
    assert straight.returncode == 0, straight.stdout[-3000:]
    rng = random.Random(0)
    save_dir = tmp_path / "killed"
    kills = 0
    for _ in range(3):
        if updates_saved(save_dir) == 8:
            break  # fairseq tests max_update after an update: a finished run restarted does one more
        process = start(corpus, save_dir, *RUN, "--max-update", "8")
        target = rng.randint(1, 7)
        for line in process.stdout:
            updates = train_log_values(line, "num_updates")
            if updates and updates[0] >= target:
                break
        else:
            process.wait()
            break  # finished before the kill
        delay = rng.uniform(0.0, 0.4)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            kills += 1
        process.wait()
        process.stdout.close()
    assert kills >= 1
    if updates_saved(save_dir) != 8:
        finish = fairseq_train(corpus, save_dir, *RUN, "--max-update", "8")
        assert finish.returncode == 0, finish.stdout[-3000:]
    assert_same_parameters(load_state(save_dir / "checkpoint_last.pt"),
                           load_state(tmp_path / "straight" / "checkpoint_last.pt"))


def test_checkpoint_last_truncated_by_a_kill_during_the_copy_is_repaired(corpus, tmp_path):
    """fairseq copies the checkpoint it just wrote to checkpoint_last.pt non-atomically; a kill
    in that copy leaves it truncated. The resume moves it aside, starts from its intact source,
    and ends equal to an uninterrupted run."""
    straight = fairseq_train(corpus, tmp_path / "straight", *RUN, "--max-update", "6")
    save_dir = tmp_path / "run"
    # Update 3 is not the end of an epoch: fairseq writes checkpoint_1_3.pt, then copies it.
    first = fairseq_train(corpus, save_dir, *RUN, "--max-update", "3")
    assert straight.returncode == first.returncode == 0, first.stdout[-3000:]
    last = save_dir / "checkpoint_last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    resumed = fairseq_train(corpus, save_dir, *RUN, "--max-update", "6")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "checkpoint_1_3.pt, the newest readable checkpoint" in resumed.stdout
    assert "(epoch 1 @ 3 updates)" in resumed.stdout
    assert (save_dir / "checkpoint_last.pt.corrupt").read_bytes() == data[: len(data) // 2]  # kept
    assert_same_parameters(load_state(last), load_state(tmp_path / "straight" / "checkpoint_last.pt"))


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 3]


def flip_a_byte(data: bytes) -> bytes:
    # torch.load does not notice this one: the record's CRC-32 does.
    middle = bytearray(data)
    middle[len(data) // 2] ^= 0xFF
    return bytes(middle)


def empty(data: bytes) -> bytes:
    return b""


@pytest.mark.parametrize("damage", [truncate, flip_a_byte, empty])
def test_unreadable_restore_file_is_one_error_naming_it(corpus, tmp_path, damage):
    first = fairseq_train(corpus, tmp_path / "first", *RUN, "--max-update", "1")
    assert first.returncode == 0, first.stdout[-3000:]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(damage((tmp_path / "first" / "checkpoint_last.pt").read_bytes()))
    result = fairseq_train(corpus, tmp_path / "second", *RUN, "--max-update", "2", "--restore-file", bad)
    assert result.returncode != 0
    final = [line for line in result.stdout.splitlines() if line.strip()][-1]
    assert "CheckpointError" in final and str(bad) in final, final
    assert "train_inner" not in result.stdout


def test_checkpoint_last_without_any_readable_checkpoint_is_one_error(corpus, tmp_path):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / "checkpoint_last.pt").write_bytes(b"PK\x03\x04 not really")
    result = fairseq_train(corpus, save_dir, *RUN, "--max-update", "1")
    final = [line for line in result.stdout.splitlines() if line.strip()][-1]
    assert result.returncode != 0 and "checkpoint_last.pt" in final and "no readable" in final, final
    assert (save_dir / "checkpoint_last.pt").read_bytes() == b"PK\x03\x04 not really"  # left alone


def test_audio_that_breaks_mid_run_is_left_out_and_counted(corpus_copy, caplog):
    """A clip whose file is overwritten after the manifests were checked: its batch trains
    without it, the log counts it per shard, and the parameters stay finite."""
    cfg, task, model, trainer, _ = build_trainer(corpus_copy, inner_steps=1)
    dataset = task.dataset("train")
    read = dataset.names.index("read")
    path = clip_path(dataset.datasets[read], 0)
    with open(path, "wb") as f:
        f.write(b"RIFF\x00\x00")  # what a failing disk leaves
    with pytest.raises(soundfile.LibsndfileError):
        soundfile.read(path)
    iterator = task.get_batch_iterator(dataset, max_tokens=cfg.dataset.max_tokens, required_batch_size_multiple=1,
                                       seed=1).next_epoch_itr(shuffle=False)
    counted = 0
    for sample in iterator:
        counted += sample.get("unreadable", {}).get("read", 0)
        log = trainer.train_step([sample])
        assert math.isfinite(log["loss"])
    assert counted == 1
    assert any(path in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name


def test_non_finite_outer_gradient_skips_the_update_and_is_counted(corpus):
    """A NaN in the outer gradient while every loss is finite: no exception, no step (SGD without
    momentum: the parameters are unchanged), every shard counted in dropped_*; the next update
    trains normally."""
    cfg, task, model, trainer, sample = build_trainer(corpus, inner_steps=0)
    target = model.final_proj.weight
    handle = target.register_hook(lambda grad: grad * float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = trainer.train_step([sample])
    handle.remove()
    assert math.isfinite(log["loss"])
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name
    assert [log[f"dropped_{s}"] for s in ("noisy", "read", "telephone")] == [1.0, 1.0, 1.0]
    trainer.train_step([sample])
    assert not torch.equal(target.detach(), before["final_proj.weight"])
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
