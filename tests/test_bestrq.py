"""BEST-RQ (model ``eq_bestrq``, criterion ``equilibrium_bestrq``) through eqssl's real entry points.

Covered: the frozen random-projection quantizer is a function of its seed alone and travels
bit for bit in checkpoints (resume, ``init_from``) and through reduced precision; one fairseq
update against a hand computation with plain ``F.cross_entropy`` (K=0 and K=1); a clip's encoding
independent of the padding of its batch; masked-code accuracy rising above the majority code
(chance) on generated audio; 2 gloo workers against one process; a SIGKILL and resume against an
uninterrupted run; fp16 and bf16 against fp32, with fp32's targets; one clear error for audio at another
sample rate, a wav2vec 2.0 checkpoint as ``init_from`` and a codebook that does not match it; CTC
fine-tuning, ``eqssl-evaluate``, and ``eqssl-export`` files rebuilt by
``examples/bestrq_standalone.py`` without eqssl and fairseq, giving the same outputs.

The machine these run on may be busy: every process here runs one thread (torch's default of
one per core is far slower than that when the cores are shared).
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.data import data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer
from omegaconf import open_dict

from eqssl.checkpoints import CheckpointError
from eqssl.measures.evaluation import decode_set, greedy_decode, load_checkpoint, load_test_set
from eqssl.tasks.equilibrium_pretraining import batch_seed
from eqssl.corpus.toy import make_corpus
from eqssl.experiment.fairseq_log import validations

from conftest import (BIN, REPO, TRAIN_FLAGS, comm_records, fairseq_train, fairseq_train_workers, run,
                      train_log_values)
from test_bad_input import assert_stopped_before_training, rewrite_clip, tone

SHARDS = ["noisy", "read", "telephone"]
QUANTIZER = ("quantizer.projection", "quantizer.codebook")


def _bestrq_flags() -> list:
    """conftest.TRAIN_FLAGS with the BEST-RQ model and criterion (and no wav2vec loss weights)."""
    flags = list(TRAIN_FLAGS)
    at = flags.index("--loss-weights")
    del flags[at:at + 2]
    flags[flags.index("--criterion") + 1] = "equilibrium_bestrq"
    flags[flags.index("--arch") + 1] = "eq_bestrq_tiny"
    return flags


BESTRQ_FLAGS = _bestrq_flags()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread per process, here and in every command started from this module."""
    threads, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if variable is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = variable


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def bestrq_train(data, save_dir, *extra, timeout=600) -> subprocess.CompletedProcess:
    return run(["fairseq-train", data, *BESTRQ_FLAGS, "--save-dir", save_dir, *extra], timeout=timeout)


def start_bestrq_train(data, save_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "fairseq-train"), str(data), *BESTRQ_FLAGS, "--save-dir", str(save_dir), *map(str, extra)],
        cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def bestrq_train_workers(data, save_dir, workers: int, *extra, comm_log=None, timeout=300) -> list:
    """conftest.fairseq_train_workers with BESTRQ_FLAGS."""
    return fairseq_train_workers(data, save_dir, workers, *extra, timeout=timeout, comm_log=comm_log,
                                 flags=BESTRQ_FLAGS)


