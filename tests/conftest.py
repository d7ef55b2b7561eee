"""Shared fixtures: a small generated corpus and runners for fairseq's real command lines."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (README's test command runs one worker per core) a worker, its torch and
    # the fairseq processes it starts take one thread each, so that workers do not share cores.
    # Set before torch is imported (the import below imports fairseq and torch).
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import forked_command  # noqa: E402
from eqssl.corpus.toy import make_corpus  # noqa: E402
from eqssl.experiment.fairseq_log import trainings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

LONGEST_FIRST = ("test_reproduce.py", "test_distributed.py", "test_bestrq.py", "test_cpc.py", "test_faults.py",
                 "test_fairseq_plugin.py", "test_bad_input.py", "test_export_hf.py", "test_locking.py",
                 "test_learning.py", "test_finetune.py", "test_presets.py", "test_evaluate.py", "test_recipes.py",
                 "test_corpus.py", "test_alignments.py", "test_measures.py", "test_export.py", "test_probe.py")
"""Test files from the longest down (measured with --durations, docs/development.md); the rest
take seconds. Under pytest-xdist they start in this order, so that the two workers end together
(longest processing time first) instead of one finishing a long file alone."""


def pytest_configure(config) -> None:
    """pytest-xdist's loadfile hands out files ordered by their number of tests unless told not to
    (--no-loadscope-reorder): keep the order of :func:`pytest_collection_modifyitems`."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items) -> None:
    """Under pytest-xdist, whose workers take test files in collection order, the longest files go
    first, so that none of them starts last and runs alone; a file's own order is kept."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# The flags every fairseq-train test run shares: tiny model, CPU, a few updates.
TRAIN_FLAGS = [
    "--user-dir", str(REPO / "eqssl"),
    "--task", "equilibrium_pretraining",
    "--criterion", "equilibrium_wav2vec",
    "--arch", "eq_wav2vec2_tiny",
    "--cpu", "--seed", "1",
    "--max-tokens", "48000", "--max-sample-size", "24000", "--min-sample-size", "8000",
    "--required-batch-size-multiple", "1",
    "--optimizer", "adam", "--lr", "1e-4",
    "--loss-weights", "[0.1, 10]",
    "--log-format", "simple", "--log-interval", "1",
    "--ddp-backend", "legacy_ddp", "--num-workers", "0",
    "--no-epoch-checkpoints",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Three shards (read, telephone, noisy) of short generated clips; treat as read-only."""
    root = tmp_path_factory.mktemp("corpus") / "toy"
    make_corpus(str(root), shards=3, train_clips=8, valid_clips=3, min_seconds=0.8, max_seconds=1.6)
    return root


@pytest.fixture(scope="session")
def multilingual_corpus(tmp_path_factory) -> Path:
    """The built-in corpus, multilingual preset, tiny size (about 11 s); treat as read-only."""
    from eqssl.corpus.make_corpus import make_corpus as make_builtin_corpus

    out = tmp_path_factory.mktemp("multilingual") / "corpus"
    make_builtin_corpus(str(out), "multilingual", "tiny", seed=0, workers=2, progress=False)
    return out


@pytest.fixture
def corpus_copy(corpus, tmp_path) -> Path:
    """A private copy of the corpus that a test may damage."""
    copy = tmp_path / "toy"
    shutil.copytree(corpus, copy)
    for manifest in copy.glob("*/*.tsv"):
        lines = manifest.read_text().splitlines()
        lines[0] = str(copy / manifest.parent.name / "audio")
        manifest.write_text("\n".join(lines) + "\n")
    return copy


