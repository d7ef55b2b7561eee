"""fairseq task ``equilibrium_pretraining``: self-supervised pre-training over shards with the
equilibrium (PTLOC) update; ``inner_steps=0`` is conventional pre-training (CSSL).

The task knows no model family: the criterion computes each shard's loss and logs (the interface
is in ``eqssl.criterions.base``); eq_wav2vec2 + equilibrium_wav2vec, eq_bestrq +
equilibrium_bestrq and eq_cpc + equilibrium_cpc are the families today."""


import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Optional

import torch
from fairseq import utils
from fairseq.data import data_utils, iterators
from fairseq.dataclass import ChoiceEnum
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import register_task
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig, AudioPretrainingTask
from omegaconf import II, open_dict

from ..bilevel import equilibrium_backward
from ..checkpoints import check_checkpoint, repair_last_checkpoint
from ..data import DataError, read_manifest, receptive_field
from ..distributed import torch_ddp, unwrap
from ..data.shards import (
    Batching,
    ShardedAudioDataset,
    load_shards,
    training_batches,
    usable_indices,
    validation_batches,
)

logger = logging.getLogger(__name__)

PAPER_INNER_TO_OUTER_LR = 10.0


@dataclass
class EquilibriumPretrainingConfig(AudioPretrainingConfig):
    shards: str = field(
        default="",
        metadata={
            "help": "comma-separated shard names, each a sub-folder of task.data holding a fairseq "
            "audio manifest folder (train.tsv, valid.tsv); empty: every sub-folder with a train.tsv"
        },
    )
    inner_steps: int = field(
        default=1,
        metadata={
            "help": "K, plain SGD steps each shard takes from the shared model before its gradient "
            "is taken (PTLOC); 0 is conventional pre-training (CSSL). The paper uses 1; 3 was no "
            "better. An update costs K+1 forward/backward passes per shard"
        },
    )
    inner_lr: Optional[float] = field(
        default=None,
        metadata={
            "help": "alpha, the inner SGD learning rate on the per-target mean loss; empty: 10 x "
            "optimization.lr (the paper's alpha/beta = 10). Must be > 0"
        },
    )
    inner_lr_schedule: ChoiceEnum(["constant", "outer"]) = field(
        default="constant",
        metadata={
            "help": "'constant': alpha is inner_lr throughout; 'outer': alpha follows the outer "
            "learning rate's schedule, alpha_t = inner_lr x lr_t / optimization.lr (the paper decays "
            "alpha and beta together; the ptloc recipes use it)"
        },
    )
    shard_weights: str = field(
        default="",
        metadata={
            "help": "comma-separated name:weight pairs (e.g. 'books:2,phone:1'); unlisted shards "
            "weigh 1. Weights of the shards in an update are normalised to sum to 1"
        },
    )
    shard_sampling: ChoiceEnum(["all", "temperature"]) = field(
        default="all",
        metadata={
            "help": "'all' (the paper): every update takes one batch from every shard and the "
            "surplus batches of larger shards are skipped at random; 'temperature': every update "
            "takes shards_per_update shards drawn XLS-R style, p ~ (share of audio)^(1/T)"
        },
    )
    shard_batch_size: ChoiceEnum(["proportional", "equal"]) = field(
        default="proportional",
        metadata={
            "help": "'proportional' (the paper): each shard's batch budget is dataset.max_tokens x "
            "M x its share of the audio, so all shards have about as many batches; 'equal': "
            "every shard's batch budget is dataset.max_tokens"
        },
    )
    shards_per_update: int = field(
        default=0,
        metadata={"help": "with shard_sampling=temperature: shards per update (0: all of them)"},
    )
    sampling_temperature: float = field(
        default=2.0,
        metadata={"help": "with shard_sampling=temperature: T (1 follows the data, 2 is XLS-R's "
                  "alpha=0.5, large is uniform)"},
    )
    validation_gap_steps: int = field(
        default=0,
        metadata={
            "help": "K for measuring the equilibrium gap on every validation batch: each shard's "
            "loss before and after this many inner SGD steps of validation_gap_lr, logged as valid "
            "loss_after_<shard> and gap_<shard> (for CSSL runs too). 0: off. Costs K+1 passes per "
            "validation batch; the validation loss stays the loss at the shared weights"
        },
    )
    validation_gap_lr: Optional[float] = field(
        default=None,
        metadata={"help": "alpha for validation_gap_steps; empty: the run's inner lr. Give it "
                  "explicitly to compare gaps across runs with different learning rates"},
    )
    log_gradient_change: bool = field(
        default=True,
        metadata={
            "help": "with inner_steps > 0, log grad_change_<shard>: ||grad g(phi^K) - grad g(theta)|| / "
            "||grad g(theta)||, how far the inner steps move each shard's gradient from CSSL's (near 0: "
            "PTLOC trains like CSSL; raise inner_lr). Costs a float32 copy of the parameters' "
            "gradient and a few dot products per shard and update"
        },
    )
    check_audio_headers: bool = field(
        default=True,
        metadata={
            "help": "before training, open every listed audio file's header to check it exists, is "
            "mono, at task.sample_rate and as long as the manifest says (about 1 min per 1M files)"
        },
    )
    # Read from other config groups: the task logs them and sizes shard batches with them.
    max_tokens: Optional[int] = II("dataset.max_tokens")
    batch_size: Optional[int] = II("dataset.batch_size")
    required_batch_size_multiple: int = II("dataset.required_batch_size_multiple")
    train_subset: str = II("dataset.train_subset")
    update_freq: List[int] = II("optimization.update_freq")
    outer_lr: List[float] = II("optimization.lr")
    world_size: int = II("distributed_training.distributed_world_size")
    save_dir: str = II("checkpoint.save_dir")
    restore_file: str = II("checkpoint.restore_file")
    checkpoint_suffix: str = II("checkpoint.checkpoint_suffix")