def load_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def setup(data, *extra):
    """(cfg, task) of fairseq-train's command line with BESTRQ_FLAGS, the train split loaded."""
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [str(data), *BESTRQ_FLAGS, *map(str, extra), "--no-save"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    return cfg, task


def first_batch(cfg, task) -> dict:
    return next(task.get_batch_iterator(
        task.dataset("train"), max_tokens=cfg.dataset.max_tokens, required_batch_size_multiple=1, seed=1
    ).next_epoch_itr(shuffle=False))


def read_clip(path) -> torch.Tensor:
    audio, rate = soundfile.read(str(path), dtype="float32")
    assert rate == 16000
    return torch.from_numpy(audio)


def assert_equal_states(a: dict, b: dict) -> None:
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"]
    assert set(a["model"]) == set(b["model"])
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """A tiny BEST-RQ CSSL checkpoint after 4 updates, shared by the tests that only read it."""
    save_dir = tmp_path_factory.mktemp("bestrq_pretrained")
    result = bestrq_train(corpus, save_dir, "--inner-steps", "0", "--max-update", "4", "--disable-validation")
    assert result.returncode == 0, result.stdout[-3000:]
    return save_dir / "checkpoint_last.pt"


# --------------------------------------------------------------------------------------------
# 1. The quantizer: the targets never move
# --------------------------------------------------------------------------------------------


def test_quantizer_is_a_function_of_its_seed_alone(corpus):
    """Two models built with the same quantizer_seed (from different global torch seeds, i.e.
    different network weights) have bit-identical projection and codebook, stored in the state
    dict as float32, and give identical codes for the same features; another seed gives other
    buffers and other codes. The codes are those of the definition: the nearest unit codebook
    entry to the L2-normalised projection."""
    cfg, task = setup(corpus)
    sample = first_batch(cfg, task)["shards"]["read"]["net_input"]

    def build(seed: int, global_seed: int):
        with open_dict(cfg.model):
            cfg.model.quantizer_seed = seed
        torch.manual_seed(global_seed)
        return task.build_model(cfg.model)

    a, b, other = build(1, 0), build(1, 123), build(2, 0)
    assert not torch.equal(a.input_projection.weight, b.input_projection.weight)  # really other draws
    for key in QUANTIZER:
        assert a.state_dict()[key].dtype == torch.float32
        assert torch.equal(a.state_dict()[key], b.state_dict()[key]), key
        assert not torch.equal(a.state_dict()[key], other.state_dict()[key]), key
    assert not any(key.startswith("quantizer.") for key, _ in a.named_parameters())  # never trained

    features, padding = a.features(sample["source"], sample.get("padding_mask"))
    codes = a.quantizer(features)
    assert codes.shape == features.shape[:2] and codes.dtype == torch.int64
    assert torch.equal(codes, b.quantizer(features))
    assert torch.equal(codes, a.quantizer(features.clone()))  # no hidden state
    expected = (F.normalize(features @ a.quantizer.projection, dim=-1) @ a.quantizer.codebook.T).argmax(-1)
    assert torch.equal(codes, expected)
    other_codes = other.quantizer(features)[~padding]
    assert (other_codes != codes[~padding]).float().mean() > 0.5
    assert len(codes[~padding].unique()) > 5  # not a degenerate code


def test_half_and_bfloat16_leave_the_quantizer_float32(corpus):
    """``.half()`` and ``.to(torch.bfloat16)`` convert the network but not the projection and
    codebook: they stay float32 and bit-identical, and the codes of the same features with them."""
    cfg, task = setup(corpus)
    sample = first_batch(cfg, task)["shards"]["telephone"]["net_input"]
    utils.set_torch_seed(1)
    reference = task.build_model(cfg.model)
    features, _ = reference.features(sample["source"], sample.get("padding_mask"))
    codes = reference.quantizer(features)
    for convert, dtype in ((lambda m: m.half(), torch.float16), (lambda m: m.to(torch.bfloat16), torch.bfloat16)):
        utils.set_torch_seed(1)
        model = convert(task.build_model(cfg.model))
        assert model.input_projection.weight.dtype == dtype and model.head.weight.dtype == dtype
        state = model.state_dict()
        for key in QUANTIZER:
            assert state[key].dtype == torch.float32, (dtype, key)
            assert torch.equal(state[key], reference.state_dict()[key]), (dtype, key)
        assert torch.equal(model.quantizer(features), codes)
        assert torch.equal(model.quantizer(features.to(dtype)), model.quantizer(features.to(dtype).float()))


def test_checkpoint_carries_the_quantizer_through_resume_and_init_from(corpus, tmp_path):
    """The buffers in a checkpoint are the targets, not the seed: a checkpoint_last whose codebook
    was replaced (rows reversed, still a valid codebook) is resumed by fairseq-train with that
    codebook, bit for bit, up to the next checkpoint; a model built with model.init_from=that
    checkpoint holds its buffers and weights; loading it into a model of another quantizer_seed
    gives its buffers too."""
    save_dir = tmp_path / "run"
    first = bestrq_train(corpus, save_dir, "--inner-steps", "1", "--max-update", "2", "--disable-validation")
    assert first.returncode == 0, first.stdout[-3000:]
    last = save_dir / "checkpoint_last.pt"
    state = load_state(last)
    cfg, task = setup(corpus)
    utils.set_torch_seed(5)
    fresh = task.build_model(cfg.model)
    for key in QUANTIZER:  # saved, and as drawn from the seed
        assert torch.equal(state["model"][key], fresh.state_dict()[key]), key
    replaced = state["model"]["quantizer.codebook"].flip(0).clone()
    state["model"]["quantizer.codebook"] = replaced
    torch.save(state, last)

    resumed = bestrq_train(corpus, save_dir, "--inner-steps", "1", "--max-update", "4", "--disable-validation")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "(epoch 1 @ 2 updates)" in resumed.stdout
    assert train_log_values(resumed.stdout, "num_updates") == [3.0, 4.0]
    continued = load_state(last)
    assert continued["optimizer_history"][-1]["num_updates"] == 4
    assert torch.equal(continued["model"]["quantizer.codebook"], replaced)
    assert torch.equal(continued["model"]["quantizer.projection"], state["model"]["quantizer.projection"])
    assert not torch.equal(continued["model"]["head.weight"], state["model"]["head.weight"])  # it trained

    cfg, task = setup(corpus, "--init-from", last)
    model = task.build_model(cfg.model)
    loaded = model.state_dict()
    assert set(loaded) == set(continued["model"])
    for key, tensor in continued["model"].items():
        assert torch.equal(loaded[key], tensor), key
        assert loaded[key].dtype == tensor.dtype, key

    cfg, task = setup(corpus, "--quantizer-seed", "7")
    other = task.build_model(cfg.model)
    assert not torch.equal(other.quantizer.projection, continued["model"]["quantizer.projection"])
    other.load_state_dict(continued["model"])
    for key in QUANTIZER:
        assert torch.equal(other.state_dict()[key], continued["model"][key]), key


# --------------------------------------------------------------------------------------------
# 2. One fairseq update against a hand computation
# --------------------------------------------------------------------------------------------


def build_trainer(corpus, inner_steps: int):
    """fairseq's Trainer over the BEST-RQ flags with plain SGD (lr 0.05) as the outer optimizer."""
    flags = list(BESTRQ_FLAGS)
    flags[flags.index("--optimizer") + 1] = "sgd"
    flags[flags.index("--lr") + 1] = "0.05"
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(corpus), *flags, "--inner-steps", str(inner_steps), "--inner-lr", "0.02", "--no-save"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    utils.set_torch_seed(cfg.common.seed)
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    return cfg, task, model, trainer, first_batch(cfg, task)


def reference_update(cfg, task, trained_model, sample, inner_steps: int, inner_lr: float, lr: float) -> dict:
    """θ - β (1/M) Σ_i ∇g_i(φ_i^K) with g_i = F.cross_entropy(logits, targets) of the model's
    forward pass and hand-written SGD, seeded as the task seeds a batch."""
    model = task.build_model(cfg.model)
    model.load_state_dict(trained_model.state_dict())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    shards = list(sample["shards"].values())
    seed = batch_seed(cfg.common.seed, 0, int(shards[0]["id"][0]))
    with data_utils.numpy_seed(seed), utils.set_torch_seed(seed):
        for batch in shards:
            state = (torch.get_rng_state(), np.random.get_state())

            def g():
                torch.set_rng_state(state[0])
                np.random.set_state(state[1])
                output = model(**batch["net_input"])
                return F.cross_entropy(output["logits"], output["targets"])

            for _ in range(inner_steps):
                grads = torch.autograd.grad(g(), params, allow_unused=True)
                with torch.no_grad():
                    for p, grad in zip(params, grads):
                        if grad is not None:
                            p -= inner_lr * grad
            grads = torch.autograd.grad(g(), params, allow_unused=True)
            for t, grad in zip(total, grads):
                if grad is not None:
                    t += grad / len(shards)
            with torch.no_grad():
                for p, t in zip(params, theta):
                    p.copy_(t)
    with torch.no_grad():
        for p, t in zip(params, total):
            p -= lr * t
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("inner_steps", [0, 1])
def test_one_fairseq_update_equals_a_hand_computation(corpus, inner_steps):
    """Through fairseq's Trainer (SGD outer step), K=0 is the plain per-shard-averaged
    cross-entropy step and K=1 the first-order equilibrium step, both computed here with
    F.cross_entropy on the model's masked logits and targets. Every parameter moves as
    computed; the quantizer does not move at all."""
    cfg, task, model, trainer, sample = build_trainer(corpus, inner_steps)
    assert list(sample["shards"]) == SHARDS
    expected = reference_update(cfg, task, model, sample, inner_steps, inner_lr=0.02, lr=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {k: model.state_dict()[k].clone() for k in QUANTIZER}
    log = trainer.train_step([sample])
    moved = 0.0
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (param.detach() - before[name]).abs().max().item())
    assert moved > 1e-4  # the update did something
    for key in QUANTIZER:
        assert torch.equal(model.state_dict()[key], buffers[key]), key
    for shard in SHARDS:
        assert 0 <= log[f"accuracy_{shard}"] <= 1 and 0 < log[f"majority_{shard}"] <= 1
        assert log[f"loss_before_{shard}"] > 0


def test_a_clips_encoding_does_not_depend_on_the_padding_of_its_batch(corpus):
    """extract_features of a clip padded to the longest clip of its batch equals that of the clip
    alone, at every block (torchaudio's Conformer convolves and GroupNorm-normalises over the
    padding: before eq_bestrq kept padded frames out, outputs differed by about 1 on values of
    about 1, and batched evaluation gave other transcripts than one clip at a time)."""
    cfg, task = setup(corpus)
    utils.set_torch_seed(1)
    model = task.build_model(cfg.model).eval()
    lines = (corpus / "read" / "train.tsv").read_text().splitlines()
    root, rows = lines[0], [line.split("\t") for line in lines[1:]]
    rows = sorted(rows, key=lambda row: int(row[1]))
    waves = [read_clip(os.path.join(root, rows[0][0])), read_clip(os.path.join(root, rows[-1][0]))]
    assert waves[1].numel() - waves[0].numel() > 4000  # a lot of padding for the short one
    source = torch.zeros(2, waves[1].numel())
    padding = torch.zeros(2, waves[1].numel(), dtype=torch.bool)
    for row, wave in enumerate(waves):
        source[row, : wave.numel()] = wave
        padding[row, wave.numel():] = True
    with torch.no_grad():
        batched = model.extract_features(source, padding)
        for row, wave in enumerate(waves):
            alone = model.extract_features(wave[None])
            frames = alone["x"].shape[1]
            assert int((~batched["padding_mask"][row]).sum()) == frames
            for block, (a, b) in enumerate(zip(alone["layer_results"], batched["layer_results"])):
                torch.testing.assert_close(b[0][:frames, row], a[0][:, 0], rtol=0, atol=1e-5,
                                           msg=f"clip {row}, block {block}")


# --------------------------------------------------------------------------------------------
# 3. It learns
# --------------------------------------------------------------------------------------------


def validation_points(log: str) -> dict:
    """{updates: {key: value}} of every validation line of a fairseq log."""
    return {int(stats["num_updates"]): stats for stats in validations(log.splitlines())}


def test_cssl_recipe_beats_the_majority_code_within_500_updates(tmp_path):
    """recipes/pretrain/cssl_bestrq_tiny on 2 shards of generated audio: after 500 updates the
    masked-code validation accuracy of every shard is above 1.5 x the accuracy of always
    answering the most frequent code (measured on this corpus: about 2 x to 2.5 x at 500
    updates, 1.5 x to 2 x at 200, below 1 x at 100), and the summed accuracy grew by more
    than 0.1 since the first validation. The tiny recipe masks spans of 5 stacked frames
    (100 ms), not the paper's 20: on clips of 0.8-1.6 s made of random 80-250 ms syllables, the
    inside of a 400 ms span cannot be told from its context (accuracy stays at the majority code).
    Deterministic: fixed seeds, one thread."""
    data = tmp_path / "toy"
    make_corpus(str(data), shards=2, train_clips=48, valid_clips=24, min_seconds=0.8, max_seconds=1.6)
    updates = 500
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes" / "pretrain", "--config-name",
                  "cssl_bestrq_tiny", f"task.data={data}", f"checkpoint.save_dir={tmp_path / 'save'}",
                  f"common.user_dir={REPO / 'eqssl'}", f"optimization.max_update={updates}",
                  "dataset.validate_interval_updates=100",
                  f"checkpoint.save_interval_updates={updates}",
                  "dataset.validate_interval=100000", "checkpoint.save_interval=100000"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:]
    points = validation_points(result.stdout)
    assert sorted(points) == list(range(100, updates + 1, 100)), sorted(points)
    start, end = points[100], points[updates]
    summary = {u: {k: v for k, v in p.items() if k.startswith(("accuracy_", "majority_"))} for u, p in points.items()}
    for shard in ("read", "telephone"):
        assert 0 < end[f"majority_{shard}"] < 0.5, summary
        assert end[f"accuracy_{shard}"] > 1.5 * end[f"majority_{shard}"], summary
    assert sum(end[f"accuracy_{s}"] for s in ("read", "telephone")) > \
        sum(start[f"accuracy_{s}"] for s in ("read", "telephone")) + 0.1, summary


