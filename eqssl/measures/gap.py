"""The equilibrium gap: how far a pre-training checkpoint (wav2vec 2.0, BEST-RQ or CPC) is from each
shard's K-step optimum, on that shard's validation batches (the command line is ``eqssl-gap``).
"""

from typing import Dict, List

import torch
from fairseq.data import data_utils

from ..bilevel import equilibrium_backward
from ..criterions.base import LN2
from ..criterions.equilibrium_bestrq import EquilibriumBestRqCriterion
from ..criterions.equilibrium_cpc import EquilibriumCpcCriterion
from ..criterions.equilibrium_wav2vec import EquilibriumWav2vecCriterion
from ..data import receptive_field
from ..data.shards import Batching, load_shards, validation_batches
from ..models.eq_bestrq import EqBestRqModel
from ..models.eq_cpc import EqCpcModel
from ..models.eq_wav2vec2 import build_from_checkpoint_config, load_pretraining_checkpoint



def load_model(path: str, given_as: str = "checkpoint ") -> tuple:
    """The network of a pre-training checkpoint (wav2vec 2.0, BEST-RQ or CPC), and the checkpoint's config."""
    state = load_pretraining_checkpoint(path, given_as=given_as)
    model = build_from_checkpoint_config(state)
    model.load_state_dict(state["model"], strict=True)
    return model, state["cfg"]


def pretraining_criterion(model, cfg):
    """The equilibrium criterion of the checkpoint's model family, with its recorded settings."""
    if isinstance(model, EqBestRqModel):
        return EquilibriumBestRqCriterion(None)
    if isinstance(model, EqCpcModel):
        return EquilibriumCpcCriterion(None)  # its negatives come from numpy, seeded per batch below
    criterion_cfg = cfg.get("criterion") or {}
    return EquilibriumWav2vecCriterion(None, infonce=True, loss_weights=criterion_cfg.get("loss_weights") or [0.1, 10])


def measure_gap(path: str, data: str, shards: List[str], args) -> Dict[str, dict]:
    """Per shard: mean loss at θ, after K inner steps, and the gap, over its validation batches."""
    model, cfg = load_model(path)
    model.eval()  # no dropout: the loss is a function of the weights, masks and negatives only
    criterion = pretraining_criterion(model, cfg)
    min_samples = max(args.min_sample_size, model.min_input_samples() if hasattr(model, "min_input_samples")
                      else receptive_field(eval(model.cfg.conv_feature_layers)))
    sample_rate = (cfg.get("task") or {}).get("sample_rate", 16000)
    dataset = load_shards(data, shards, args.split, sample_rate, max_sample_size=args.max_sample_size,
                          min_sample_size=min_samples)
    batches = validation_batches(dataset, 1, Batching(args.max_tokens, None, 1, min_samples, args.seed))
    sums = {name: {"loss_before": 0.0, "loss_after": 0.0, "batches": 0} for name in shards}
    for number, indices in enumerate(batches):
        shard_name, sample = next(iter(dataset.collater([dataset[int(i)] for i in indices])["shards"].items()))
        if sums[shard_name]["batches"] >= args.batches:
            continue
        torch.manual_seed(args.seed + number)
        with data_utils.numpy_seed(args.seed, number):
            record = equilibrium_backward(
                model, [lambda: criterion.shard_loss(model, sample)[0]], args.inner_steps, args.inner_lr
            )[0]
        model.zero_grad(set_to_none=True)
        sums[shard_name]["loss_before"] += record.loss_before / LN2
        sums[shard_name]["loss_after"] += record.loss_after / LN2
        sums[shard_name]["batches"] += 1
    result = {}
    for name, s in sums.items():
        n = max(s["batches"], 1)
        result[name] = {"loss_before": s["loss_before"] / n, "loss_after": s["loss_after"] / n,
                        "gap": (s["loss_before"] - s["loss_after"]) / n, "batches": s["batches"]}
    return result
