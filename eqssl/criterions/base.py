"""What an equilibrium criterion offers the task: the interface a model family implements.

The task ``equilibrium_pretraining`` knows no model family. Per update it calls, for every shard
``s`` in the batch::

    loss, output = criterion.shard_loss(model, sample["shards"][s])

``loss`` is g_s, the shard's pre-training loss **averaged per target** (per masked frame), so the
inner learning rate α means the same for any batch size; ``output`` is that pass's logging dict
(``ntokens``, ``nsentences`` and whatever ``shard_stats`` reads). After the update the task calls
``update_logging_output`` (training) or ``validation_logging_output`` (validation) with the
bilevel records, and fairseq reduces the logs with ``reduce_metrics``.

A new family (HuBERT, data2vec, CPC, …) subclasses :class:`EquilibriumCriterion` and writes two
methods: ``shard_loss`` and ``shard_stats`` (summable per-shard numbers, e.g. correct/count);
optionally ``reduce_shard`` to turn its sums into logged metrics (accuracy, code perplexity,
chance). Everything else (per-shard ``loss_before_s``, ``loss_after_s``, ``gap_s``,
``grad_change_s``, ``dropped_s``, ``unreadable_s``, the weighted training loss) comes from this class. Its model
must also give the task ``min_input_samples()`` if clips shorter than some length give no target.
"""

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from fairseq import metrics

LN2 = math.log(2)


class EquilibriumCriterion:
    """Mixin for fairseq criteria used by ``equilibrium_pretraining``; see the module docstring.

    Losses are logged in bits per target (fairseq's convention for wav2vec 2.0).
    """

    def shard_loss(self, model, sample) -> Tuple[torch.Tensor, dict]:
        """g_s for one shard's batch (mean per target) and that pass's logging dict, which must
        hold ``ntokens``, ``nsentences`` and ``normalised_loss`` (the float value of the loss)."""
        raise NotImplementedError

    def shard_stats(self, name: str, output: dict) -> Dict[str, float]:
        """Summable numbers of one shard's pass, keys ending in ``_{name}``; an empty ``output``
        (shard absent from this update) must give the same keys with zeros."""
        return {}

    @staticmethod
    def reduce_shard(name: str, total: Callable[[str], float], n: float, logging_outputs: list) -> None:
        """Log the family's per-shard metrics from the summed ``shard_stats`` (``total(key)``);
        ``n`` is how many passes of this shard the logs hold."""

    def common_logging_output(self, outputs: Dict[str, dict]) -> dict:
        """Keys every log has, whatever the family."""
        return {
            "ntokens": sum(float(o["ntokens"]) for o in outputs.values()),
            "nsentences": sum(float(o["nsentences"]) for o in outputs.values()),
            "sample_size": 1,
            "_world_size": 1,
        }

    def update_logging_output(self, shard_names: List[str], records: dict, outputs: Dict[str, dict],
                              unreadable: Optional[Dict[str, int]] = None) -> dict:
        """One training update's flat, summable log: every shard's keys, zeros where it was absent;
        ``unreadable``: clips per shard whose audio could not be read and were left out."""
        log = self.common_logging_output(outputs)
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
            # Always present (zeros when not measured): workers sum their logs key by key.
            change = record.gradient_change if record is not None else math.nan
            log[f"_grad_change_{name}"] = change if math.isfinite(change) else 0.0
            log[f"_grad_change_n_{name}"] = 1.0 if math.isfinite(change) else 0.0
            log.update(self.shard_stats(name, outputs[name] if record is not None else {}))
        return log

    def validation_logging_output(self, shard_names: List[str], outputs: Dict[str, dict],
                                  records: Optional[dict] = None,
                                  unreadable: Optional[Dict[str, int]] = None) -> dict:
        """One validation batch's log: the loss at the shared weights per shard, and with
        ``records`` (task.validation_gap_steps > 0) the loss after the inner steps."""
        log = self.common_logging_output(outputs)
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
            log.update(self.shard_stats(name, output or {}))
        return log

    def forward(self, model, sample, reduce=True):
        """Plain fairseq call on a ``{"shards": ...}`` sample (used by fairseq's own validation)."""
        outputs = {n: self.shard_loss(model, s)[1] for n, s in sample["shards"].items()}
        log = self.validation_logging_output(list(outputs), outputs)
        return torch.tensor(log["loss"]), 1, log

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key: str) -> float:
            return float(sum(log.get(key, 0) for log in logging_outputs))

        steps = total("sample_size") or 1.0
        metrics.log_scalar("loss", total("loss") / steps / LN2, steps, round=3)
        if "loss_before" in logging_outputs[0]:
            metrics.log_scalar("loss_before", total("loss_before") / steps / LN2, steps, round=3)
            metrics.log_scalar("gap", (total("loss_before") - total("loss")) / steps / LN2, steps, round=4)
        metrics.log_scalar("ntokens", total("ntokens"))
        metrics.log_scalar("nsentences", total("nsentences"))
        shards = [k[len("_n_"):] for k in logging_outputs[0] if k.startswith("_n_")]
        for name in shards:
            n = total(f"_n_{name}")
            for counted in ("dropped", "unreadable"):
                if f"{counted}_{name}" in logging_outputs[0]:
                    metrics.log_scalar_sum(f"{counted}_{name}", total(f"{counted}_{name}"))
            if total(f"_grad_change_n_{name}"):  # PTLOC: how far the inner steps moved the gradient
                metrics.log_scalar(f"grad_change_{name}",
                                   total(f"_grad_change_{name}") / total(f"_grad_change_n_{name}"),
                                   total(f"_grad_change_n_{name}"), round=4)
            if n == 0:
                continue
            before = total(f"_loss_before_{name}") / n / LN2
            metrics.log_scalar(f"loss_before_{name}", before, n, round=3)
            n_after = total(f"_after_n_{name}") if f"_after_n_{name}" in logging_outputs[0] else n
            if f"_loss_after_{name}" in logging_outputs[0] and n_after:
                after = total(f"_loss_after_{name}") / n_after / LN2
                metrics.log_scalar(f"loss_after_{name}", after, n, round=3)
                metrics.log_scalar(f"gap_{name}", before - after, n, round=4)
            cls.reduce_shard(name, total, n, logging_outputs)
