"""CPC (model ``eq_cpc``, criterion ``equilibrium_cpc``), the tiny architecture, in-process and
through eqssl's real entry points.

In-process: the context cannot see the future (bit for bit); an untrained model is at chance
(log2 13 bits, accuracy 1/13); one fairseq update against a hand computation with plain
``F.cross_entropy`` (K=0 and K=1); a clip's encoding independent of the padding of its batch; accuracy
rising clearly above chance on generated audio; one clear error for clips too short for K+1 frames,
a crop too short for them, audio at another sample rate, and a BEST-RQ or wav2vec 2.0 checkpoint as
``init_from`` (and an eq_cpc one taken with its shape and weights); fp16 and bf16 against fp32 with
the same negatives.

Through the entry points (fairseq-train, fairseq-hydra-train with the recipes, eqssl-*): both train
CPC and log its keys; 2 gloo workers (legacy_ddp, c10d) against one process; a SIGKILL and resume
against an uninterrupted run; bad input stopped before training with one clear error; CTC
fine-tuning and eqssl-evaluate; eqssl-export rebuilt by examples/cpc_standalone.py without eqssl
and fairseq, giving the same outputs; eqssl-gap, eqssl-probe and the no-pre-training control;
eqssl-reproduce --model cpc's plan and runs. Kept lean (the suite's time is budgeted): the runs share
module fixtures, one uninterrupted run serves both the distributed and the resume test, and the
eqssl-* commands other than fairseq's run in this process through their ``main``.

The machine these run on may be busy: every process here runs one thread.
"""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.data import data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer
from omegaconf import open_dict

from eqssl.checkpoints import CheckpointError
from eqssl.models.eq_cpc import FRAME_SHIFT_SAMPLES, RECEPTIVE_FIELD_SAMPLES, frame_counts
from eqssl.tasks.equilibrium_pretraining import batch_seed

from conftest import BIN, REPO, TRAIN_FLAGS, comm_records, compose_jobs, fairseq_train_workers, run, train_log_values
from test_bad_input import assert_stopped_before_training, rewrite_clip, tone
from test_bestrq import BESTRQ_FLAGS, first_batch, read_clip

SHARDS = ["noisy", "read", "telephone"]
CHANCE = 1 / 13  # 12 negatives


def _cpc_flags() -> list:
    """conftest.TRAIN_FLAGS with the CPC model and criterion (and no wav2vec loss weights)."""
    flags = list(TRAIN_FLAGS)
    at = flags.index("--loss-weights")
    del flags[at:at + 2]
    flags[flags.index("--criterion") + 1] = "equilibrium_cpc"
    flags[flags.index("--arch") + 1] = "eq_cpc_tiny"
    return flags


CPC_FLAGS = _cpc_flags()


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


def setup(data, *extra, flags=CPC_FLAGS, splits=("train",)):
    """(cfg, task) of fairseq-train's command line with ``flags``, ``splits`` loaded."""
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [str(data), *flags, *map(str, extra), "--no-save"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    for split in splits:
        task.load_dataset(split)
    return cfg, task


def build_trainer(data, *extra, flags=CPC_FLAGS):
    """(cfg, task, model, trainer) of fairseq's Trainer over ``flags``, model seeded as fairseq-train."""
    cfg, task = setup(data, *extra, flags=flags, splits=("train", "valid"))
    utils.set_torch_seed(cfg.common.seed)
    model = task.build_model(cfg.model)
    return cfg, task, model, Trainer(cfg, task, model, task.build_criterion(cfg.criterion))


def info_nce(output: dict) -> torch.Tensor:
    """The loss by hand: cross-entropy of the scores against the positive, index 0."""
    scores = output["scores"]
    return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long))


def clips_of(data, shard: str, split: str = "train") -> list:
    """The (samples,) waves of a shard's split, shortest first."""
    lines = (data / shard / f"{split}.tsv").read_text().splitlines()
    rows = sorted((line.split("\t") for line in lines[1:]), key=lambda row: int(row[1]))
    return [read_clip(os.path.join(lines[0], row[0])) for row in rows]


def contexts(model, source: torch.Tensor, padding=None) -> list:
    """z and every block's output, each (B, T, C), of an eval-mode model."""
    with torch.no_grad():
        features = model.extract_features(source, padding)
    return [features["features"]] + [x.transpose(0, 1) for x, _, _ in features["layer_results"]]


def validation_accuracy(task, cfg, model, criterion) -> dict:
    """{shard: accuracy} over the validation split, eval mode, negatives from a fixed seed."""
    model.eval()
    correct, count = {}, {}
    batches = task.get_batch_iterator(task.dataset("valid"), max_tokens=cfg.dataset.max_tokens,
                                      required_batch_size_multiple=1, seed=1).next_epoch_itr(shuffle=False)
    with torch.no_grad(), data_utils.numpy_seed(0):
        for batch in batches:
            for name, shard in batch["shards"].items():
                _, log = criterion.shard_loss(model, shard)
                correct[name] = correct.get(name, 0.0) + log["correct"]
                count[name] = count.get(name, 0.0) + log["count"]
    return {name: correct[name] / count[name] for name in count}


# --------------------------------------------------------------------------------------------
# 1. Causality and padding
# --------------------------------------------------------------------------------------------


def test_the_context_cannot_see_the_future(corpus):
    """Noise added to a clip from sample s on leaves z and every block's output of each frame whose
    receptive field ends at or before s bit-identical (eval mode), and changes every later frame at
    every block: the test can fail. A symmetric depthwise convolution, an unmasked attention or a
    norm pooling over time would change earlier frames."""
    cfg, task = setup(corpus, splits=())
    utils.set_torch_seed(1)
    model = task.build_model(cfg.model).eval()
    wave = clips_of(corpus, "read")[-1][None]
    frames = int(frame_counts(torch.tensor(wave.shape[1])))
    s = wave.shape[1] // 2
    perturbed = wave.clone()
    perturbed[:, s:] += 0.1 * torch.randn(wave.shape[1] - s, generator=torch.Generator().manual_seed(0))
    unseen = (s - RECEPTIVE_FIELD_SAMPLES) // FRAME_SHIFT_SAMPLES + 1  # frames t with 160 t + 465 <= s
    assert 10 < unseen < frames - 10
    for depth, (a, b) in enumerate(zip(contexts(model, wave), contexts(model, perturbed))):
        assert a.shape == b.shape == (1, frames, a.shape[-1])
        assert torch.equal(a[:, :unseen], b[:, :unseen]), f"depth {depth}: the past changed"
        changed = (a[0, unseen:] - b[0, unseen:]).abs().amax(-1)
        assert (changed > 0).all(), f"depth {depth}: later frames unchanged {changed}"