# --------------------------------------------------------------------------------------------
# 4. Distributed
# --------------------------------------------------------------------------------------------

ONE_UPDATE = ["--max-update", "1", "--disable-validation", "--inner-steps", "1", "--optimizer", "sgd", "--lr", "0.05"]


def one_update_model(save_dir) -> dict:
    state = load_state(save_dir / "checkpoint_last.pt")
    assert state["optimizer_history"][-1]["num_updates"] == 1
    return state["model"]


@pytest.mark.parametrize("backend", ["legacy_ddp", "c10d"])
def test_two_workers_equal_one_process_with_update_freq_2(corpus, tmp_path, backend):
    """Worker r takes batches r, r+2, …, so one update of 2 gloo workers sees the batches of one
    process with update_freq 2: the same logged per-shard statistics and parameters to float
    tolerance, the same quantizer bit for bit, and each worker all-reduces the trainable
    parameters' gradient once (the quantizer buffers are not gradients). One process over the
    first worker's batches alone differs (the comparison can fail)."""
    comm_log = tmp_path / "comm.jsonl"
    workers = bestrq_train_workers(corpus, tmp_path / "workers", 2, *ONE_UPDATE, "--ddp-backend", backend,
                                   comm_log=comm_log)
    for rank, result in enumerate(workers):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
    single = bestrq_train(corpus, tmp_path / "single", *ONE_UPDATE, "--ddp-backend", backend, "--update-freq", "2")
    assert single.returncode == 0, single.stdout[-4000:]
    for key in ("loss_before_read", "loss_after_read", "gap_noisy", "accuracy_telephone", "majority_read", "gnorm"):
        expected = train_log_values(single.stdout, key)
        assert expected, key
        assert train_log_values(workers[0].stdout, key) == pytest.approx(expected, rel=1e-3, abs=1e-3), key
    a, b = one_update_model(tmp_path / "workers"), one_update_model(tmp_path / "single")
    assert set(a) == set(b)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in QUANTIZER:
        assert torch.equal(a[key], b[key]), key
    gradient_bytes = 4 * sum(t.numel() for k, t in b.items() if torch.is_floating_point(t) and k not in QUANTIZER)
    for rank in range(2):
        assert [r["grad_bytes"] for r in comm_records(comm_log, rank)] == [gradient_bytes]
    if backend == "legacy_ddp":
        half = bestrq_train(corpus, tmp_path / "half", *ONE_UPDATE, "--ddp-backend", backend)
        assert half.returncode == 0, half.stdout[-4000:]
        c = one_update_model(tmp_path / "half")
        assert max((a[n] - c[n]).abs().max().item() for n in a) > 1e-5


