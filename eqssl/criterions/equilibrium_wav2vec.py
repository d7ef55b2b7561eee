"""fairseq criterion ``equilibrium_wav2vec``: the wav2vec 2.0 loss per shard, with per-shard logging."""


import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion, Wav2VecCriterionConfig
from fairseq.logging.meters import safe_round

from ..distributed import unwrap

logger = logging.getLogger(__name__)

LN2 = math.log(2)
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
class EquilibriumWav2vecCriterion(Wav2vecCriterion):
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
        loss, sample_size, logging_output = super().forward(model, sample)
        sample_size = float(sample_size)
        groups = module.quantizer.groups if getattr(module, "quantizer", None) is not None else 1
        logging_output["code_ppl_per_group"] = logging_output.get("code_perplexity", 0.0) / groups
        logging_output["normalised_loss"] = loss.item() / sample_size
        return loss / sample_size, logging_output

    def _shard_stats(self, name: str, output: dict) -> Dict[str, float]:
        return {
            f"_correct_{name}": float(output.get("correct", 0)),
            f"_count_{name}": float(output.get("count", 0)),
            f"_code_ppl_{name}": float(output.get("code_ppl_per_group", 0.0)),
        }

    def _common(self, outputs: Dict[str, dict]) -> dict:
        return {
            "ntokens": sum(float(o["ntokens"]) for o in outputs.values()),
            "nsentences": sum(float(o["nsentences"]) for o in outputs.values()),
            "sample_size": 1,
            "_world_size": 1,
            "_collapse_perplexity": self.collapse_perplexity,
            "_collapse_accuracy": self.collapse_accuracy,
        }

    def update_logging_output(self, shard_names: List[str], records: dict, outputs: Dict[str, dict],
                              unreadable: Optional[Dict[str, int]] = None) -> dict:
        """One training update's flat, summable log: every shard's keys, zeros where it was absent;
        ``unreadable``: clips per shard whose audio could not be read and were left out."""
        log = self._common(outputs)
        kept = {n: r for n, r in records.items() if not r.dropped}
        total_weight = sum(r.weight for r in kept.values()) or 1.0
        log["loss"] = sum(r.weight * r.loss_after for r in kept.values()) / total_weight
        log["loss_before"] = sum(r.weight * r.loss_before for r in kept.values()) / total_weight
        for name in shard_names:
            record = kept.get(name)
            log[f"_n_{name}"] = 1.0 if record is not None else 0.0
            log[f"_loss_before_{name}"] = record.loss_before if record is not None else 0.0
            log[f"_loss_after_{name}"] = record.loss_after if record is not None else 0.0
            log[f"dropped_{name}"] = 1.0 if name in records and records[name].dropped else 0.0
            log[f"unreadable_{name}"] = float((unreadable or {}).get(name, 0))
            log.update(self._shard_stats(name, outputs[name]) if record is not None else self._shard_stats(name, {}))
        return log

    def validation_logging_output(self, shard_names: List[str], outputs: Dict[str, dict],
                                  records: Optional[dict] = None,
                                  unreadable: Optional[Dict[str, int]] = None) -> dict:
        """One validation batch's log: the loss at the shared weights per shard, and with
        ``records`` (task.validation_gap_steps > 0) the loss after the inner steps."""
        log = self._common(outputs)
        log["loss"] = sum(o["normalised_loss"] for o in outputs.values()) / max(len(outputs), 1)
        for name in shard_names:
            output = outputs.get(name)
            log[f"_n_{name}"] = 1.0 if output is not None else 0.0
            log[f"_loss_before_{name}"] = output["normalised_loss"] if output is not None else 0.0
            log[f"unreadable_{name}"] = float((unreadable or {}).get(name, 0))
            if records is not None:
                record = records.get(name)
                kept = record is not None and not record.dropped
                log[f"_loss_after_{name}"] = record.loss_after if kept else 0.0
                log[f"_after_n_{name}"] = 1.0 if kept else 0.0
            log.update(self._shard_stats(name, output or {}))
        return log

    def forward(self, model, sample, reduce=True):
        """Plain fairseq call on a ``{"shards": ...}`` sample (used by fairseq's own validation)."""
        outputs = {n: self.shard_loss(model, s)[1] for n, s in sample["shards"].items()}
        log = self.validation_logging_output(list(outputs), outputs)
        return torch.tensor(log["loss"]), 1, log

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key: str) -> float:
            return float(sum(log.get(key, 0) for log in logging_outputs))

        steps = total("sample_size") or 1.0
        workers = total("_world_size") or 1.0
        metrics.log_scalar("loss", total("loss") / steps / LN2, steps, round=3)
        if "loss_before" in logging_outputs[0]:
            metrics.log_scalar("loss_before", total("loss_before") / steps / LN2, steps, round=3)
            metrics.log_scalar("gap", (total("loss_before") - total("loss")) / steps / LN2, steps, round=4)
        metrics.log_scalar("ntokens", total("ntokens"))
        metrics.log_scalar("nsentences", total("nsentences"))
        min_ppl = total("_collapse_perplexity") / workers
        max_acc = total("_collapse_accuracy") / workers
        shards = [k[len("_n_"):] for k in logging_outputs[0] if k.startswith("_n_")]
        for name in shards:
            n = total(f"_n_{name}")
            for counted in ("dropped", "unreadable"):
                if f"{counted}_{name}" in logging_outputs[0]:
                    metrics.log_scalar_sum(f"{counted}_{name}", total(f"{counted}_{name}"))
            if n == 0:
                continue
            before = total(f"_loss_before_{name}") / n / LN2
            metrics.log_scalar(f"loss_before_{name}", before, n, round=3)
            n_after = total(f"_after_n_{name}") if f"_after_n_{name}" in logging_outputs[0] else n
            if f"_loss_after_{name}" in logging_outputs[0] and n_after:
                after = total(f"_loss_after_{name}") / n_after / LN2
                metrics.log_scalar(f"loss_after_{name}", after, n, round=3)
                metrics.log_scalar(f"gap_{name}", before - after, n, round=4)
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