def test_a_clips_encoding_does_not_depend_on_the_padding_of_its_batch(corpus):
    """extract_features of a clip padded to the longest clip of its batch equals that of the clip
    alone, at z and every block; frame counts follow the convolution formula."""
    cfg, task = setup(corpus, splits=())
    utils.set_torch_seed(1)
    model = task.build_model(cfg.model).eval()
    waves = clips_of(corpus, "telephone")
    waves = [waves[0], waves[-1]]
    assert waves[1].numel() - waves[0].numel() > 4000  # a lot of padding for the short one
    source = torch.zeros(2, waves[1].numel())
    padding = torch.zeros(2, waves[1].numel(), dtype=torch.bool)
    for row, wave in enumerate(waves):
        source[row, : wave.numel()] = wave
        padding[row, wave.numel():] = True
    batched = contexts(model, source, padding)
    with torch.no_grad():
        mask = model.extract_features(source, padding)["padding_mask"]
    for row, wave in enumerate(waves):
        alone = contexts(model, wave[None])
        frames = alone[0].shape[1]
        assert frames == int(frame_counts(torch.tensor(wave.numel()))) == int((~mask[row]).sum())
        for depth, (a, b) in enumerate(zip(alone, batched)):
            torch.testing.assert_close(b[row, :frames], a[0], rtol=0, atol=1e-5, msg=f"clip {row}, depth {depth}")
    for samples in (465, 466, 624, 625, 626, 2385, 8000, 8001):
        with torch.no_grad():
            z = model.encoder(torch.zeros(1, samples))
        assert z.shape[1] == int(frame_counts(torch.tensor(samples))), samples


# --------------------------------------------------------------------------------------------
# 2. Chance and one fairseq update against a hand computation
# --------------------------------------------------------------------------------------------


def test_an_untrained_model_is_at_chance(corpus):
    """Before any update every shard's loss is within 0.05 bits of log2(13) and its accuracy within
    0.02 of 1/13 (the prediction heads start small), with about 12 x frames targets; a clip's loss
    and negatives are a function of numpy's seed."""
    cfg, task = setup(corpus)
    utils.set_torch_seed(1)
    model = task.build_model(cfg.model).eval()
    criterion = task.build_criterion(cfg.criterion)
    sample = first_batch(cfg, task)
    assert list(sample["shards"]) == SHARDS
    for name, shard in sample["shards"].items():
        with torch.no_grad(), data_utils.numpy_seed(3):
            loss, log = criterion.shard_loss(model, shard)
            output = model(**shard["net_input"])
        assert abs(loss.item() / math.log(2) - math.log2(13)) < 0.05, (name, loss.item() / math.log(2))
        assert abs(log["correct"] / log["count"] - CHANCE) < 0.02, (name, log)
        assert log["chance"] / log["count"] == pytest.approx(CHANCE)
        assert output["scores"].shape[1] == 13 and output["scores"].dtype == torch.float32
        source, padding = shard["net_input"]["source"], shard["net_input"].get("padding_mask")
        samples = torch.full((len(source),), source.shape[1])
        frames = frame_counts(samples - padding.sum(1) if padding is not None else samples)
        assert output["frames"] == int(frames.sum())
        targets = torch.stack([(frames - k).clamp(min=0).sum() for k in range(1, 13)])  # t and t + k valid
        assert torch.equal(torch.bincount(output["steps"], minlength=12), targets)
        assert log["z_std"] > 0.05
        absent = criterion.shard_stats(name, {})  # a shard absent from an update: the same keys, zeros
        assert absent.keys() == criterion.shard_stats(name, log).keys() and not any(absent.values())
        assert f"_step_count12_{name}" in absent and f"_step_count13_{name}" not in absent
        with torch.no_grad(), data_utils.numpy_seed(3):
            again = criterion.shard_loss(model, shard)[0]
        assert again.item() == loss.item()