# --------------------------------------------------------------------------------------------
# 5. Faults
# --------------------------------------------------------------------------------------------

RUN = ["--inner-steps", "1", "--lr-scheduler", "polynomial_decay", "--warmup-updates", "3",
       "--total-num-update", "20", "--disable-validation", "--save-interval-updates", "1",
       "--keep-interval-updates", "2"]


def test_sigkill_then_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    """A BEST-RQ PTLOC run (Adam, warm-up) killed with SIGKILL right after update 3 was logged
    (so while it saves or runs update 4) and started again resumes from checkpoint_last and ends
    with the parameters, quantizer and update count, bit for bit, of a run never interrupted:
    masks and noise are drawn from the per-batch seeds, not from where the process started."""
    updates = 6
    straight = bestrq_train(corpus, tmp_path / "straight", *RUN, "--max-update", updates)
    assert straight.returncode == 0, straight.stdout[-3000:]
    save_dir = tmp_path / "killed"
    process = start_bestrq_train(corpus, save_dir, *RUN, "--max-update", updates)
    killed = False
    try:
        for line in process.stdout:
            logged = train_log_values(line, "num_updates")
            if logged and logged[0] >= 3:
                os.kill(process.pid, signal.SIGKILL)
                killed = True
                break
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    assert killed and process.returncode == -signal.SIGKILL
    resumed = bestrq_train(corpus, save_dir, *RUN, "--max-update", updates)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Loaded checkpoint" in resumed.stdout
    done = train_log_values(resumed.stdout, "num_updates")
    assert done and done[0] > 1 and done[-1] == updates  # resumed, not restarted
    assert train_log_values(resumed.stdout, "loss") == train_log_values(straight.stdout, "loss")[-len(done):]
    assert_equal_states(load_state(save_dir / "checkpoint_last.pt"),
                        load_state(tmp_path / "straight" / "checkpoint_last.pt"))


