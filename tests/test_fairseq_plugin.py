"""eqssl inside fairseq: both command lines, the update against an independent computation,
resuming, and starting from a stock fairseq wav2vec 2.0 checkpoint."""

import json
import re

import numpy as np
import pytest
import torch
from fairseq import options, tasks, utils
from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion
from fairseq.data import data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer

from eqssl.tasks.equilibrium_pretraining import batch_seed

from conftest import REPO, TRAIN_FLAGS, fairseq_train, run, train_log_values

SHARDS = ["noisy", "read", "telephone"]


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_per_shard_logs(output: str, inner_steps: int) -> None:
    for shard in SHARDS:
        before = train_log_values(output, f"loss_before_{shard}")
        after = train_log_values(output, f"loss_after_{shard}")
        assert before and len(before) == len(after), f"no per-shard losses for {shard} in:\n{output[-3000:]}"
        if inner_steps == 0:
            assert before == after  # no adaptation: the same loss, same masks
        else:
            assert before != after


@pytest.fixture(scope="module")
def hydra_cssl(corpus, tmp_path_factory):
    save = tmp_path_factory.mktemp("hydra") / "cssl"
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/pretrain", "--config-name",
                  "cssl_tiny", f"task.data={corpus}", f"checkpoint.save_dir={save}",
                  "optimization.max_update=6", "common.log_interval=1"])
    assert result.returncode == 0, result.stdout[-3000:]
    return save, result.stdout


def test_fairseq_train_ptloc_logs_every_shard_before_and_after(corpus, tmp_path):
    """fairseq-train --user-dir eqssl runs PTLOC (K=1) on 3 shards and logs each shard's losses."""
    result = fairseq_train(corpus, tmp_path / "run", "--inner-steps", "1", "--max-update", "4")
    assert result.returncode == 0, result.stdout[-3000:]
    assert_per_shard_logs(result.stdout, inner_steps=1)
    assert "effective batch per update: 3 shards" in result.stdout
    assert "inner steps K=1, inner lr alpha=0.001" in result.stdout
    assert re.search(r"valid on 'valid' subset \| loss [\d.]+ .*loss_before_telephone", result.stdout)
    assert (tmp_path / "run" / "checkpoint_last.pt").exists()


def test_fairseq_hydra_train_cssl_then_ptloc_from_it(corpus, hydra_cssl, tmp_path):
    """The hydra recipes: CSSL (K=0) then PTLOC initialised from CSSL's checkpoint."""
    cssl_dir, cssl_output = hydra_cssl
    assert_per_shard_logs(cssl_output, inner_steps=0)
    ptloc = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/pretrain", "--config-name",
                 "ptloc_tiny", f"task.data={corpus}", f"checkpoint.save_dir={tmp_path / 'ptloc'}",
                 f"model.init_from={cssl_dir / 'checkpoint_best.pt'}", "optimization.max_update=4",
                 "common.log_interval=1"])
    assert ptloc.returncode == 0, ptloc.stdout[-3000:]
    assert f"initialised from {cssl_dir / 'checkpoint_best.pt'}" in ptloc.stdout
    assert_per_shard_logs(ptloc.stdout, inner_steps=1)


def test_named_size_is_the_same_model_in_both_entry_points(hydra_cssl, corpus, tmp_path):
    """--arch eq_wav2vec2_tiny and the hydra group model=eq_wav2vec2_tiny build the same network."""
    result = fairseq_train(corpus, tmp_path / "run", "--inner-steps", "0", "--max-update", "1")
    assert result.returncode == 0, result.stdout[-3000:]
    argparse_model = load_state(tmp_path / "run" / "checkpoint_last.pt")["model"]
    hydra_model = load_state(hydra_cssl[0] / "checkpoint_last.pt")["model"]
    assert {k: v.shape for k, v in argparse_model.items()} == {k: v.shape for k, v in hydra_model.items()}