def reference_update(cfg, task, trained_model, sample, inner_steps: int, inner_lr: float, lr: float) -> dict:
    """θ - β (1/M) Σ_i ∇g_i(φ_i^K) with g_i = F.cross_entropy(scores, 0) of the model's forward
    pass and hand-written SGD, seeded as the task seeds a batch (negatives from numpy)."""
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
                return info_nce(model(**batch["net_input"]))

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
    """Through fairseq's Trainer (SGD outer step, lr 0.05; inner lr 0.02), K=0 is the plain
    per-shard-averaged InfoNCE step and K=1 the first-order equilibrium step, both computed here
    with F.cross_entropy on the model's scores. Every parameter moves as computed, the encoder's
    first convolution included; the update's log has every shard's CPC keys."""
    cfg, task, model, trainer = build_trainer(corpus, "--optimizer", "sgd", "--lr", "0.05",
                                              "--inner-steps", inner_steps, "--inner-lr", "0.02")
    assert trainer.model is model
    with torch.no_grad():  # heads larger than at initialisation: larger gradients in the whole network
        for head in model.heads:
            head.weight.mul_(10)
    sample = first_batch(cfg, task)
    assert list(sample["shards"]) == SHARDS
    expected = reference_update(cfg, task, model, sample, inner_steps, inner_lr=0.02, lr=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = trainer.train_step([sample])
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    first = "encoder.convolutions.0.weight"
    assert (model.state_dict()[first] - before[first]).abs().max() > 1e-6  # the gradient reached it
    for shard in SHARDS:
        assert 0 <= log[f"accuracy_{shard}"] <= 1 and log[f"chance_{shard}"] == pytest.approx(CHANCE, abs=1e-4)
        assert log[f"z_std_{shard}"] > 0 and log[f"loss_before_{shard}"] > 0
        assert (log[f"gap_{shard}"] == 0) == (inner_steps == 0)
    assert all(0 <= log[f"k{k}_accuracy"] <= 1 for k in range(1, 13)) and "k13_accuracy" not in log


# --------------------------------------------------------------------------------------------
# 3. It learns
# --------------------------------------------------------------------------------------------

LEARNING_UPDATES = 100


def test_cssl_lifts_held_out_accuracy_clearly_above_chance(corpus):
    """100 CSSL updates (Adam, lr 1e-3) of fairseq's Trainer over the toy corpus's training clips
    take every shard's validation accuracy (clips never trained on, negatives from a fixed seed)
    from chance to above 2 x chance (measured: 0.25-0.28 at 100 updates, from 0.08-0.084; 0.15 at
    60). Deterministic: fixed seeds, one thread."""
    cfg, task, model, trainer = build_trainer(corpus, "--inner-steps", "0", "--lr", "1e-3")
    criterion = trainer.criterion
    start = validation_accuracy(task, cfg, model, criterion)
    assert sorted(start) == SHARDS and all(abs(a - CHANCE) < 0.02 for a in start.values()), start
    updates, epoch = 0, 0
    while updates < LEARNING_UPDATES:
        epoch += 1
        for sample in trainer.get_train_iterator(epoch).next_epoch_itr(shuffle=True):
            trainer.train_step([sample])
            updates += 1
            if updates == LEARNING_UPDATES:
                break
    end = validation_accuracy(task, cfg, model, criterion)
    assert all(a > 2 * CHANCE for a in end.values()), (start, end)


# --------------------------------------------------------------------------------------------
# 4. Bad input
# --------------------------------------------------------------------------------------------


def test_clips_and_crops_too_short_for_the_prediction_steps_are_one_clear_error(corpus):
    """min_input_samples is 465 + 160 K (K + 1 frames); a shorter clip in a batch stops the forward
    pass with a ValueError naming K + 1 frames, one shorter than the receptive field stops
    extract_features too; task.max_sample_size below it stops build_model naming both fields."""
    cfg, task = setup(corpus, splits=())
    model = task.build_model(cfg.model)
    assert model.min_input_samples() == 465 + 160 * 12 == 2385
    source = torch.randn(2, 3000)
    padding = torch.zeros(2, 3000, dtype=torch.bool)
    padding[1, 2384:] = True  # the second clip: 2384 samples, 12 frames
    with pytest.raises(ValueError, match=r"12 frames is shorter than model.prediction_steps \+ 1 = 13"):
        model(source, padding)
    padding[1, 2384:] = False
    padding[1, 2385:] = True
    assert len(model(source, padding)["scores"]) > 0  # 13 frames: one target per step
    with pytest.raises(ValueError, match="shorter than the encoder's receptive field"):
        model.extract_features(torch.randn(1, 464))

    cfg, task = setup(corpus, "--max-sample-size", 2000, splits=())
    with pytest.raises(ValueError, match=r"task.max_sample_size=2000 .* 2385 samples .* model.prediction_steps=12"):
        task.build_model(cfg.model)


def test_task_sample_rate_other_than_the_models_is_one_clear_error(corpus):
    cfg, task = setup(corpus, splits=())
    with open_dict(cfg):
        cfg.task.sample_rate = 8000
    task = tasks.setup_task(cfg.task)
    with pytest.raises(ValueError, match="task.sample_rate=8000 but model.sample_rate=16000"):
        task.build_model(cfg.model)


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory) -> dict:
    """{family: checkpoint} of tiny untrained BEST-RQ, wav2vec 2.0 and CPC (one block, 3 steps)
    models, saved in-process by fairseq's Trainer as fairseq-train saves them."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for family, flags, extra in (("bestrq", BESTRQ_FLAGS, ()), ("wav2vec2", TRAIN_FLAGS, ()),
                                 ("cpc", CPC_FLAGS, ("--encoder-layers", 1, "--prediction-steps", 3))):
        cfg, task = setup(corpus, *extra, flags=flags, splits=())
        trainer = Trainer(cfg, task, task.build_model(cfg.model), task.build_criterion(cfg.criterion))
        paths[family] = folder / f"{family}.pt"
        trainer.consolidate_optimizer()  # as fairseq-train does before it saves
        trainer.save_checkpoint(str(paths[family]), {})
    return paths


@pytest.mark.parametrize("family, name", [("bestrq", "eq_bestrq_tiny"), ("wav2vec2", "eq_wav2vec2_tiny")])
def test_another_familys_checkpoint_as_init_from_is_one_error_naming_it(corpus, checkpoints, family, name):
    cfg, task = setup(corpus, "--init-from", checkpoints[family], splits=())
    with pytest.raises(CheckpointError) as error:
        task.build_model(cfg.model)
    assert str(error.value) == (f"model.init_from={checkpoints[family]}: holds a {name!r} model, "
                                f"not a CPC (eq_cpc) pre-training model")


def test_a_cpc_checkpoint_as_init_from_gives_its_shape_and_weights(corpus, checkpoints):
    """The recipe's 2 blocks and 12 steps give way to the checkpoint's 1 block and 3 heads, written
    back into the run's config; every weight is the checkpoint's. Another model.sample_rate than
    the checkpoint's is a CheckpointError naming the field."""
    cfg, task = setup(corpus, "--init-from", checkpoints["cpc"], "--num-negatives", 5, splits=())
    model = task.build_model(cfg.model)
    assert len(model.blocks) == 1 and len(model.heads) == 3
    assert cfg.model.encoder_layers == 1 and cfg.model.prediction_steps == 3 and cfg.model.num_negatives == 5
    saved = torch.load(checkpoints["cpc"], map_location="cpu", weights_only=False)["model"]
    assert set(saved) == set(model.state_dict())
    assert all(torch.equal(saved[key], value) for key, value in model.state_dict().items())
    with open_dict(cfg):
        cfg.task.sample_rate = cfg.model.sample_rate = 8000
    with pytest.raises(CheckpointError, match=r"model.sample_rate=8000 but model.init_from=.* sample_rate=16000"):
        tasks.setup_task(cfg.task).build_model(cfg.model)


# --------------------------------------------------------------------------------------------
# 5. Mixed precision
# --------------------------------------------------------------------------------------------

INNER_LR = 0.02
PRECISIONS = {
    # fairseq's FP16Optimizer keeps one fp32 master per parameter on CPU (no flattening).
    "fp16": ({"fp16": True, "fp16_no_flatten_grads": True, "fp16_init_scale": 1024}, torch.float16),
    "bf16": ({"bf16": True}, torch.bfloat16),
}