# --------------------------------------------------------------------------------------------
# 6. Mixed precision
# --------------------------------------------------------------------------------------------

INNER_LR = 0.02
PRECISIONS = {
    # fairseq's FP16Optimizer keeps one fp32 master per parameter on CPU (no flattening).
    "fp16": ({"fp16": True, "fp16_no_flatten_grads": True, "fp16_init_scale": 1024}, torch.float16),
    "bf16": ({"bf16": True}, torch.bfloat16),
}


def one_update(corpus, precision: dict, rounding: torch.dtype):
    """One K=1 update through fairseq's Trainer with the ``common.*`` settings ``precision``,
    from weights representable in ``rounding``:
    (the fp32 gradient the optimizer stepped with, the update's log, the trainer's model, the
    targets of each forward pass of the update)."""
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(corpus), *BESTRQ_FLAGS, "--inner-steps", "1", "--inner-lr", str(INNER_LR), "--no-save"])
    cfg = convert_namespace_to_omegaconf(args)
    with open_dict(cfg):
        cfg.common.update(precision)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    utils.set_torch_seed(cfg.common.seed)
    model = task.build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(rounding).float())
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    sample = first_batch(cfg, task)
    targets = []
    hook = trainer.model.register_forward_hook(lambda module, args, output: targets.append(output["targets"]))
    log = trainer.train_step([sample])
    hook.remove()
    optimizer = trainer.optimizer
    if hasattr(optimizer, "fp32_params"):
        masters = optimizer.fp32_params
        masters = list(masters.values()) if isinstance(masters, dict) else masters
        grads = [m.grad.flatten() for m in masters]
    else:
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                 for p in trainer.model.parameters() if p.requires_grad]
    return torch.cat(grads).float(), log, trainer.model, targets


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple:
    cosine = F.cosine_similarity(a, b, dim=0).item()
    return cosine, ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_reduced_precision_outer_step_equals_fp32_with_the_same_targets(corpus, precision):
    """The gradient the optimizer steps with (K=1) in fp16 / bf16 against fp32 from the same
    weights: within 1 % (fp16) and 5 % (bf16), per-shard losses within 1 %. The network is in the
    reduced type while the projection and codebook stay float32 and bit-identical, and every
    forward pass of the update had exactly the targets of fp32: the task hands BEST-RQ its audio
    in float64, which fairseq's fp16/bf16 cast of the batch leaves alone (cast to 16 bits, the
    audio changed 2.5-12.5 % of the masked targets of the first toy batch)."""
    settings, rounding = PRECISIONS[precision]
    reference, reference_log, reference_model, reference_targets = one_update(corpus, {}, rounding)
    reduced, reduced_log, reduced_model, reduced_targets = one_update(corpus, settings, rounding)
    cosine, error = agreement(reduced, reference)
    if rounding == torch.float16:
        assert cosine > 0.9999 and error < 0.01, (cosine, error)
    else:
        assert cosine > 0.999 and error < 0.05, (cosine, error)
    for key in ("loss_before_read", "loss_after_read", "loss_before_telephone"):
        assert reduced_log[key] == pytest.approx(reference_log[key], rel=1e-2), key
    assert reduced_model.input_projection.weight.dtype == rounding
    for key in QUANTIZER:
        buffer = reduced_model.state_dict()[key]
        assert buffer.dtype == torch.float32 and torch.equal(buffer, reference_model.state_dict()[key]), key
    assert len(reduced_targets) == len(reference_targets) == 2 * len(SHARDS)  # K=1: two passes per shard
    for a, b in zip(reduced_targets, reference_targets):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# 7. Bad input