def _parse_shard_weights(text: str, shards: List[str]) -> Dict[str, float]:
    weights = {name: 1.0 for name in shards}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"task.shard_weights: expected name:weight, got {item!r}")
        if name not in weights:
            raise ValueError(f"task.shard_weights: unknown shard {name!r} (shards: {', '.join(shards)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"task.shard_weights: weight of {name!r} is not a number: {value!r}") from None
        if not (weights[name] >= 0 and math.isfinite(weights[name])):
            raise ValueError(f"task.shard_weights: weight of {name!r} must be finite and >= 0")
    if shards and not any(weights.values()):
        raise ValueError("task.shard_weights: at least one shard needs a weight > 0")
    return weights


def discover_shards(data: str, requested: str, data_field: str = "task.data=",
                    shards_field: str = "task.shards") -> List[str]:
    """The shard names under ``data`` (those listed in ``requested``, comma-separated, else every
    sub-folder with a train.tsv); errors name the fields as the user gave them."""
    if not os.path.isdir(data):
        raise DataError(f"{data_field}{data}: no such folder")
    available = sorted(
        d for d in os.listdir(data) if os.path.isfile(os.path.join(data, d, "train.tsv"))
    )
    names = [s.strip() for s in requested.split(",") if s.strip()]
    if not names:
        if not available:
            raise DataError(f"{data_field}{data}: no shard sub-folder with a train.tsv")
        return available
    for name in names:
        if not os.path.isdir(os.path.join(data, name)):
            raise DataError(
                f"{shards_field}: unknown shard {name!r}: no folder {os.path.join(data, name)} "
                f"(shards found: {', '.join(available) or 'none'})"
            )
    if len(set(names)) != len(names):
        raise DataError(f"{shards_field} lists a shard twice: {requested}")
    return names


def batch_seed(seed: int, update: int, first_id: int) -> int:
    """The seed of numpy and torch for one batch of one update (as fairseq's numpy_seed hashes)."""
    return int(hash((seed, update, first_id)) % 1e6)


def _zero_if_not_finite(model: torch.nn.Module) -> bool:
    """Zero every gradient if any is NaN or inf; whether it did (a float32 sum per gradient)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or bool(torch.isfinite(torch.stack([g.sum(dtype=torch.float32) for g in grads])).all()):
        return False
    for g in grads:
        g.zero_()
    return True


def _loss_scaler(optimizer):
    """fairseq's fp16 loss scaler (``scaler``) or AMP's ``torch.amp.GradScaler``; None in fp32/bf16."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler if scaler is not None else getattr(optimizer, "_grad_scaler", None)


def _loss_scale(optimizer) -> float:
    """The fp16/AMP loss scale the outer backward applies (1 in fp32/bf16)."""
    scaler = _loss_scaler(optimizer)
    if scaler is None:
        return 1.0
    return float(scaler.loss_scale if hasattr(scaler, "loss_scale") else scaler.get_scale())


@register_task("equilibrium_pretraining", dataclass=EquilibriumPretrainingConfig)
class EquilibriumPretrainingTask(AudioPretrainingTask):
    """Each update: one batch per shard, K inner SGD steps per shard from the shared model, and
    the outer gradient taken at the adapted weights (``eqssl.bilevel.equilibrium_backward``)."""

    cfg: EquilibriumPretrainingConfig

    @classmethod
    def setup_task(cls, cfg: EquilibriumPretrainingConfig, **kwargs):
        # A checkpoint loaded for fine-tuning or export names a data folder that may be gone.
        return cls(cfg, check_data=not kwargs.get("from_checkpoint", False))

    def __init__(self, cfg: EquilibriumPretrainingConfig, check_data: bool = True) -> None:
        super().__init__(cfg)
        if cfg.inner_steps < 0:
            raise ValueError(f"task.inner_steps must be >= 0, got {cfg.inner_steps}")
        if cfg.inner_lr is not None and not (cfg.inner_lr > 0 and math.isfinite(cfg.inner_lr)):
            raise ValueError(f"task.inner_lr must be > 0, got {cfg.inner_lr}")
        if cfg.sampling_temperature <= 0:
            raise ValueError(f"task.sampling_temperature must be > 0, got {cfg.sampling_temperature}")
        self.shard_names = (
            discover_shards(cfg.data, cfg.shards) if check_data
            else [s.strip() for s in cfg.shards.split(",") if s.strip()]
        )
        # Loaded from a checkpoint (e.g. to fine-tune), the task knows no shards and samples none.
        if check_data and not 0 <= cfg.shards_per_update <= len(self.shard_names):
            raise ValueError(
                f"task.shards_per_update={cfg.shards_per_update} must be in [0, {len(self.shard_names)}]"
            )
        self.shard_weights = _parse_shard_weights(cfg.shard_weights, self.shard_names)
        if check_data:
            self._check_resume_checkpoint()
        self.inner_lr = cfg.inner_lr if cfg.inner_lr is not None else (
            PAPER_INNER_TO_OUTER_LR * float(cfg.outer_lr[0])
        )
        # Set by build_model: clips shorter than the feature encoder's receptive field give no frame.
        self.min_samples = max(cfg.min_sample_size or 0, 400)
        self._reported_skips = set()
        # Set by build_model from the model (BEST-RQ: float64, which fairseq's fp16/bf16 trainer
        # leaves alone, so the log-mel features and its targets are those of fp32)
        self.audio_dtype: Optional[torch.dtype] = None

    def _check_resume_checkpoint(self) -> None:
        """Before fairseq loads it: checkpoint_last repaired if a kill truncated it, and any other
        unreadable checkpoint to resume from stopped with an error naming it."""
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return  # rank 0 alone reads (and repairs) the checkpoint, as fairseq loads it
        if self.cfg.restore_file == "checkpoint_last.pt":
            repair_last_checkpoint(self.cfg.save_dir, self.cfg.checkpoint_suffix or "")
        elif os.path.isfile(self.cfg.restore_file):
            check_checkpoint(self.cfg.restore_file)

    # ------------------------------------------------------------------ data
    def load_dataset(self, split: str, task_cfg=None, **kwargs) -> None:
        self.datasets[split] = load_shards(
            self.cfg.data, self.shard_names, split, self.cfg.sample_rate,
            check_headers=self.cfg.check_audio_headers, seed=self.cfg.seed,
            max_sample_size=self.cfg.max_sample_size, min_sample_size=self.cfg.min_sample_size,
            pad=self.cfg.enable_padding, normalize=self.cfg.normalize,
            num_buckets=self.cfg.num_batch_buckets,
        )
        self.datasets[split].audio_dtype = self.audio_dtype
        if split == self.cfg.train_subset:
            self._log_update_size(self.datasets[split])

    def _log_update_size(self, data: ShardedAudioDataset) -> None:
        hours = {n: d.sizes.sum() / self.cfg.sample_rate / 3600 for n, d in zip(data.names, data.datasets)}
        per_update = len(self.shard_names) if self.cfg.shard_sampling == "all" else (
            self.cfg.shards_per_update or len(self.shard_names)
        )
        update_freq = int(self.cfg.update_freq[0])
        logger.info(
            "shards: %s", ", ".join(f"{n} ({hours[n]:.2f} h, weight {self.shard_weights[n]:g})" for n in data.names)
        )
        budget = "max_tokens=%s" % self.cfg.max_tokens if self.cfg.max_tokens else "batch_size=%s" % self.cfg.batch_size
        logger.info(
            "effective batch per update: %d shards x (%s per shard, %s) x update_freq %d x %d workers = "
            "%d shard batches",
            per_update, budget, self.cfg.shard_batch_size, update_freq, self.cfg.world_size,
            per_update * update_freq * self.cfg.world_size,
        )
        logger.info(
            "inner steps K=%d, inner lr alpha=%g (SGD), outer lr beta=%g (optimization.lr), alpha/beta=%g",
            self.cfg.inner_steps, self.inner_lr, float(self.cfg.outer_lr[0]),
            self.inner_lr / float(self.cfg.outer_lr[0]),
        )

    def _batching(self, max_tokens, max_sentences, required_batch_size_multiple: int, seed: int) -> Batching:
        return Batching(
            max_tokens=max_tokens,
            max_sentences=max_sentences,
            required_batch_size_multiple=required_batch_size_multiple,
            min_samples=self.min_samples,
            seed=seed,
            sampling=self.cfg.shard_sampling,
            batch_size=self.cfg.shard_batch_size,
            shards_per_update=self.cfg.shards_per_update,
            temperature=self.cfg.sampling_temperature,
        )

    def _report_skipped(self, data: ShardedAudioDataset) -> None:
        if data.split in self._reported_skips:
            return
        self._reported_skips.add(data.split)
        for name, dataset in zip(data.names, data.datasets):
            usable = len(usable_indices(dataset, self.min_samples, 0, 1))
            manifest = os.path.join(self.cfg.data, name, f"{data.split}.tsv")
            if usable == 0:
                raise DataError(
                    f"{manifest}: every clip is shorter than {self.min_samples} samples "
                    f"(task.min_sample_size or the feature encoder's receptive field): nothing to train on"
                )
            skipped = len(read_manifest(manifest).entries) - usable
            if skipped:
                logger.warning(
                    "shard %s (%s): skipped %d clips shorter than %d samples", name, data.split, skipped, self.min_samples
                )

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1,
                           num_shards=1, shard_id=0, num_workers=0, epoch=1, data_buffer_size=0,
                           disable_iterator_cache=False, skip_remainder_batch=False,
                           grouped_shuffling=False, update_epoch_batch_itr=False):
        if not isinstance(dataset, ShardedAudioDataset):
            return super().get_batch_iterator(
                dataset, max_tokens, max_sentences, max_positions, ignore_invalid_inputs,
                required_batch_size_multiple, seed, num_shards, shard_id, num_workers, epoch,
                data_buffer_size, disable_iterator_cache, skip_remainder_batch, grouped_shuffling,
                update_epoch_batch_itr,
            )
        reuse = not disable_iterator_cache and not update_epoch_batch_itr
        if reuse and dataset in self.dataset_to_epoch_iter:
            return self.dataset_to_epoch_iter[dataset]
        self._report_skipped(dataset)
        batching = self._batching(max_tokens, max_sentences, required_batch_size_multiple, seed)
        make = training_batches if dataset.split == self.cfg.train_subset else validation_batches
        dataset.set_epoch(epoch)
        epoch_iter = iterators.EpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=partial(_call_with_batching, make, batching),
            seed=seed,
            num_shards=num_shards,
            shard_id=shard_id,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            skip_remainder_batch=skip_remainder_batch,
            grouped_shuffling=grouped_shuffling,
        )
        if reuse:
            self.dataset_to_epoch_iter[dataset] = epoch_iter
        return epoch_iter

    # ----------------------------------------------------------------- model
    def build_model(self, model_cfg, from_checkpoint=False):
        if from_checkpoint and model_cfg.get("init_from"):
            # The weights come from the checkpoint being loaded; its init_from file may be gone.
            with open_dict(model_cfg):
                model_cfg.init_from = None
        model = super().build_model(model_cfg, from_checkpoint)
        if hasattr(model, "actualised_config"):
            with open_dict(model_cfg):
                for key, value in model.actualised_config().items():
                    model_cfg[key] = value
        conv_layers = getattr(getattr(model, "cfg", None), "conv_feature_layers", None)
        self.audio_dtype = getattr(model, "audio_dtype", None)
        for dataset in self.datasets.values():
            if isinstance(dataset, ShardedAudioDataset):
                dataset.audio_dtype = self.audio_dtype
        if hasattr(model, "min_input_samples"):
            self.min_samples = max(self.cfg.min_sample_size or 0, model.min_input_samples())
        elif conv_layers is not None:
            self.min_samples = max(self.cfg.min_sample_size or 0, receptive_field(eval(conv_layers)))
        return model

    # ---------------------------------------------------------------- update
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        model.train()
        model.set_num_updates(update_num)
        module = unwrap(model)  # inner passes on the bare model never all-reduce
        names = list(sample["shards"])
        weights = [0.0 if ignore_grad else self.shard_weights[n] for n in names]
        total = sum(weights)
        weights = [w / total for w in weights] if total > 0 else weights
        amp = isinstance(optimizer, AMPOptimizer)
        outputs: Dict[str, dict] = {}

        def shard_loss(net, name):
            with torch.autocast(device_type="cuda", enabled=amp):
                loss, logging_output = criterion.shard_loss(net, sample["shards"][name])
            outputs[name] = logging_output  # the last call is the outer pass, at phi^K
            return loss

        def outer_context(i: int):
            last = i == len(names) - 1
            return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()

        # wav2vec 2.0 draws masks from numpy and negatives and dropout from torch. Seeding both
        # from the update and the batch (fairseq seeds torch per update only, numpy never) makes a
        # resumed run repeat an uninterrupted one, and makes a batch's update the same whichever
        # worker or update_freq slot computes it: N workers equal one process with N x update_freq.
        seed = batch_seed(self.cfg.seed, update_num, int(next(iter(sample["shards"].values()))["id"][0]))
        with data_utils.numpy_seed(seed), utils.set_torch_seed(seed):
            records = equilibrium_backward(
                module,
                [partial(shard_loss, model, n) for n in names],
                inner_steps=0 if ignore_grad else self.cfg.inner_steps,
                inner_lr=self.scheduled_inner_lr(optimizer),
                weights=weights,
                inner_closures=[partial(shard_loss, module, n) for n in names],
                backward=optimizer.backward,
                outer_context=outer_context,
                inner_loss_scale=_loss_scale(optimizer),
                measure_gradient_change=self.cfg.log_gradient_change and not ignore_grad,
                outer_loss_scale=_loss_scale(optimizer),
            )
            ddp = torch_ddp(model)
            if ddp is not None and ddp.require_backward_grad_sync and records[-1].dropped:
                self._synchronising_pass(model, criterion, sample["shards"][names[-1]], optimizer, amp)
        for name, record in zip(names, records):
            if record.dropped:
                logger.warning(
                    "update %d: shard %s left out: non-finite loss or inner gradient (loss at the shared "
                    "weights %s, inner losses %s); counted in dropped_%s",
                    update_num + 1, name, record.loss_before, record.inner_losses, name,
                )
        # With a loss scaler (fp16) fairseq itself skips an update whose gradient overflowed and
        # lowers the scale; otherwise it would stop the run with "gradients are Nan/Inf".
        if not ignore_grad and _loss_scaler(optimizer) is None and _zero_if_not_finite(module):
            logger.warning(
                "update %d: non-finite outer gradient from shards %s with finite losses: this worker's "
                "gradient for the update is zeroed (with update_freq > 1, its earlier batches' too); "
                "counted in dropped_<shard>", update_num + 1, ", ".join(names),
            )
            for record in records:
                record.dropped = True
        logging_output = criterion.update_logging_output(
            self.shard_names, dict(zip(names, records)), outputs, sample.get("unreadable"))
        return torch.tensor(logging_output["loss"]), 1, logging_output

    def scheduled_inner_lr(self, optimizer) -> float:
        """alpha for this update: inner_lr, scaled by the outer schedule under inner_lr_schedule=outer."""
        if self.cfg.inner_lr_schedule == "constant":
            return self.inner_lr
        return self.inner_lr * optimizer.get_lr() / float(self.cfg.outer_lr[0])

    def _synchronising_pass(self, model, criterion, shard, optimizer, amp: bool) -> None:
        """A forward and backward through torch's DDP that adds nothing to the gradient.

        Under c10d the gradient all-reduce rides on the backward pass of the update's last shard
        (the others run under no_sync). Had this worker left that shard out and skipped it, the
        workers' all-reduces would no longer pair up (a hang, or gloo's error); this pass takes
        its place. It runs on noise shaped like the shard's batch: the batch itself gave a
        non-finite loss, and 0 x NaN is NaN.
        """
        net_input = dict(shard["net_input"], source=0.1 * torch.randn_like(shard["net_input"]["source"]))
        with torch.autocast(device_type="cuda", enabled=amp):
            loss, _ = criterion.shard_loss(model, dict(shard, net_input=net_input))
        optimizer.backward(loss * 0.0)

    def valid_step(self, sample, model, criterion):
        model.eval()
        outputs: Dict[str, dict] = {}
        records = {} if self.cfg.validation_gap_steps > 0 else None
        for name, shard in sample["shards"].items():
            if records is not None:
                records[name], outputs[name] = self._validation_gap(shard, model, criterion)
            else:
                with torch.no_grad():
                    outputs[name] = criterion.shard_loss(model, shard)[1]
        logging_output = criterion.validation_logging_output(self.shard_names, outputs, records,
                                                             sample.get("unreadable"))
        return torch.tensor(logging_output["loss"]), 1, logging_output

    def _validation_gap(self, shard, model, criterion):
        """The shard's record of validation_gap_steps inner steps (loss before and after) and its
        log at the shared weights; θ is left as found."""
        module = unwrap(model)  # inner steps must not all-reduce
        lr = self.cfg.validation_gap_lr if self.cfg.validation_gap_lr is not None else self.inner_lr
        logs = []

        def shard_loss():
            loss, log = criterion.shard_loss(module, shard)
            logs.append(log)
            return loss

        with torch.enable_grad():
            record = equilibrium_backward(
                module, [shard_loss], self.cfg.validation_gap_steps, lr, backward=lambda loss: None
            )[0]
        return record, logs[0]


def _call_with_batching(make, batching: Batching, dataset, epoch: int):
    return make(dataset, epoch, batching)