def one_update(corpus, precision: dict, rounding: torch.dtype) -> tuple:
    """One K=1 update (α = INNER_LR) through fairseq's Trainer with the ``common.*`` settings
    ``precision``, from weights representable in ``rounding`` (heads x 10, as in the hand
    computation): (the fp32 gradient the optimizer stepped with, the update's log, the trainer's
    model, the negatives' frame indices of every forward pass of the update)."""
    cfg, task = setup(corpus, "--inner-steps", 1, "--inner-lr", INNER_LR)
    with open_dict(cfg):
        cfg.common.update(precision)
    utils.set_torch_seed(cfg.common.seed)
    model = task.build_model(cfg.model)
    with torch.no_grad():
        for head in model.heads:
            head.weight.mul_(10)
        for p in model.parameters():
            p.copy_(p.to(rounding).float())
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    drawn, draw = [], trainer.model._negative_indices
    trainer.model._negative_indices = lambda *args: drawn.append(draw(*args)) or drawn[-1]
    log = trainer.train_step([first_batch(cfg, task)])
    optimizer = trainer.optimizer
    if hasattr(optimizer, "fp32_params"):
        masters = optimizer.fp32_params
        masters = list(masters.values()) if isinstance(masters, dict) else masters
        grads = [m.grad.flatten() for m in masters]
    else:
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                 for p in trainer.model.parameters() if p.requires_grad]
    return torch.cat(grads).float(), log, trainer.model, drawn


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_reduced_precision_outer_step_equals_fp32_with_the_same_negatives(corpus, precision):
    """The gradient the optimizer steps with (K=1) in fp16 / bf16 against fp32 from the same
    weights: cosine above 0.999 / 0.995 and within 5 % / 10 % (measured: 0.9998 and 2.4 %, 0.998
    and 5.8 %, nearly all of it in the frame encoder's first layers: raw, quiet audio enters them
    in 16 bits, as wav2vec 2.0's under fp16), per-shard losses within 1 % / 2 %: the fp16 loss
    scale does not leak into α. The network runs in the
    reduced type, the scores reach the loss in float32, and every forward pass of the update drew
    exactly fp32's negatives (numpy, seeded per batch)."""
    settings, rounding = PRECISIONS[precision]
    reference, reference_log, _, reference_drawn = one_update(corpus, {}, rounding)
    reduced, reduced_log, reduced_model, reduced_drawn = one_update(corpus, settings, rounding)
    cosine = F.cosine_similarity(reduced, reference, dim=0).item()
    error = ((reduced - reference).norm() / reference.norm()).item()
    if rounding == torch.float16:
        assert cosine > 0.999 and error < 0.05, (cosine, error)
    else:
        assert cosine > 0.995 and error < 0.1, (cosine, error)
    for key in ("loss_before_read", "loss_after_read", "loss_before_telephone", "loss_after_noisy"):
        assert reduced_log[key] == pytest.approx(reference_log[key], rel=1e-2 if rounding == torch.float16 else 2e-2)
    assert reduced_model.context_convolution.weight.dtype == rounding
    assert len(reduced_drawn) == len(reference_drawn) == 2 * len(SHARDS)  # K=1: two passes per shard
    for a, b in zip(reduced_drawn, reference_drawn):
        assert torch.equal(a, b)
    with torch.no_grad(), data_utils.numpy_seed(0):
        source = first_batch(*setup(corpus))["shards"]["read"]["net_input"]["source"].to(rounding)
        assert reduced_model(source)["scores"].dtype == torch.float32


# --------------------------------------------------------------------------------------------
# 6. Through the entry points: fairseq-train and fairseq-hydra-train train CPC and log its keys
# --------------------------------------------------------------------------------------------


def cpc_train(data, save_dir, *extra) -> subprocess.CompletedProcess:
    return run(["fairseq-train", data, *CPC_FLAGS, "--save-dir", save_dir, *extra])


def start_cpc_train(data, save_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "fairseq-train"), str(data), *CPC_FLAGS, "--save-dir", str(save_dir), *map(str, extra)],
        cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def load_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_logs_cpc_keys(stats: dict, gap: bool) -> None:
    """A training or validation log line has every shard's CPC keys and the per-step accuracies."""
    for shard in SHARDS:
        for key in ("loss_before", "loss_after", "gap", "accuracy", "chance", "z_std"):
            assert f"{key}_{shard}" in stats, (key, shard, sorted(stats))
        assert 0 <= stats[f"accuracy_{shard}"] <= 1
        assert stats[f"chance_{shard}"] == pytest.approx(CHANCE, abs=1e-4)
    assert all(0 <= stats[f"k{k}_accuracy"] <= 1 for k in range(1, 13)) and "k13_accuracy" not in stats
    if gap:
        assert any(stats[f"gap_{shard}"] != 0 for shard in SHARDS), stats


# One uninterrupted K=1 fairseq-train run serves the distributed test (its first update) and the
# resume test (its end): SGD with momentum (a step proportional to the gradient, which 2 workers
# must match to float tolerance, where Adam's first step g/|g| magnifies float noise; and optimizer
# state that a resume must restore), a learning rate decaying per update, update_freq 2, a
# checkpoint after every update (all kept).
RUN = ["--inner-steps", "1", "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05",
       "--lr-scheduler", "polynomial_decay", "--total-num-update", "20", "--disable-validation",
       "--save-interval-updates", "1"]
UPDATES = 6


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> tuple:
    """(output, save folder) of the uninterrupted run: RUN, update_freq 2, UPDATES updates."""
    save_dir = tmp_path_factory.mktemp("cpc_straight")
    result = cpc_train(corpus, save_dir, *RUN, "--update-freq", 2, "--max-update", UPDATES)
    assert result.returncode == 0, result.stdout[-3000:]
    return result, save_dir


def test_fairseq_train_trains_cpc_and_logs_its_keys(straight):
    """fairseq-train --task equilibrium_pretraining --criterion equilibrium_cpc --arch eq_cpc_tiny
    trains (K=1) and logs, every update, each shard's loss before and after the inner step, its
    gap (not 0: the inner step moves the weights), accuracy, chance and z_std, and the accuracy
    of every step k = 1 … 12."""
    result, save_dir = straight
    lines = trainings_of(result.stdout)
    assert [int(line["num_updates"]) for line in lines] == list(range(1, UPDATES + 1))
    for line in lines:
        assert_logs_cpc_keys(line, gap=True)
    assert load_state(save_dir / "checkpoint_last.pt")["cfg"]["model"]["_name"] == "eq_cpc_tiny"