# --------------------------------------------------------------------------------------------


def hydra_error(result) -> str:
    """The exception line of a failed fairseq-hydra-train (hydra prints one hint line after it)."""
    lines = [line for line in result.stdout.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    return lines[-1] if lines else ""


def test_audio_at_another_sample_rate_is_one_error_naming_it(corpus_copy, tmp_path):
    """An 8 kHz clip in a 16 kHz manifest stops fairseq-train before any update with an error
    naming the manifest line, the file and both rates; task.sample_rate=8000 against the
    model's 16 kHz features (hydra recipe) stops it with an error naming both fields."""
    path = rewrite_clip(corpus_copy, "read", "train", 2, tone(12000), sample_rate=8000)
    save_dir = tmp_path / "clip"
    result = bestrq_train(corpus_copy, save_dir, "--max-update", "2")
    assert_stopped_before_training(result, save_dir, f"{corpus_copy / 'read' / 'train.tsv'}:2", str(path),
                                   "8000 Hz", "task.sample_rate")

    save_dir = tmp_path / "field"
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/pretrain", "--config-name",
                  "cssl_bestrq_tiny", f"task.data={corpus_copy}", f"checkpoint.save_dir={save_dir}",
                  f"common.user_dir={REPO / 'eqssl'}", "task.sample_rate=8000", "optimization.max_update=2"])
    final = hydra_error(result)
    assert result.returncode != 0
    assert final.startswith("ValueError:") and "task.sample_rate=8000" in final and \
        "model.sample_rate=16000" in final, result.stdout[-3000:]
    assert "train_inner" not in result.stdout and ", in forward" not in result.stdout
    assert not (save_dir / "checkpoint_last.pt").exists()


