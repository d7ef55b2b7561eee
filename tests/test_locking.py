"""A second eqssl-make-corpus or eqssl-reproduce on a folder that a running one is writing stops
at once naming it; the lock of a killed one is taken over with a warning. Real processes."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from conftest import BIN, REPO, run
from eqssl.locking import LOCK_NAME


def start(command, cwd) -> subprocess.Popen:
    """A console command of this environment in its own process group (killed whole later)."""
    return subprocess.Popen([str(BIN / command[0]), *map(str, command[1:])], cwd=cwd, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_owner(folder: Path, process: subprocess.Popen, timeout: float = 120) -> dict:
    """The lock file's owner record, once the process has written it."""
    lock = folder / LOCK_NAME
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        if lock.exists() and lock.read_text().strip():
            return json.loads(lock.read_text())
        time.sleep(0.2)
    raise AssertionError(f"{lock} was never written")


def pause(process: subprocess.Popen) -> None:
    """Stop the whole process group (it keeps its lock), so that it is surely still there."""
    os.killpg(process.pid, signal.SIGSTOP)


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_make_corpus_refuses_a_second_writer_and_takes_over_a_killed_ones_lock(tmp_path):
    out = tmp_path / "corpus"
    command = ["eqssl-make-corpus", out, "--preset", "multilingual", "--size", "tiny", "--workers", "1"]
    first = start(command, tmp_path)
    try:
        owner = wait_for_owner(out, first)
        assert owner["pid"] == first.pid and owner["program"] == "eqssl-make-corpus"
        pause(first)
        began = time.time()
        second = run(command, cwd=tmp_path)
        assert second.returncode == 2
        assert f"is being written by eqssl-make-corpus (pid {first.pid}" in second.stdout, second.stdout
        assert time.time() - began < 60  # refused at start-up, not after synthesising anything
        assert first.poll() is None  # the first one is left alone
    finally:
        kill(first)
    third = run(command, cwd=tmp_path)
    assert third.returncode == 0, third.stdout[-3000:]
    assert f"taking over the lock of eqssl-make-corpus (pid {first.pid}" in third.stdout
    assert json.loads((out / "corpus.json").read_text())["complete"]
    assert (out / LOCK_NAME).read_text() == ""  # released cleanly: nothing for a later run to take over


def test_reproduce_refuses_a_second_run_on_the_same_folder(multilingual_corpus, tmp_path):
    out = tmp_path / "runs"
    (out / "multilingual").mkdir(parents=True)
    (out / "multilingual" / "corpus").symlink_to(multilingual_corpus)
    settings = yaml.safe_load(open(REPO / "recipes" / "reproduce" / "tiny.yaml"))
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(settings))
    command = ["eqssl-reproduce", "--preset", "multilingual", "--size", tmp_path / "settings.yaml", "--out", out]
    first = start(command, tmp_path)
    try:
        owner = wait_for_owner(out, first)
        assert owner["pid"] == first.pid and owner["program"] == "eqssl-reproduce"
        pause(first)
        second = run(command, cwd=tmp_path)
        assert second.returncode != 0
        assert f"eqssl-reproduce: {out} is being written by eqssl-reproduce (pid {first.pid}" in second.stdout
        assert first.poll() is None
        # --report only reads finished stages: it may run beside a writer (and finds none finished)
        report = run([*command, "--report"], cwd=tmp_path)
        assert "is being written" not in report.stdout and "not finished" in report.stdout, report.stdout[-2000:]
    finally:
        kill(first)