def trainings_of(output: str) -> list:
    from eqssl.experiment.fairseq_log import trainings

    return list(trainings(output.splitlines()))


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory) -> tuple:
    """A tiny CPC CSSL checkpoint trained 10 updates by fairseq-hydra-train with the recipe
    cssl_cpc_tiny (validating at each epoch's end and at 10 updates, with the gap measured
    there); (checkpoint, output)."""
    folder = tmp_path_factory.mktemp("cpc_recipe")
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes", "--config-name", "pretrain/cssl_cpc_tiny",
                  f"task.data={corpus}", "checkpoint.save_dir=ck", "optimization.max_update=10",
                  "dataset.validate_interval_updates=10", "task.validation_gap_steps=1", "common.log_interval=5"],
                 cwd=folder)
    assert result.returncode == 0, result.stdout[-3000:]
    return folder / "ck" / "checkpoint_last.pt", result.stdout


def test_the_cssl_recipe_trains_cpc_and_logs_its_keys(pretrained):
    """fairseq-hydra-train with recipes/pretrain/cssl_cpc_tiny trains eq_cpc with equilibrium_cpc
    and logs the CPC keys in its training lines (every 5 updates) and its validations (where the
    gap is measured: task.validation_gap_steps=1)."""
    from eqssl.experiment.fairseq_log import validations

    checkpoint, output = pretrained
    lines = trainings_of(output)
    assert [int(line["num_updates"]) for line in lines] == [5, 10]
    for line in lines:
        assert_logs_cpc_keys(line, gap=False)  # CSSL: no inner step
    found = validations(output.splitlines())  # at each epoch's end (4 updates) and at 10
    assert int(found[-1]["num_updates"]) == 10
    for validation in found:
        assert_logs_cpc_keys(validation, gap=True)
    state = load_state(checkpoint)
    assert state["cfg"]["model"]["_name"] == "eq_cpc" and state["cfg"]["criterion"]["_name"] == "equilibrium_cpc"
    assert state["cfg"]["task"]["max_sample_size"] == 41265