@pytest.fixture(scope="module")
def wav2vec2_checkpoint(corpus, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("wav2vec2")
    result = fairseq_train(corpus, save_dir, "--max-update", "1", "--disable-validation")
    assert result.returncode == 0, result.stdout[-3000:]
    return save_dir / "checkpoint_last.pt"


def test_wav2vec2_checkpoint_as_init_from_is_one_error_naming_it(corpus, wav2vec2_checkpoint, tmp_path):
    """An eq_wav2vec2 checkpoint given to eq_bestrq's model.init_from stops fairseq-train before
    any update with a CheckpointError naming the file, its family and the one expected."""
    save_dir = tmp_path / "run"
    result = bestrq_train(corpus, save_dir, "--init-from", wav2vec2_checkpoint, "--max-update", "2")
    assert_stopped_before_training(result, save_dir, "CheckpointError", f"model.init_from={wav2vec2_checkpoint}",
                                   "'eq_wav2vec2", "not a BEST-RQ (eq_bestrq) pre-training model")


def test_codebook_size_other_than_init_from_is_one_error_naming_the_field(corpus, pretrained, tmp_path):
    """model.codebook_size=128 with an init_from checkpoint pre-trained with 256 codes stops
    fairseq-train before any update with a CheckpointError naming model.codebook_size, both
    values and the file (as an in-process build_model does)."""
    save_dir = tmp_path / "run"
    result = bestrq_train(corpus, save_dir, "--init-from", pretrained, "--codebook-size", "128", "--max-update", "2")
    assert_stopped_before_training(result, save_dir, "CheckpointError", "model.codebook_size=128",
                                   f"model.init_from={pretrained}", "codebook_size=256")
    cfg, task = setup(corpus, "--init-from", pretrained, "--quantizer-seed", "2")
    with pytest.raises(CheckpointError, match="model.quantizer_seed=2 .* quantizer_seed=1"):
        task.build_model(cfg.model)


# --------------------------------------------------------------------------------------------
# 8. Fine-tuning, evaluation, export
# --------------------------------------------------------------------------------------------

# Runs in a fresh interpreter where `import eqssl` and `import fairseq` fail: rebuilds both exports
# with examples/bestrq_standalone.py (imported by path) and runs them on the clips in CLIPS.
STANDALONE_SCRIPT = r"""
import importlib.util, json, sys
sys.modules["eqssl"] = None
sys.modules["fairseq"] = None
import torch
for name in ("eqssl", "fairseq"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} could be imported")
example, pretraining, finetuned, clips, out = sys.argv[1:6]
spec = importlib.util.spec_from_file_location("bestrq_standalone", example)
standalone = importlib.util.module_from_spec(spec)
spec.loader.exec_module(standalone)
waves = torch.load(clips, weights_only=True)
encode, exported = standalone.load(pretraining)
assert exported["kind"] == "pretraining"
encoded = [encode(w) for w in waves]
encode, exported = standalone.load(finetuned)
assert exported["kind"] == "finetuned"
logits = [encode(w) for w in waves]
transcripts = [standalone.greedy_transcript(l, exported["vocabulary"]) for l in logits]
torch.save({"encoded": encoded, "logits": logits, "transcripts": transcripts}, out)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("eqssl", "fairseq") and sys.modules[m] is not None)
print("RESULT " + json.dumps({"loaded": loaded}))
"""


def standalone_module():
    spec = importlib.util.spec_from_file_location("bestrq_standalone", REPO / "examples" / "bestrq_standalone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_standalone_greedy_transcript_decodes_as_eqssl_evaluate(multilingual_corpus):
    """examples/bestrq_standalone.py's greedy_transcript gives eqssl-evaluate's greedy decoding
    on any emissions, including frames whose best symbol is one of fairseq's specials (<pad>,
    </s>), which eqssl-evaluate drops like the blank."""
    from fairseq.data import Dictionary

    dictionary = Dictionary.load(str(multilingual_corpus / "finetune" / "sv" / "dict.ltr.txt"))
    vocabulary = [dictionary[i] for i in range(len(dictionary))]
    standalone = standalone_module()
    generator = torch.Generator().manual_seed(0)
    specials_seen = 0
    for _ in range(20):
        logits = torch.randn(60, len(vocabulary), generator=generator)
        best = logits.argmax(-1)
        specials_seen += int(((best == dictionary.pad()) | (best == dictionary.eos())).sum())
        assert standalone.greedy_transcript(logits, vocabulary) == \
            greedy_decode(logits, dictionary, progress=False)[0]
    assert specials_seen > 0


@pytest.fixture(scope="module")
def finetuned(multilingual_corpus, pretrained, tmp_path_factory):
    """The BEST-RQ checkpoint fine-tuned with CTC (recipe ctc_bestrq_tiny, train_1h) for 100
    updates on the Swedish set of the built-in corpus; (checkpoint, labelled folder, log)."""
    data = multilingual_corpus / "finetune" / "sv"
    save = tmp_path_factory.mktemp("bestrq_ctc")
    recipe = "ctc_bestrq_tiny" if (REPO / "recipes/finetune/ctc_bestrq_tiny.yaml").exists() else "ctc_tiny"
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/finetune", "--config-name", recipe,
                  f"task.data={data}", f"model.w2v_path={pretrained}", f"checkpoint.save_dir={save}",
                  "optimization.max_update=100", "model.freeze_finetune_updates=0"])
    assert result.returncode == 0, result.stdout[-3000:]
    return save / "checkpoint_last.pt", data, result.stdout


def test_bestrq_checkpoint_fine_tunes_with_ctc_and_is_evaluated(finetuned):
    """fairseq's wav2vec_ctc takes the BEST-RQ checkpoint as its encoder: it trains on train_1h,
    validates (UER in the log), saves a wav2vec_ctc checkpoint around eq_bestrq without the
    pre-training head and quantizer, and eqssl-evaluate scores it: exit 0 and a WER/CER row."""
    checkpoint, data, log = finetuned
    assert "train_1h" in log and "valid on 'dev' subset" in log and "| uer " in log
    state = load_state(checkpoint)
    assert state["cfg"]["model"]["_name"] == "wav2vec_ctc"
    assert state["cfg"]["model"]["w2v_args"]["model"]["_name"].startswith("eq_bestrq")
    assert state["optimizer_history"][-1]["num_updates"] == 100
    assert "w2v_encoder.proj.weight" in state["model"]
    assert not any(k.startswith(("w2v_encoder.w2v_model.quantizer.", "w2v_encoder.w2v_model.head."))
                   for k in state["model"])
    result = run(["eqssl-evaluate", checkpoint, f"sv={data}:test", "--batch-size", "4"])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "| set | WER (%) | CER (%) | S/D/I | words |" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| sv |"))
    words = sum(len(line.split()) for line in (data / "test.wrd").read_text(encoding="utf-8").splitlines())
    assert row.split("|")[-2].strip() == str(words)