def build_trainer(corpus, inner_steps: int):
    parser = options.get_training_parser()
    flags = [f for f in TRAIN_FLAGS]
    flags[flags.index("--optimizer") + 1] = "sgd"
    flags[flags.index("--lr") + 1] = "0.05"
    args = options.parse_args_and_arch(parser, [str(corpus), *flags, "--inner-steps", str(inner_steps),
                                                "--inner-lr", "0.02", "--no-save"])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    utils.set_torch_seed(cfg.common.seed)
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    iterator = task.get_batch_iterator(
        task.dataset("train"), max_tokens=cfg.dataset.max_tokens, required_batch_size_multiple=1, seed=1
    ).next_epoch_itr(shuffle=False)
    return cfg, task, model, trainer, next(iterator)


def reference_update(cfg, task, trained_model, sample, inner_steps: int, inner_lr: float, lr: float) -> dict:
    """θ - β (1/M) Σ_i ∇g_i(φ_i^K), with fairseq's stock wav2vec criterion and hand-written SGD."""
    model = task.build_model(cfg.model)  # a copy (weight norm rules out deepcopy)
    model.load_state_dict(trained_model.state_dict())
    model.train()
    model.set_num_updates(0)
    criterion = Wav2vecCriterion(task, infonce=True, loss_weights=[0.1, 10])
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    shards = list(sample["shards"].values())
    # What the task does: numpy and torch seeded from (seed, update, first clip of the batch).
    seed = batch_seed(cfg.common.seed, 0, int(shards[0]["id"][0]))
    with data_utils.numpy_seed(seed), utils.set_torch_seed(seed):
        for batch in shards:
            state = (torch.get_rng_state(), np.random.get_state())

            def g():
                torch.set_rng_state(state[0])
                np.random.set_state(state[1])
                loss, sample_size, _ = criterion(model, batch)
                return loss / sample_size

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
def test_one_fairseq_update_equals_an_independent_computation(corpus, inner_steps):
    """Through fairseq's Trainer (SGD outer step), K=0 is the plain per-shard-averaged step and
    K=1 the first-order equilibrium step, both computed here by hand with the stock criterion."""
    cfg, task, model, trainer, sample = build_trainer(corpus, inner_steps)
    assert list(sample["shards"]) == SHARDS
    expected = reference_update(cfg, task, model, sample, inner_steps, inner_lr=0.02, lr=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step([sample])
    moved = 0.0
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (param.detach() - before[name]).abs().max().item())
    assert moved > 1e-4  # the update did something


def test_inner_steps_change_the_update(corpus):
    """K=1 gives a different outer step from K=0 on the same batch (the constraint is not a no-op)."""
    results = []
    for inner_steps in (0, 1):
        cfg, task, model, trainer, sample = build_trainer(corpus, inner_steps)
        trainer.train_step([sample])
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (results[0] - results[1]).abs().max() > 1e-6


