"""fairseq criterion ``equilibrium_cpc``: CPC's InfoNCE per shard."""


from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from .base import EquilibriumCriterion


@dataclass
class EquilibriumCpcCriterionConfig(FairseqDataclass):
    pass


@register_criterion("equilibrium_cpc", dataclass=EquilibriumCpcCriterionConfig)
class EquilibriumCpcCriterion(EquilibriumCriterion, FairseqCriterion):
    """InfoNCE: cross-entropy of each target's scores against the positive (index 0), averaged
    over every (clip, t, k) target, in nats (logged in bits).

    Logged per shard ``s`` besides the common keys (``loss_before_s``, ``loss_after_s``, ``gap_s``,
    ``dropped_s``, ``unreadable_s``): ``accuracy_s`` (the positive scored strictly above every
    negative: a tie, e.g. two frames of digital silence, is no success), ``chance_s`` (1 / (N + 1),
    1/13 for the paper's 12 negatives) and ``z_std_s`` (the targets' spread over time; near 0 is
    collapse). Per step k over all shards: ``k<k>_accuracy`` (highest at k = 1, partly because
    neighbouring frames' receptive fields overlap). Per step and shard the counts are summed in
    the logs (``_step_correct<k>_s``, ``_step_count<k>_s``) but not logged: a shard's batch holds a
    few hundred targets per step (accuracies of ±0.03 noise) and 12 x M fields would swamp the line.
    Not ``accuracy_k<k>``: tools read ``accuracy_<x>`` as shard x's accuracy.
    """

    def __init__(self, task) -> None:
        super().__init__(task)
        self.prediction_steps: Optional[int] = None
        """K, from the model's first pass: a shard absent from an update logs K zeros per key."""

    def shard_loss(self, model, sample) -> Tuple[torch.Tensor, dict]:
        output = model(**sample["net_input"])
        scores, steps = output["scores"], output["steps"]
        self.prediction_steps = int(output["prediction_steps"])
        loss = F.cross_entropy(scores, scores.new_zeros(len(scores), dtype=torch.long))
        with torch.no_grad():
            correct = scores[:, 0] > scores[:, 1:].max(-1).values
            log = {
                "ntokens": len(scores),
                "nsentences": sample["id"].numel(),
                "normalised_loss": loss.item(),
                "correct": float(correct.sum()),
                "count": float(len(scores)),
                "chance": len(scores) / scores.shape[1],  # summed, then divided by count
                "z_std": float(output["z_std"]),
            }
            by_step = torch.bincount(steps, minlength=self.prediction_steps).tolist()
            correct_by_step = torch.bincount(steps[correct], minlength=self.prediction_steps).tolist()
            for k in range(1, self.prediction_steps + 1):
                log[f"step_count{k}"] = float(by_step[k - 1])
                log[f"step_correct{k}"] = float(correct_by_step[k - 1])
        return loss, log

    def shard_stats(self, name: str, output: dict) -> Dict[str, float]:
        if self.prediction_steps is None:
            raise RuntimeError("equilibrium_cpc: shard_stats before any shard_loss; K is unknown")
        keys = ["correct", "count", "chance", "z_std"]
        keys += [f"step_{kind}{k}" for k in range(1, self.prediction_steps + 1) for kind in ("correct", "count")]
        return {f"_{key}_{name}": float(output.get(key, 0.0)) for key in keys}

    @staticmethod
    def reduce_shard(name: str, total, n: float, logging_outputs: list) -> None:
        count = total(f"_count_{name}")
        if count:
            metrics.log_scalar(f"accuracy_{name}", total(f"_correct_{name}") / count, count, round=4)
            metrics.log_scalar(f"chance_{name}", total(f"_chance_{name}") / count, count, round=4)
        metrics.log_scalar(f"z_std_{name}", total(f"_z_std_{name}") / n, n, round=4)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        k = 1
        while True:
            counts = [key for key in logging_outputs[0] if key.startswith(f"_step_count{k}_")]
            if not counts:
                break
            count = sum(float(log.get(key, 0)) for log in logging_outputs for key in counts)
            correct = sum(float(log.get(key.replace("_step_count", "_step_correct", 1), 0))
                          for log in logging_outputs for key in counts)
            if count:
                metrics.log_scalar(f"k{k}_accuracy", correct / count, count, round=4)
            k += 1