def test_exports_run_without_eqssl_and_fairseq_with_the_same_outputs(pretrained, finetuned, tmp_path):
    """eqssl-export writes the pre-training and the fine-tuned checkpoint as plain PyTorch;
    examples/bestrq_standalone.py rebuilds both in an interpreter where eqssl and fairseq cannot
    be imported. On every test clip the pre-training export's output equals the checkpoint's
    extract_features(...)["x"], the fine-tuned export's logits equal the emissions eqssl-evaluate
    decodes, and its greedy transcripts equal eqssl-evaluate's (clips batched with padding)."""
    ft_checkpoint, data, _ = finetuned
    outputs = {}
    for name, checkpoint in (("pretraining", pretrained), ("finetuned", ft_checkpoint)):
        outputs[name] = tmp_path / f"{name}.bestrq.pt"
        result = run(["eqssl-export", checkpoint, outputs[name]])
        assert result.returncode == 0, result.stdout[-3000:]
        assert f"wrote {outputs[name]} (BEST-RQ {name} export" in result.stdout
        exported = torch.load(outputs[name], weights_only=True)  # tensors, numbers and strings only
        assert exported["format"] == "eqssl-bestrq/1" and exported["kind"] == name
    source = load_state(pretrained)["model"]
    exported = torch.load(outputs["pretraining"], weights_only=True)
    for key in QUANTIZER:  # the targets travel with the export
        assert torch.equal(exported["quantizer"][key.split(".")[1]], source[key]), key

    model, task = load_checkpoint(str(ft_checkpoint))
    test_set = load_test_set("sv", str(data), "test", task.target_dictionary)
    assert len(test_set.audio) >= 4 and len(set(test_set.sizes)) > 1
    waves = [read_clip(path) for path in test_set.audio]
    clips = tmp_path / "clips.pt"
    torch.save(waves, clips)
    result_file = tmp_path / "standalone.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE_SCRIPT, str(REPO / "examples" / "bestrq_standalone.py"),
         str(outputs["pretraining"]), str(outputs["finetuned"]), str(clips), str(result_file)],
        cwd="/", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert json.loads(line[len("RESULT "):])["loaded"] == []
    standalone = torch.load(result_file, weights_only=True)

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(pretrained)])
    encoder = models[0].eval()
    with torch.no_grad():
        for wave, encoded, logits in zip(waves, standalone["encoded"], standalone["logits"]):
            x = encoder.extract_features(wave[None], padding_mask=None, mask=False)["x"][0]
            assert x.shape == encoded.shape and x.shape[-1] == encoder.cfg.encoder_embed_dim
            torch.testing.assert_close(encoded, x, rtol=0, atol=1e-4)
            net_output = model(source=wave[None], padding_mask=torch.zeros(1, wave.numel(), dtype=torch.bool))
            emissions = model.get_logits(net_output).transpose(0, 1)[0].float()
            assert emissions.shape == logits.shape and logits.shape[-1] == len(task.target_dictionary)
            torch.testing.assert_close(logits, emissions, rtol=0, atol=1e-4)

    hypotheses = decode_set(model, task, test_set, batch_size=8, device="cpu", progress=False)
    assert standalone["transcripts"] == hypotheses
    assert any(h.strip() for h in hypotheses), hypotheses  # the comparison is not of empty strings


def test_gap_probe_and_control_take_a_bestrq_checkpoint(pretrained, corpus, multilingual_corpus, tmp_path):
    """The tools built for wav2vec 2.0 take BEST-RQ as it is: eqssl-gap measures every shard's
    gap with the BEST-RQ loss (the inner step lowers it); the frozen-upstream probe trains on its
    Conformer blocks and leaves them bit-identical; the no-pre-training control is an eq_bestrq
    network of the same shape with fresh weights and the checkpoint's quantizer seed."""
    from eqssl.checkpoints import file_sha256
    from eqssl.measures.ctc_probe import ProbeConfig, probe
    from eqssl.models.eq_wav2vec2 import build_from_checkpoint_config, load_pretraining_checkpoint, save_random_init

    result = run(["eqssl-gap", corpus, pretrained, "--inner-steps", "1", "--inner-lr", "0.05", "--batches", "2",
                  "--json", tmp_path / "gap.json"])
    assert result.returncode == 0, result.stdout[-3000:]
    gaps = next(iter(json.loads((tmp_path / "gap.json").read_text())["results"].values()))
    for shard in SHARDS:
        assert 1 <= gaps[shard]["batches"] <= 2 and gaps[shard]["loss_before"] > 0
        assert gaps[shard]["gap"] > 0, gaps  # one SGD step on the batch lowers its own loss

    before = file_sha256(str(pretrained))
    weights = {k: v.clone() for k, v in load_pretraining_checkpoint(str(pretrained))["model"].items()}
    scores = probe(str(pretrained), str(multilingual_corpus / "finetune" / "sv"),
                   ProbeConfig(updates=10, batch_size=4, seed=3), str(tmp_path / "cache"), "sv")
    assert 0 < scores["cer"] and file_sha256(str(pretrained)) == before
    after = load_pretraining_checkpoint(str(pretrained))["model"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)

    control = save_random_init(str(pretrained), str(tmp_path / "random_init.pt"), seed=5)
    state = load_pretraining_checkpoint(control)
    assert state["cfg"]["model"]["_name"].startswith("eq_bestrq")
    fresh = state["model"]
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in weights.items()}
    assert not torch.equal(fresh["input_projection.weight"], weights["input_projection.weight"])
    for key in QUANTIZER:  # the same targets: the quantizer comes from the seed in the config
        assert torch.equal(fresh[key], weights[key]), key
    assert type(build_from_checkpoint_config(state)).__name__ == "EqBestRqModel"
