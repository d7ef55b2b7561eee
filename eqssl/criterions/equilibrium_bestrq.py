"""fairseq criterion ``equilibrium_bestrq``: BEST-RQ's masked-code cross-entropy per shard."""


import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from .base import EquilibriumCriterion


@dataclass
class EquilibriumBestRqCriterionConfig(FairseqDataclass):
    pass


@register_criterion("equilibrium_bestrq", dataclass=EquilibriumBestRqCriterionConfig)
class EquilibriumBestRqCriterion(EquilibriumCriterion, FairseqCriterion):
    """Cross-entropy of the masked frames' codes, averaged per masked frame.

    Logged per shard ``s`` besides the common keys (``loss_before_s``, ``loss_after_s``, ``gap_s``,
    ``dropped_s``, ``unreadable_s``): ``accuracy_s`` (masked-code accuracy), ``majority_s`` (the
    accuracy of always answering the batch's most frequent code: this task's chance level, an
    upper bound of any constant answer), ``code_ppl_s`` (perplexity of the code distribution of
    the masked frames; at most ``codebook_size``).
    """

    def __init__(self, task) -> None:
        super().__init__(task)

    def shard_loss(self, model, sample) -> Tuple[torch.Tensor, dict]:
        output = model(**sample["net_input"])
        logits, targets = output["logits"], output["targets"]
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            counts = torch.bincount(targets, minlength=logits.shape[-1]).double()
            share = counts / counts.sum().clamp(min=1)
            entropy = -(share[share > 0] * share[share > 0].log()).sum()
            log = {
                "ntokens": targets.numel(),
                "nsentences": sample["id"].numel(),
                "normalised_loss": loss.item(),
                "correct": float((logits.argmax(-1) == targets).sum()),
                "count": float(targets.numel()),
                "majority": float(counts.max()),
                "code_ppl": float(entropy.exp()),
            }
        return loss, log

    def shard_stats(self, name: str, output: dict) -> Dict[str, float]:
        return {f"_{key}_{name}": float(output.get(key, 0.0)) for key in ("correct", "count", "majority", "code_ppl")}

    @staticmethod
    def reduce_shard(name: str, total, n: float, logging_outputs: list) -> None:
        count = total(f"_count_{name}")
        if count:
            metrics.log_scalar(f"accuracy_{name}", total(f"_correct_{name}") / count, count, round=4)
            metrics.log_scalar(f"majority_{name}", total(f"_majority_{name}") / count, count, round=4)
        code_ppl = total(f"_code_ppl_{name}") / n
        if code_ppl > 0 and math.isfinite(code_ppl):
            metrics.log_scalar(f"code_ppl_{name}", code_ppl, n, round=2)