def run(command, cwd=REPO, timeout=600, fresh=False) -> subprocess.CompletedProcess:
    """Run a console command of this environment; stdout and stderr together in .stdout.

    An eqssl or fairseq console script runs in a child forked from a server that has torch,
    fairseq and eqssl imported (tests/forked_command.py), which saves each command seconds of
    imports; ``fresh``: in a new interpreter instead, for what a command prints as it imports."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not fresh and forked_command.is_console_script(str(command[0])):
        with tempfile.TemporaryDirectory() as folder:
            return forked_command.SERVER.run(str(command[0]), [str(BIN / command[0]), *map(str, command[1:])],
                                             cwd, env, os.path.join(folder, "output"), timeout)
    return subprocess.run(
        [str(BIN / command[0]), *map(str, command[1:])],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )


def compose_jobs(jobs: dict, cwd: Path) -> dict:
    """``{name: fairseq-hydra-train command}`` (each ending in ``--cfg job``) run through fairseq's
    entry point in one process (tests/compose_jobs.py): ``{name: CompletedProcess}``, as
    :func:`run` would give for each, for a few seconds in all instead of a few seconds each."""
    for name, command in jobs.items():
        if command[0] != "fairseq-hydra-train" or "--cfg" not in command:
            raise ValueError(f"{name}: not a fairseq-hydra-train --cfg command: {command}")
    jobs_file, results_file = Path(cwd) / "compose_jobs.json", Path(cwd) / "compose_results.json"
    jobs_file.write_text(json.dumps({name: list(map(str, command[1:])) for name, command in jobs.items()}))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "compose_jobs.py"), jobs_file, results_file],
                          cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    results = json.loads(results_file.read_text())
    return {name: subprocess.CompletedProcess(jobs[name], r["returncode"], r["stdout"]) for name, r in results.items()}


def fairseq_train(data, save_dir, *extra) -> subprocess.CompletedProcess:
    return run(["fairseq-train", data, *TRAIN_FLAGS, "--save-dir", save_dir, *extra])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def fairseq_train_workers(data, save_dir, workers: int, *extra, timeout=600, comm_log=None,
                          flags=TRAIN_FLAGS) -> list:
    """fairseq-train as ``workers`` CPU processes of one gloo job, launched the way fairseq reads
    an explicit init method (torchrun's path needs CUDA in fairseq); returns each rank's output.
    ``flags``: the model's flags (TRAIN_FLAGS: wav2vec 2.0).

    With ``comm_log`` (a path) it runs as examples/fairseq_train_counting.py, which records each
    update's all-reduces in ``comm_log.rank<R>`` and lets fairseq's c10d backend run on CPU."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [str(BIN / "fairseq-train")]
    if comm_log is not None:
        command = [sys.executable, str(REPO / "examples" / "fairseq_train_counting.py")]
        env["EQSSL_COMM_LOG"] = str(comm_log)
    address = f"tcp://localhost:{free_port()}"
    processes = [
        subprocess.Popen(
            [*command, str(data), *flags, "--save-dir", str(save_dir),
             "--distributed-world-size", str(workers), "--distributed-rank", str(rank),
             "--distributed-init-method", address, "--distributed-no-spawn", "--distributed-backend", "gloo",
             *map(str, extra)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(workers)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    except subprocess.TimeoutExpired:
        pytest.fail(f"{workers} workers did not finish in {timeout} s (a hang?)")
    finally:
        for p in processes:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(processes, outputs)]


def train_log_values(output: str, key: str) -> list:
    """Every value of ``key=`` in fairseq's train_inner log lines."""
    return [stats[key] for stats in trainings(output.splitlines()) if key in stats]


def comm_records(comm_log, rank: int = 0) -> list:
    """The per-update all-reduce records examples/fairseq_train_counting.py wrote for ``rank``."""
    path = Path(f"{comm_log}.rank{rank}")
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensorboard_scalars(logdir) -> dict:
    """{log kind: {tag: [(step, value), ...]}} of a TensorBoard folder, read back with TensorBoard's
    own event reader by examples/plot_tensorboard.py (imported by path), the README figure's script."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_tensorboard", REPO / "examples" / "plot_tensorboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_scalars(str(logdir))