# --------------------------------------------------------------------------------------------
# 7. Distributed and faults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["legacy_ddp", "c10d"])
def test_two_workers_equal_one_process_with_update_freq_2(corpus, straight, tmp_path, backend):
    """Worker r takes batches r, r+2, …, so one update of 2 gloo workers sees the batches of one
    process with update_freq 2 (the uninterrupted run's first update): the same logged per-shard
    and per-step statistics and parameters to float tolerance (negatives are drawn per batch from
    the task's seed, not per process), and each worker all-reduces the gradient once."""
    comm_log = tmp_path / "comm.jsonl"
    workers = fairseq_train_workers(corpus, tmp_path / "workers", 2, *RUN, "--max-update", 1, "--ddp-backend",
                                    backend, timeout=300, comm_log=comm_log, flags=CPC_FLAGS)
    for rank, result in enumerate(workers):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
    single, single_dir = straight
    for key in ("loss_before_read", "loss_after_read", "gap_noisy", "accuracy_telephone", "k1_accuracy",
                "k12_accuracy", "gnorm"):
        expected = train_log_values(single.stdout, key)[0]
        assert train_log_values(workers[0].stdout, key) == [pytest.approx(expected, rel=1e-3, abs=1e-3)], key
    a = load_state(tmp_path / "workers" / "checkpoint_last.pt")
    (first,) = single_dir.glob("checkpoint_*_1.pt")
    b = load_state(first)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 1
    assert set(a["model"]) == set(b["model"])
    for name in b["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-6, msg=name)
    gradient_bytes = 4 * sum(t.numel() for t in b["model"].values())
    for rank in range(2):
        assert [r["grad_bytes"] for r in comm_records(comm_log, rank)] == [gradient_bytes]


def test_sigkill_then_resume_equals_an_uninterrupted_run(corpus, straight, tmp_path):
    """The run killed with SIGKILL right after update 3 was logged (so while it saves or runs
    update 4) and started again resumes from checkpoint_last and ends with the parameters and
    update count, bit for bit, and the losses of the uninterrupted run: negatives are drawn from
    the per-batch seeds, not from where the process started, and the momentum and learning rate
    resume with it."""
    single, single_dir = straight
    save_dir = tmp_path / "killed"
    process = start_cpc_train(corpus, save_dir, *RUN, "--update-freq", 2, "--max-update", UPDATES)
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
    resumed = cpc_train(corpus, save_dir, *RUN, "--update-freq", 2, "--max-update", UPDATES)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Loaded checkpoint" in resumed.stdout
    done = train_log_values(resumed.stdout, "num_updates")
    assert done and done[0] > 1 and done[-1] == UPDATES  # resumed, not restarted
    for key in ("loss", "accuracy_read", "k1_accuracy"):
        assert train_log_values(resumed.stdout, key) == train_log_values(single.stdout, key)[-len(done):], key
    a, b = load_state(save_dir / "checkpoint_last.pt"), load_state(single_dir / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == UPDATES
    assert set(a["model"]) == set(b["model"])
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


# --------------------------------------------------------------------------------------------
# 8. Bad input through fairseq-train
# --------------------------------------------------------------------------------------------

# Runs several fairseq-train command lines through fairseq-train's own entry point
# (fairseq_cli.train.cli_main, what the console script calls) in one process, each with its own
# sys.argv and captured output (fairseq's log handler included) and the exit status the process
# would have had: every one of them stops before training, so each process would spend nearly
# all of its time importing torch and fairseq. RESULTS.json: {name: {returncode, stdout}}.
TRAIN_JOBS = r"""
import contextlib, io, json, logging, sys, traceback
from fairseq_cli import train  # sets up fairseq's logging, as the console script does
jobs, out = json.load(open(sys.argv[1])), sys.argv[2]
results = {}
for name, argv in jobs.items():
    buffer = io.StringIO()
    for handler in logging.root.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(buffer)
    sys.argv = ["fairseq-train", *argv]
    code = 0
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            train.cli_main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = {"returncode": code, "stdout": buffer.getvalue()}
json.dump(results, open(out, "w"))
"""


@pytest.fixture(scope="module")
def bad_runs(corpus, checkpoints, tmp_path_factory) -> dict:
    """{case: (result, save folder, fragments the error's line must name)} of fairseq-train on bad
    input, all run by TRAIN_JOBS in one process."""
    folder = tmp_path_factory.mktemp("cpc_bad")
    copy = folder / "toy"  # as conftest's corpus_copy: a corpus this module may damage
    subprocess.run(["cp", "-r", str(corpus), str(copy)], check=True)
    for manifest in copy.glob("*/*.tsv"):
        lines = manifest.read_text().splitlines()
        lines[0] = str(copy / manifest.parent.name / "audio")
        manifest.write_text("\n".join(lines) + "\n")
    clip = rewrite_clip(copy, "read", "train", 2, tone(12000), sample_rate=8000)
    cases = {
        # fairseq-train's one --sample-rate sets task.sample_rate and model.sample_rate alike (the
        # two fields apart: test_task_sample_rate_other_than_the_models_is_one_clear_error)
        "task sample rate": (corpus, CPC_FLAGS, ["--sample-rate", 8000],
                             ["DataError", "is sampled at 16000 Hz but task.sample_rate is 8000 Hz"]),
        "clip sample rate": (copy, CPC_FLAGS, [],
                             [f"{copy / 'read' / 'train.tsv'}:2", str(clip), "8000 Hz", "task.sample_rate"]),
        "crop too short": (corpus, CPC_FLAGS, ["--max-sample-size", 2000],
                           ["ValueError", "task.max_sample_size=2000", "2385 samples",
                            "model.prediction_steps=12", "prediction_steps + 1 frames"]),
        "BEST-RQ checkpoint as init_from": (
            corpus, CPC_FLAGS, ["--init-from", checkpoints["bestrq"]],
            ["CheckpointError", f"model.init_from={checkpoints['bestrq']}", "'eq_bestrq_tiny'",
             "not a CPC (eq_cpc) pre-training model"]),
        # and the other way round: the other families refuse a CPC checkpoint by name
        "CPC checkpoint as BEST-RQ's init_from": (
            corpus, BESTRQ_FLAGS, ["--init-from", checkpoints["cpc"]],
            ["CheckpointError", f"model.init_from={checkpoints['cpc']}", "'eq_cpc_tiny'",
             "not a BEST-RQ (eq_bestrq) pre-training model"]),
        "CPC checkpoint as wav2vec 2.0's init_from": (
            corpus, TRAIN_FLAGS, ["--init-from", checkpoints["cpc"]],
            ["CheckpointError", f"model.init_from={checkpoints['cpc']}", "'eq_cpc_tiny'",
             "not a wav2vec 2.0 (wav2vec2 / eq_wav2vec2) pre-training model"]),
    }
    jobs, found = {}, {}
    for number, (name, (data, flags, extra, fragments)) in enumerate(cases.items()):
        save_dir = folder / f"run{number}"
        jobs[name] = [str(data), *flags, "--save-dir", str(save_dir), "--max-update", "2", *map(str, extra)]
        found[name] = (save_dir, fragments)
    (folder / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-c", TRAIN_JOBS, str(folder / "jobs.json"), str(folder / "results.json")],
                          cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    results = json.loads((folder / "results.json").read_text())
    return {name: (subprocess.CompletedProcess(jobs[name], r["returncode"], r["stdout"]), *found[name])
            for name, r in results.items()}


@pytest.mark.parametrize("case", ["task sample rate", "clip sample rate", "crop too short",
                                  "BEST-RQ checkpoint as init_from", "CPC checkpoint as BEST-RQ's init_from",
                                  "CPC checkpoint as wav2vec 2.0's init_from"])
def test_bad_input_stops_fairseq_train_before_training_with_one_error_naming_it(bad_runs, case):
    """fairseq-train on bad input exits non-zero before any update and without a checkpoint, its
    last line one error naming what is wrong: --sample-rate 8000 on a 16 kHz corpus (the first
    clip, both rates, the field); an 8 kHz clip in the manifest (the line, the file, both rates); a crop
    (task.max_sample_size) below the 13 frames that 12 prediction steps need (both fields); a
    BEST-RQ checkpoint as eq_cpc's init_from, and a CPC checkpoint as BEST-RQ's or wav2vec 2.0's
    (the file, its model, the family expected)."""
    result, save_dir, fragments = bad_runs[case]
    assert_stopped_before_training(result, save_dir, *fragments)


# --------------------------------------------------------------------------------------------
# 9. Fine-tuning, evaluation, export
# --------------------------------------------------------------------------------------------

FINETUNE_UPDATES = 20


@pytest.fixture(scope="module")
def finetuned(multilingual_corpus, pretrained, tmp_path_factory) -> tuple:
    """The recipe-trained CPC checkpoint fine-tuned with CTC (recipe ctc_cpc_tiny, train_1h) for
    FINETUNE_UPDATES updates on the Swedish set of the built-in corpus, validated at the end;
    (checkpoint, labelled folder, log)."""
    data = multilingual_corpus / "finetune" / "sv"
    save = tmp_path_factory.mktemp("cpc_ctc")
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/finetune", "--config-name", "ctc_cpc_tiny",
                  f"task.data={data}", f"model.w2v_path={pretrained[0]}", f"checkpoint.save_dir={save}",
                  f"optimization.max_update={FINETUNE_UPDATES}",
                  f"dataset.validate_interval_updates={FINETUNE_UPDATES}",
                  f"checkpoint.save_interval_updates={FINETUNE_UPDATES}", "model.freeze_finetune_updates=0"])
    assert result.returncode == 0, result.stdout[-3000:]
    return save / "checkpoint_last.pt", data, result.stdout


def test_cpc_checkpoint_fine_tunes_with_ctc_and_is_evaluated(finetuned, capsys):
    """fairseq's wav2vec_ctc takes the CPC checkpoint as its encoder without masking: it trains
    on train_1h, validates (UER in the log), saves a wav2vec_ctc checkpoint around eq_cpc
    without the prediction heads, and eqssl-evaluate scores it: exit 0 and a WER/CER row
    counting every reference word. A pre-training checkpoint given to eqssl-evaluate is refused
    with the CPC fine-tuning recipe named."""
    from eqssl.cli.evaluate import main as evaluate

    checkpoint, data, log = finetuned
    assert "train_1h" in log and "valid on 'dev' subset" in log and "| uer " in log
    state = load_state(checkpoint)
    assert state["cfg"]["model"]["_name"] == "wav2vec_ctc" and state["cfg"]["model"]["apply_mask"] is False
    assert state["cfg"]["model"]["w2v_args"]["model"]["_name"] == "eq_cpc"
    assert state["optimizer_history"][-1]["num_updates"] == FINETUNE_UPDATES
    assert "w2v_encoder.proj.weight" in state["model"]
    assert "w2v_encoder.w2v_model.blocks.1.final_norm.weight" in state["model"]
    assert not any(k.startswith("w2v_encoder.w2v_model.heads.") for k in state["model"])
    assert evaluate([str(checkpoint), f"sv={data}:test", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "| set | WER (%) | CER (%) | S/D/I | words |" in out
    row = next(line for line in out.splitlines() if line.startswith("| sv |"))
    words = sum(len(line.split()) for line in (data / "test.wrd").read_text(encoding="utf-8").splitlines())
    assert row.split("|")[-2].strip() == str(words)


def test_a_pretraining_checkpoint_given_to_evaluate_names_the_cpc_recipe(pretrained):
    from eqssl.measures.evaluation import EvaluationError, load_checkpoint

    with pytest.raises(EvaluationError, match=r"model 'eq_cpc'.*recipes/finetune/ctc_cpc_tiny.yaml"):
        load_checkpoint(str(pretrained[0]))


# Runs in a fresh interpreter where `import eqssl` and `import fairseq` fail: rebuilds both exports
# with examples/cpc_standalone.py (imported by path) and runs them on the clips in CLIPS.
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
spec = importlib.util.spec_from_file_location("cpc_standalone", example)
standalone = importlib.util.module_from_spec(spec)
spec.loader.exec_module(standalone)
torch.set_num_threads(1)
waves = torch.load(clips, weights_only=True)
encode, exported = standalone.load(pretraining)
assert exported["kind"] == "pretraining"
encoded = [encode(w) for w in waves]
steps = standalone.accuracy_per_step(exported["model"], waves[0])
encode, exported = standalone.load(finetuned)
assert exported["kind"] == "finetuned"
logits = [encode(w) for w in waves]
transcripts = [standalone.greedy_transcript(l, exported["vocabulary"]) for l in logits]
torch.save({"encoded": encoded, "logits": logits, "transcripts": transcripts, "steps": steps}, out)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("eqssl", "fairseq", "torchaudio")
                and sys.modules[m] is not None)
print("RESULT " + json.dumps({"loaded": loaded}))
"""


def test_exports_run_without_eqssl_and_fairseq_with_the_same_outputs(pretrained, finetuned, tmp_path, capsys):
    """eqssl-export writes the pre-training and the fine-tuned checkpoint as plain PyTorch;
    examples/cpc_standalone.py rebuilds both with torch alone in an interpreter where eqssl and
    fairseq cannot be imported. On every test clip the pre-training export's output equals the
    checkpoint's extract_features(...)["x"], the fine-tuned export's logits equal the emissions
    eqssl-evaluate decodes, and its greedy transcripts equal eqssl-evaluate's (clips batched with
    padding). The fine-tuned copy exported has its CTC blank's bias lowered, so that greedy
    decoding emits letters (not <pad> or </s>, which it drops, nor only word marks): 20 updates
    leave a CTC model emitting blanks only. --format hf refuses
    CPC by name."""
    from eqssl.measures.evaluation import decode_set, load_checkpoint, load_test_set
    from eqssl.cli.export import main as export

    ft_checkpoint, data, _ = finetuned
    state = load_state(ft_checkpoint)
    silent = [state["task_state"]["target_dictionary"].index(s) for s in ("<s>", "<pad>", "</s>", "|")]
    state["model"]["w2v_encoder.proj.bias"][silent] -= 100.0  # the blank, what decoding drops, the word mark
    emitting = tmp_path / "emitting.pt"
    torch.save(state, emitting)
    outputs = {}
    for name, checkpoint in (("pretraining", pretrained[0]), ("finetuned", emitting)):
        outputs[name] = tmp_path / f"{name}.cpc.pt"
        assert export([str(checkpoint), str(outputs[name])]) == 0
        assert f"wrote {outputs[name]} (CPC {name} export, plain PyTorch (eqssl-cpc/1))" in capsys.readouterr().out
        exported = torch.load(outputs[name], weights_only=True)  # tensors, numbers and strings only
        assert exported["format"] == "eqssl-cpc/1" and exported["kind"] == name
        assert exported["config"]["prediction_steps"] == 12 and exported["config"]["normalize"] is False
    assert sorted(torch.load(outputs["pretraining"], weights_only=True)["heads"]) == \
        sorted(f"{k}.weight" for k in range(12))
    assert export([str(pretrained[0]), str(tmp_path / "hf"), "--format", "hf"]) == 1
    assert "a CPC (eq_cpc) checkpoint; transformers has no CPC model" in capsys.readouterr().err

    model, task = load_checkpoint(str(emitting))
    test_set = load_test_set("sv", str(data), "test", task.target_dictionary)
    assert len(test_set.audio) >= 4 and len(set(test_set.sizes)) > 1
    waves = [read_clip(path) for path in test_set.audio]
    clips = tmp_path / "clips.pt"
    torch.save(waves, clips)
    result_file = tmp_path / "standalone.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", STANDALONE_SCRIPT, str(REPO / "examples" / "cpc_standalone.py"),
         str(outputs["pretraining"]), str(outputs["finetuned"]), str(clips), str(result_file)],
        cwd="/", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert json.loads(line[len("RESULT "):])["loaded"] == []  # torch alone, not even torchaudio
    standalone = torch.load(result_file, weights_only=True)
    assert len(standalone["steps"]) == 12 and all(0 <= a <= 1 for a in standalone["steps"])

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(pretrained[0])])
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
    assert all(h.strip() for h in hypotheses), hypotheses  # the comparison is not of empty strings


def test_standalone_greedy_transcript_decodes_as_eqssl_evaluate(multilingual_corpus):
    """examples/cpc_standalone.py's greedy_transcript gives eqssl-evaluate's greedy decoding on
    any emissions, frames whose best symbol is one of fairseq's specials (<pad>, </s>) included."""
    from fairseq.data import Dictionary

    from eqssl.measures.evaluation import greedy_decode

    dictionary = Dictionary.load(str(multilingual_corpus / "finetune" / "sv" / "dict.ltr.txt"))
    vocabulary = [dictionary[i] for i in range(len(dictionary))]
    spec = importlib.util.spec_from_file_location("cpc_standalone", REPO / "examples" / "cpc_standalone.py")
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)
    generator = torch.Generator().manual_seed(0)
    specials_seen = 0
    for _ in range(20):
        logits = torch.randn(60, len(vocabulary), generator=generator)
        best = logits.argmax(-1)
        specials_seen += int(((best == dictionary.pad()) | (best == dictionary.eos())).sum())
        assert standalone.greedy_transcript(logits, vocabulary) == greedy_decode(logits, dictionary, progress=False)[0]
    assert specials_seen > 0