def test_resume_continues_the_same_run(corpus, tmp_path):
    """Stopping at update 2 and resuming from checkpoint_last gives exactly the parameters,
    learning rate and update count of an uninterrupted run of 4 updates."""
    schedule = ["--inner-steps", "1", "--lr-scheduler", "polynomial_decay", "--warmup-updates", "3",
                "--total-num-update", "10", "--save-interval-updates", "2"]
    straight = fairseq_train(corpus, tmp_path / "straight", *schedule, "--max-update", "4")
    first = fairseq_train(corpus, tmp_path / "resumed", *schedule, "--max-update", "2")
    resumed = fairseq_train(corpus, tmp_path / "resumed", *schedule, "--max-update", "4")
    for result in (straight, first, resumed):
        assert result.returncode == 0, result.stdout[-3000:]
    assert "Loaded checkpoint" in resumed.stdout and "(epoch 1 @ 2 updates)" in resumed.stdout
    assert train_log_values(resumed.stdout, "num_updates") == [3.0, 4.0]
    assert train_log_values(resumed.stdout, "lr") == train_log_values(straight.stdout, "lr")[2:]
    assert train_log_values(resumed.stdout, "loss") == train_log_values(straight.stdout, "loss")[2:]
    a = load_state(tmp_path / "straight" / "checkpoint_last.pt")
    b = load_state(tmp_path / "resumed" / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 4
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_continue_from_a_stock_fairseq_wav2vec2_checkpoint(corpus, tmp_path):
    """A checkpoint made by fairseq's own audio_pretraining task and wav2vec2 model (another
    shape than the recipe's) is continued with PTLOC through model.init_from."""
    stock = run([
        "fairseq-train", corpus / "read", "--task", "audio_pretraining", "--arch", "wav2vec2",
        "--criterion", "wav2vec", "--infonce", "--loss-weights", "[0.1, 10]", "--quantize-targets",
        "--encoder-layers", "1", "--encoder-embed-dim", "48", "--encoder-ffn-embed-dim", "96",
        "--encoder-attention-heads", "2", "--final-dim", "16", "--latent-vars", "8",
        "--conv-feature-layers", "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2",
        "--cpu", "--max-tokens", "48000", "--max-sample-size", "24000", "--min-sample-size", "8000",
        "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "1e-4",
        "--max-update", "2", "--save-dir", tmp_path / "stock", "--num-workers", "0",
    ])
    assert stock.returncode == 0, stock.stdout[-3000:]
    stock_state = load_state(tmp_path / "stock" / "checkpoint_last.pt")
    assert stock_state["cfg"]["model"]["_name"] == "wav2vec2"
    assert stock_state["cfg"]["task"]["_name"] == "audio_pretraining"

    init = tmp_path / "stock" / "checkpoint_last.pt"
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/pretrain", "--config-name",
                  "ptloc_tiny", f"task.data={corpus}", f"checkpoint.save_dir={tmp_path / 'ptloc'}",
                  f"model.init_from={init}", "optimization.max_update=4", "common.log_interval=1"])
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"initialised from {init} (wav2vec2, 2 updates)" in result.stdout
    assert_per_shard_logs(result.stdout, inner_steps=1)
    continued = load_state(tmp_path / "ptloc" / "checkpoint_last.pt")
    # The architecture came from the stock checkpoint and is recorded for later loading.
    assert continued["cfg"]["model"]["encoder_embed_dim"] == 48
    assert continued["cfg"]["model"]["encoder_layers"] == 1
    assert set(continued["model"]) == set(stock_state["model"])
    # Two small steps from the stock weights, not from a fresh initialisation.
    drift = max((continued["model"][k] - stock_state["model"][k]).abs().max().item() for k in stock_state["model"])
    assert 0 < drift < 0.01


def test_gap_tool_measures_adaptation_on_any_wav2vec2_checkpoint(corpus, hydra_cssl, tmp_path):
    """eqssl-gap: K=0 gives a zero gap, K=1 a per-shard table with a JSON copy; an existing
    JSON file is never overwritten."""
    checkpoint = hydra_cssl[0] / "checkpoint_best.pt"
    zero = run(["eqssl-gap", corpus, f"cssl={checkpoint}", "--inner-steps", "0", "--batches", "2"])
    assert zero.returncode == 0, zero.stdout[-3000:]
    row = next(line for line in zero.stdout.splitlines() if line.startswith("| cssl |"))
    assert row.count("/ +0.000") == len(SHARDS)

    out = tmp_path / "gap.json"
    one = run(["eqssl-gap", corpus, f"cssl={checkpoint}", "--inner-steps", "1", "--inner-lr", "0.05",
               "--batches", "2", "--json", out, "--max-tokens", "16000", "--max-sample-size", "16000"])
    assert one.returncode == 0, one.stdout[-3000:]
    results = json.loads(out.read_text())["results"]["cssl"]
    assert set(results) == set(SHARDS)
    for shard in SHARDS:
        assert results[shard]["batches"] == 2
        assert results[shard]["gap"] == pytest.approx(results[shard]["loss_before"] - results[shard]["loss_after"])
        assert results[shard]["gap"] != 0
    again = run(["eqssl-gap", corpus, f"cssl={checkpoint}", "--json", out])
    assert again.returncode != 0 and "exists" in again.stdout
