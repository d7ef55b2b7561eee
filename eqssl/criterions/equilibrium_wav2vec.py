"""fairseq criterion ``equilibrium_wav2vec``: the wav2vec 2.0 loss per shard, with per-shard logging."""


import logging
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion, Wav2VecCriterionConfig

from ..distributed import unwrap
from .base import EquilibriumCriterion

logger = logging.getLogger(__name__)

_collapsed_shards = set()  # shards already warned about, so the warning is not repeated each log


@dataclass
class EquilibriumWav2vecCriterionConfig(Wav2VecCriterionConfig):
    infonce: bool = field(
        default=True,
        metadata={"help": "InfoNCE (cross-entropy over the true and negative targets), as wav2vec 2.0"},
    )
    collapse_perplexity: float = field(
        default=2.0,
        metadata={
            "help": "warn (naming the shard) when the code perplexity per codebook group falls "
            "below this: the quantiser has collapsed onto a few codes"
        },
    )
    collapse_accuracy: float = field(
        default=0.99,
        metadata={"help": "warn (naming the shard) when the contrastive accuracy exceeds this: "
                  "the task has become trivial, usually because the codebook collapsed"},
    )


@register_criterion("equilibrium_wav2vec", dataclass=EquilibriumWav2vecCriterionConfig)
class EquilibriumWav2vecCriterion(EquilibriumCriterion, Wav2vecCriterion):
    """wav2vec 2.0's contrastive + diversity (+ feature penalty) loss, normalised per target.

    Logged per shard ``s`` (training): ``loss_before_s`` (at the shared weights), ``loss_after_s``
    (after the K inner steps), ``gap_s`` (their difference, the equilibrium gap), ``accuracy_s``,
    ``code_ppl_s`` (code perplexity per codebook group), ``dropped_s`` (updates the shard was left
    out of for a non-finite loss). Losses are in bits per target, like fairseq's wav2vec criterion.
    """

    def __init__(self, task, infonce=True, loss_weights=None, log_keys=None,
                 collapse_perplexity=2.0, collapse_accuracy=0.99):
        super().__init__(task, infonce, loss_weights, log_keys)
        self.collapse_perplexity = collapse_perplexity
        self.collapse_accuracy = collapse_accuracy
        for key in ("code_perplexity", "prob_perplexity"):
            if key not in self.log_keys:
                self.log_keys = list(self.log_keys) + [key]

    def shard_loss(self, model, sample) -> Tuple[torch.Tensor, dict]:
        """g_i for one shard's batch: the wav2vec 2.0 loss averaged over its targets."""
        module = unwrap(model)
        if self.loss_weights is not None and len(self.loss_weights) > 1:
            extra = 2 if getattr(module, "quantizer", None) is not None else 1
            if len(self.loss_weights) != extra:
                raise ValueError(
                    f"criterion.loss_weights has {len(self.loss_weights)} entries but this model "
                    f"produces {extra} extra loss(es) (diversity loss only with "
                    "model.quantize_targets=true, plus the feature penalty)"
                )
        loss, sample_size, logging_output = Wav2vecCriterion.forward(self, model, sample)
        sample_size = float(sample_size)
        groups = module.quantizer.groups if getattr(module, "quantizer", None) is not None else 1
        logging_output["code_ppl_per_group"] = logging_output.get("code_perplexity", 0.0) / groups
        logging_output["normalised_loss"] = loss.item() / sample_size
        return loss / sample_size, logging_output

    def shard_stats(self, name: str, output: dict) -> Dict[str, float]:
        return {
            f"_correct_{name}": float(output.get("correct", 0)),
            f"_count_{name}": float(output.get("count", 0)),
            f"_code_ppl_{name}": float(output.get("code_ppl_per_group", 0.0)),
        }

    def common_logging_output(self, outputs: Dict[str, dict]) -> dict:
        log = super().common_logging_output(outputs)
        log["_collapse_perplexity"] = self.collapse_perplexity
        log["_collapse_accuracy"] = self.collapse_accuracy
        return log

    @staticmethod
    def reduce_shard(name: str, total, n: float, logging_outputs: list) -> None:
        """Contrastive accuracy, code perplexity per group, and the collapse warning."""
        workers = total("_world_size") or 1.0
        min_ppl = total("_collapse_perplexity") / workers
        max_acc = total("_collapse_accuracy") / workers
        count = total(f"_count_{name}")
        accuracy = total(f"_correct_{name}") / count if count else float("nan")
        if count:
            metrics.log_scalar(f"accuracy_{name}", accuracy, count, round=4)
        code_ppl = total(f"_code_ppl_{name}") / n
        if code_ppl > 0:
            metrics.log_scalar(f"code_ppl_{name}", code_ppl, n, round=2)
        collapsed = (0 < code_ppl < min_ppl) or (count > 0 and accuracy > max_acc)
        if collapsed and name not in _collapsed_shards:
            _collapsed_shards.add(name)
            logger.warning(
                "shard %s: possible codebook collapse (code perplexity %.2f per group, accuracy "
                "%.3f): pre-training is failing silently; lower the learning rate or raise the "
                "diversity loss weight (criterion.loss_weights)", name, code_ppl, accuracy,
            )
        elif not collapsed:
            _collapsed_shards.discard(name)