# --------------------------------------------------------------------------------------------
# 10. The tools: eqssl-gap, eqssl-probe, the no-pre-training control, eqssl-reproduce
# --------------------------------------------------------------------------------------------


def test_gap_probe_and_control_take_a_cpc_checkpoint(pretrained, corpus, multilingual_corpus, tmp_path, capsys):
    """eqssl-gap measures every shard's gap with the CPC loss (one SGD step on a batch lowers its
    own loss); eqssl-probe trains on the causal Conformer's blocks and leaves the checkpoint
    bit-identical; the no-pre-training control is an eq_cpc network of the same shape with fresh
    weights, which the gap and the probe take too."""
    from eqssl.checkpoints import file_sha256
    from eqssl.cli.gap import main as gap
    from eqssl.cli.probe import main as probe
    from eqssl.models.eq_wav2vec2 import build_from_checkpoint_config, load_pretraining_checkpoint, save_random_init

    checkpoint = str(pretrained[0])
    control = save_random_init(checkpoint, str(tmp_path / "random_init.pt"), seed=5)
    gap([str(corpus), f"cssl={checkpoint}", f"none={control}", "--inner-steps", "1", "--inner-lr", "0.05",
         "--batches", "2", "--json", str(tmp_path / "gap.json")])
    assert "| cssl |" in capsys.readouterr().out
    results = json.loads((tmp_path / "gap.json").read_text())["results"]
    for name in ("cssl", "none"):
        for shard in SHARDS:
            found = results[name][shard]
            assert 1 <= found["batches"] <= 2 and found["loss_before"] > 0
            assert found["gap"] > 0, results  # one SGD step on the batch lowers its own loss
    for shard in SHARDS:  # the untrained control is at chance
        assert results["none"][shard]["loss_before"] == pytest.approx(math.log2(13), abs=0.05)

    before = file_sha256(checkpoint)
    weights = {k: v.clone() for k, v in load_pretraining_checkpoint(checkpoint)["model"].items()}
    assert probe([checkpoint, str(multilingual_corpus / "finetune" / "sv"), "--updates", "10", "--batch-size", "4",
                  "--seed", "3", "--cache", str(tmp_path / "cache"), "--json", str(tmp_path / "probe.json")]) == 0
    probed = json.loads((tmp_path / "probe.json").read_text())
    assert 0 < probed["cer"] and len(probed["layer_weights"]) == 2  # the tiny model's two blocks
    assert file_sha256(checkpoint) == before
    after = load_pretraining_checkpoint(checkpoint)["model"]
    assert all(torch.equal(weights[k], after[k]) for k in weights)

    state = load_pretraining_checkpoint(control)
    assert state["cfg"]["model"]["_name"] == "eq_cpc"
    fresh = state["model"]
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in weights.items()}
    assert not torch.equal(fresh["encoder.convolutions.0.weight"], weights["encoder.convolutions.0.weight"])
    assert type(build_from_checkpoint_config(state)).__name__ == "EqCpcModel"


