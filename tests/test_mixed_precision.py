"""fairseq's --bf16 / --fp16 optimizers (and their memory-efficient variants) give the outer
step of fp32, inner steps included: the fp16 loss scale must not leak into the inner lr α."""

import pytest
import torch
from fairseq import options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer

from conftest import TRAIN_FLAGS

INNER_LR = 0.02


def one_update(corpus, precision: list, rounding: torch.dtype, inner_lr: float = INNER_LR):
    """One outer SGD update through fairseq's Trainer from weights representable in ``rounding``;
    returns the fp32 gradient the optimizer stepped with and the logged per-shard losses."""
    flags = list(TRAIN_FLAGS)
    flags[flags.index("--optimizer") + 1] = "sgd"
    flags[flags.index("--lr") + 1] = "0.05"
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(corpus), *flags, "--inner-steps", "1", "--inner-lr", str(inner_lr), "--no-save", *precision])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    utils.set_torch_seed(cfg.common.seed)
    model = task.build_model(cfg.model)
    with torch.no_grad():  # the same θ for every precision
        for p in model.parameters():
            p.copy_(p.to(rounding).float())
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    sample = next(task.get_batch_iterator(
        task.dataset("train"), max_tokens=cfg.dataset.max_tokens, required_batch_size_multiple=1, seed=1
    ).next_epoch_itr(shuffle=False))
    log = trainer.train_step([sample])
    optimizer = trainer.optimizer
    if hasattr(optimizer, "fp32_params"):  # FP16Optimizer: the fp32 master copy
        masters = optimizer.fp32_params
        masters = list(masters.values()) if isinstance(masters, dict) else masters
        grads = [m.grad.flatten() for m in masters]
    else:  # fp32 or the memory-efficient optimizers: the (unscaled) gradients of the model
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                 for p in trainer.model.parameters() if p.requires_grad]
    return torch.cat(grads).float(), log


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple:
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return cosine, ((a - b).norm() / b.norm()).item()


PRECISIONS = {
    "bf16": (["--bf16"], torch.bfloat16),
    "memory_efficient_bf16": (["--memory-efficient-bf16", "--bf16"], torch.bfloat16),
    "fp16": (["--fp16", "--fp16-init-scale", "1024"], torch.float16),
    "memory_efficient_fp16": (["--memory-efficient-fp16", "--fp16", "--fp16-init-scale", "1024"], torch.float16),
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_reduced_precision_outer_step_equals_fp32(corpus, precision):
    flags, rounding = PRECISIONS[precision]
    reference, reference_log = one_update(corpus, [], rounding)
    reduced, reduced_log = one_update(corpus, flags, rounding)
    cosine, error = agreement(reduced, reference)
    print(f"{precision}: cosine {cosine:.5f}, relative error {error:.4f}")
    assert cosine > 0.999 and error < 0.05
    for key in ("loss_before_read", "loss_after_read"):
        assert reduced_log[key] == pytest.approx(reference_log[key], rel=1e-2), key