def test_reproduce_plans_and_composes_the_cpc_family(tmp_path, capsys):
    """eqssl-reproduce --model cpc runs wav2vec 2.0's plan with the CPC recipes (eq_cpc, its
    criterion, ctc_cpc_* fine-tuning) and none of wav2vec 2.0's overrides (Gumbel temperature):
    --plan prints it with the multilingual proportions (β = 0.1 x the CSSL lr, α/β = 10), and
    CSSL.1 and PTLOC.1 of the tiny, small and full settings compose in fairseq-hydra-train with the
    overrides it gives them (--cfg job runs nothing; one process for all), as does the fine-tuning."""
    from eqssl.cli.reproduce import build_parser, main as reproduce
    from eqssl.experiment.plan import load_settings, plan_pretraining
    from eqssl.experiment.stages import finetune_command, pretrain_command

    assert "or cpc (eq_cpc, the paper's multilingual model)" in " ".join(build_parser().format_help().split())
    assert reproduce(["--model", "cpc", "--preset", "multilingual", "--size", "small", "--plan",
                      "--out", str(tmp_path / "plan")]) == 0
    table = capsys.readouterr().out
    assert "| cssl.1 | 1 | scratch | cssl_cpc_tiny | 600 | 0.001 |" in table
    assert "| ptloc.1.r10 | 1 | cssl.1 | ptloc_cpc_tiny | 480 | 0.0001 | 0.001 |" in table
    assert not (tmp_path / "plan").exists()
    jobs, expected = {}, {}
    for size, model in (("tiny", "tiny"), ("small", "tiny"), ("full", "base")):
        settings = load_settings(size, "cpc")
        assert settings["finetune"]["recipe"].startswith("ctc_cpc_")
        plan = plan_pretraining("multilingual", settings)
        names = [r.name for r in plan_pretraining("multilingual", load_settings(size))]
        if size == "small":  # families.cpc's leaner round 1: two ratios
            names = [n for n in names if n not in ("ptloc.1.r30", "ptloc.1.r300")]
        assert [r.name for r in plan] == names
        for run_ in (plan[0], next(r for r in plan if r.name == "ptloc.1.r10")):
            assert run_.recipe in (f"cssl_cpc_{model}", f"ptloc_cpc_{model}")
            assert not any("latent_temp" in o for o in run_.overrides)
            init = None if run_.init_from is None else "/init.pt"
            jobs[f"{size} {run_.name}"] = [*pretrain_command(run_, "/data", "/save", 1, init), "--cfg", "job"]
            expected[f"{size} {run_.name}"] = ["_name: eq_cpc", "_name: equilibrium_cpc", "max_sample_size: 41265"]
        finetune = settings["finetune"]
        jobs[f"{size} finetune"] = [*finetune_command(finetune["recipe"], "/data", "/pretrained.pt", "/save",
                                                      finetune.get("overrides", [])), "--cfg", "job"]
        expected[f"{size} finetune"] = ["_name: wav2vec_ctc", "apply_mask: false"]
    for name, result in compose_jobs(jobs, tmp_path).items():
        assert result.returncode == 0, (name, result.stdout[-3000:])
        for line in expected[name]:
            assert line in result.stdout, (name, line, result.stdout[-3000:])
