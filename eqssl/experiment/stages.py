"""The stages of one (preset, seed) chain: pre-training, the no-pre-training control, the gap, the
probe and fine-tuning, each leaving a verifiable record so that a rerun skips what finished."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..checkpoints import file_sha256
from ..corpus.presets import RECIPES
from .fairseq_log import per_shard, read_validations, trainings, validation_stats, validations
from .plan import (CONTROL, CONTROL_LABEL, PACKAGE, PretrainRun, ReproduceError, finetune_sets, phone_sets,
                   override_value, plan_pretraining, round1_ratios, rounds)
from .statistics import mean

MARKER = "eqssl_stage.json"

IN_PROCESS = threading.Lock()
"""Held by the work a stage does in this process (gap, divergence, probe, evaluation, random
init): fairseq's globals (its metrics) are not thread-safe, and one core's worth of Python is
what that work can use anyway. fairseq runs, each its own process, go on beside it."""


def finished(folder: str, input_sha256: Optional[str] = None, move_stale: bool = True) -> Optional[dict]:
    """The record of a finished stage whose checkpoint, and the checkpoint it started from, still
    verify; else None. A finished stage that no longer verifies is moved aside (never deleted)
    so that it is redone from scratch, unless move_stale is False."""
    path = os.path.join(folder, MARKER)
    if not os.path.exists(path):
        return None  # new, or interrupted: fairseq resumes it from its checkpoint_last.pt
    with open(path) as f:
        record = json.load(f)
    checkpoint = os.path.join(folder, record["checkpoint"])
    if (os.path.exists(checkpoint) and file_sha256(checkpoint) == record["sha256"]
            and record.get("input_sha256") == input_sha256):
        return record
    if not move_stale:
        return None
    stale = new_path(folder.rstrip(os.sep) + ".stale")
    os.rename(folder, stale)
    print(f"{folder}: its checkpoint or the one it started from changed since it finished; "
          f"moved to {stale} and redone", flush=True)
    return None


def mark_finished(folder: str, checkpoint: str, **extra) -> dict:
    record = {"checkpoint": checkpoint, "sha256": file_sha256(os.path.join(folder, checkpoint)), **extra}
    tmp = os.path.join(folder, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    os.replace(tmp, os.path.join(folder, MARKER))  # atomic: a marker is whole or absent
    return record


def keep_record(chain: "Chain", done: Dict[str, dict], stage_name: str, record: dict, parent: Optional[str] = None,
                pretrained: bool = False, recreated: bool = False) -> None:
    """Copy a finished stage's record to the records folder, with its weights' hash (pre-training
    and the control: ``pretrained``) and its parent's (the run it started from or measured)."""
    if chain.records is None:
        return
    from .records import keep, weights_of

    weights = weights_of(os.path.join(chain.folder, stage_name), record) if pretrained else None
    parent_weights = weights_of(os.path.join(chain.folder, parent), done[parent]) if parent in done else None
    keep(chain.records, chain.identity, chain.preset, chain.seed, stage_name, record, weights, parent, parent_weights,
         recreated)


FAIRSEQ_ENTRY_NOTICES = ("ignore:`torch.jit.script` is deprecated:FutureWarning",
                         "ignore::UserWarning:fairseq_cli.hydra_train")
"""Warning filters (``-W`` syntax) for the two notices fairseq's entry points print before any
plugin loads: torch's on fairseq's torch.jit.script decorators, and hydra's on fairseq's
``@hydra.main`` (no ``version_base``); neither is the user's to act on (docs/training.md)."""


def run_fairseq(command: List[str], log_path: str, tag: str, max_update: Optional[int], threads: int) -> None:
    """Run a fairseq command, its output appended to log_path, printing progress at each validation."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONWARNINGS=",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *FAIRSEQ_ENTRY_NOTICES])))
    start = time.time()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:
            log.write(line)
            stats = validation_stats(line, subset=None)
            if stats is not None and max_update:
                print(f"{tag}: {stats.get('num_updates', math.nan):.0f}/{max_update} updates, valid loss "
                      f"{stats.get('loss', math.nan):.3f} ({time.time() - start:.0f} s)", flush=True)
        code = process.wait()
    if code != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise ReproduceError(f"{tag} failed (exit {code}); log: {log_path}\n{tail}")


def checkpoint_updates(path: str) -> tuple:
    """(num_updates, task config, chance accuracy) of a fairseq pre-training checkpoint; chance is
    1 / (negatives + 1) for wav2vec 2.0 and CPC and None for BEST-RQ (read from its log: ``majority``)."""
    from ..models.eq_wav2vec2 import checkpoint_family, load_pretraining_checkpoint

    state = load_pretraining_checkpoint(path)
    model_cfg = state["cfg"]["model"]
    family = checkpoint_family(model_cfg.get("_name"))
    if family == "eq_bestrq":
        chance = None
    else:  # contrastive: the positive against num_negatives others (the model's own default if unrecorded)
        from ..models.eq_cpc import EqCpcConfig

        default = EqCpcConfig.num_negatives if family == "eq_cpc" else 100
        chance = 1.0 / (int(model_cfg.get("num_negatives") or default) + 1)
    return int(state["optimizer_history"][-1]["num_updates"]), state["cfg"]["task"], chance


def last_validation_accuracy(log_path: str, key: str = "accuracy") -> Dict[str, float]:
    """Per shard, ``key`` (the accuracy; for BEST-RQ also ``majority``, the majority code's share)
    at the last validation in a fairseq training log."""
    found = read_validations(log_path)
    return per_shard(found[-1], key) if found else {}


def passes(num_updates: int, task_cfg) -> int:
    """Forward/backward passes over one shard batch that num_updates updates of this task made."""
    shards = len([s for s in os.listdir(task_cfg["data"])
                  if os.path.exists(os.path.join(task_cfg["data"], s, "train.tsv"))])
    if task_cfg.get("shard_sampling") == "temperature" and task_cfg.get("shards_per_update"):
        shards = task_cfg["shards_per_update"]
    return num_updates * shards * (int(task_cfg["inner_steps"]) + 1)


# ------------------------------------------------------------------ stages of one seed
@dataclass
class Chain:
    """Everything one (preset, seed) needs; picklable for a worker process."""

    preset: str
    seed: int
    out: str
    settings: dict
    threads: int
    lanes: int = 1
    """Stages of this chain that run at once (each fairseq run with ``threads`` threads)."""
    rounds: Optional[Tuple[int, int]] = None
    """The rounds this run of the chain measures (first, last), a cell; None: every round. The
    earlier rounds' checkpoints they start from are recreated if they are not on this machine."""
    records: Optional[str] = None
    """The records folder (eqssl.experiment.records) each finished stage's record is copied to."""
    identity: Optional[dict] = None
    """What every record of this run carries: experiment, settings_sha256, commit, reference_seconds."""

    @property
    def tag(self) -> str:
        return f"[{self.preset} seed {self.seed}]"

    @property
    def folder(self) -> str:
        return os.path.join(self.out, self.preset, f"seed{self.seed}")

    @property
    def corpus(self) -> str:
        return os.path.join(self.out, self.preset, "corpus")


def pretrain_command(run: PretrainRun, data: str, save_dir: str, seed: int, init: Optional[str]) -> List[str]:
    """The fairseq-hydra-train command of one pre-training run of the experiment."""
    return ["fairseq-hydra-train", "--config-dir", os.path.join(RECIPES, "pretrain"), "--config-name", run.recipe,
            f"++task.data={os.path.abspath(data)}", f"checkpoint.save_dir={os.path.abspath(save_dir)}",
            f"common.seed={seed}", f"common.user_dir={PACKAGE}",
            f"common.tensorboard_logdir={os.path.join(os.path.abspath(save_dir), 'tensorboard')}", *run.overrides,
            *([f"++model.init_from={os.path.abspath(init)}"] if init else [])]


def pretrain(chain: Chain, run: PretrainRun, done: Dict[str, dict]) -> dict:
    """Stage: one pre-training run, then the equilibrium gap of its checkpoint."""
    record, seconds = train(chain, run, done)
    with IN_PROCESS:
        return finish_pretraining(chain, run, done, record, seconds)


def train(chain: Chain, run: PretrainRun, done: Dict[str, dict]) -> Tuple[Optional[dict], float]:
    """The fairseq run of a pre-training stage (needs ``done[run.init_from]``): (the stage's
    record if it finished before and still verifies, else None; the run's seconds)."""
    folder = os.path.join(chain.folder, run.name)
    source = done[run.init_from] if run.init_from else None
    record = finished(folder, source["sha256"] if source else None)
    if record is not None:
        return record, 0.0
    os.makedirs(folder, exist_ok=True)
    start = time.time()
    init = os.path.join(chain.folder, run.init_from, source["checkpoint"]) if source else None
    max_update = int(override_value(run.overrides, "optimization.max_update") or 0)
    print(f"{chain.tag} {run.name}: {run.label}{' from ' + run.init_from if run.init_from else ''}", flush=True)
    command = pretrain_command(run, os.path.join(chain.corpus, "pretrain"), folder, chain.seed, init)
    run_fairseq(command, os.path.join(folder, "train.log"), f"{chain.tag} {run.name}", max_update, chain.threads)
    return None, time.time() - start


def finish_pretraining(chain: Chain, run: PretrainRun, done: Dict[str, dict], record: Optional[dict],
                       seconds: float) -> dict:
    """The rest of a pre-training stage once :func:`train` gave ``record`` and ``seconds``
    (needs ``done[run.twin]``): its checkpoint's gap, accuracy and divergence from its twin, in
    its record; a finished stage's record, its divergence brought up to date."""
    folder = os.path.join(chain.folder, run.name)
    source = done[run.init_from] if run.init_from else None
    if record is not None:
        print(f"{chain.tag} {run.name}: done, skipped ({record['num_updates']} updates)", flush=True)
        if run.twin and (record.get("divergence") or {}).get("twin_sha256") != done[run.twin]["sha256"]:
            record = rewrite_record(folder, record, divergence=divergence_from_twin(chain, run, done))
        return record
    start = time.time() - seconds
    updates, task_cfg, chance = checkpoint_updates(os.path.join(folder, "checkpoint_last.pt"))
    accuracy = last_validation_accuracy(os.path.join(folder, "train.log"))
    if chance is None:  # BEST-RQ: the largest majority-code share over the shards (conservative)
        chance = max(last_validation_accuracy(os.path.join(folder, "train.log"), "majority").values(),
                     default=math.nan)
    gap = measure(chain, os.path.join(folder, run.checkpoint))
    log_path = os.path.join(folder, "train.log")
    start_loss = _last_validation_loss(os.path.join(chain.folder, run.init_from, "train.log")) if run.init_from else None
    warnings = divergence_warnings(log_path, f"{chain.tag} {run.name}", start_loss)
    for warning in warnings:
        print(f"WARNING: {warning}", flush=True)
        with open(log_path, "a") as log:
            log.write(f"eqssl-reproduce WARNING: {warning}\n")
    record = mark_finished(
        folder, run.checkpoint, input_sha256=source["sha256"] if source else None, name=run.name, label=run.label,
        init_from=run.init_from, round=run.round, ratio=run.ratio, twin=run.twin, against=run.against,
        schedule=run.schedule, num_updates=updates, inner_steps=int(task_cfg["inner_steps"]),
        passes=passes(updates, task_cfg), gap=gap, valid_accuracy=accuracy, chance=chance,
        gradient_change=mean_training_values(log_path, "grad_change"), warnings=warnings,
        divergence=divergence_from_twin(chain, run, done) if run.twin else None, seconds=round(time.time() - start, 1),
    )
    lowest = min(accuracy.values()) if accuracy else math.nan
    moved = (f", trajectory divergence from its twin {record['divergence']['value']:.3f}"
             if record["divergence"] else "")
    print(f"{chain.tag} {run.name}: finished, {updates} updates, validation accuracy {lowest:.3f} on its lowest "
          f"shard ({lowest / chance:.1f}x chance), mean gap {mean(g['gap'] for g in gap.values()):+.4f} bits"
          f"{moved} ({record['seconds']:.0f} s)", flush=True)
    return record


def rewrite_record(folder: str, record: dict, **changes) -> dict:
    """A finished stage's record with some fields replaced (its checkpoint is unchanged)."""
    extra = {k: v for k, v in record.items() if k not in ("checkpoint", "sha256")}
    return mark_finished(folder, record["checkpoint"], **{**extra, **changes})


def _model_vector(path: str):
    """All floating-point weights of a pre-training checkpoint, as one float64 vector."""
    import torch

    from ..models.eq_wav2vec2 import load_pretraining_checkpoint

    state = load_pretraining_checkpoint(path)["model"]
    return torch.cat([t.double().flatten() for _, t in sorted(state.items()) if torch.is_floating_point(t)])


def trajectory_divergence(run: str, twin: str, start: str) -> float:
    """‖θ_run − θ_twin‖ / ‖θ_twin − θ_start‖ over every weight: how far the constraint took the
    run from where the same run without it went, relative to how far that went."""
    theta, twin_theta, start_theta = _model_vector(run), _model_vector(twin), _model_vector(start)
    return float((theta - twin_theta).norm() / (twin_theta - start_theta).norm())


def divergence_from_twin(chain: Chain, run: PretrainRun, done: Dict[str, dict]) -> dict:
    """The trajectory divergence of a PTLOC run from its twin, with the twin's checkpoint hash."""
    def path(name: str) -> str:
        return os.path.join(chain.folder, name, done[name]["checkpoint"] if name in done else run.checkpoint)

    return {"twin": run.twin, "twin_sha256": done[run.twin]["sha256"],
            "value": trajectory_divergence(path(run.name), path(run.twin), path(run.init_from))}


def mean_training_values(log_path: str, prefix: str) -> Dict[str, float]:
    """Per shard, the mean of ``<prefix>_<shard>`` over every train_inner line of a log (each line
    averages log_interval updates, so this is the mean per update)."""
    with open(log_path) as f:
        lines = [per_shard(stats, prefix) for stats in trainings(f)]
    shards = sorted({s for line in lines for s in line})
    return {s: mean(line[s] for line in lines if s in line) for s in shards}


def _last_validation_loss(log_path: str) -> Optional[float]:
    found = read_validations(log_path) if os.path.exists(log_path) else []
    return found[-1].get("loss") if found else None


DIVERGENCE_MARGIN_BITS = 0.5
"""A run whose validation loss rises this far above its start's is reported as diverging."""
DIVERGENCE_STRETCH = 3
"""... as is one whose inner steps raise the loss on most shards in this many training lines in a row."""


def divergence_warnings(log_path: str, run: str, start_loss: Optional[float]) -> List[str]:
    """Why a run looks as if it is diverging, each naming the run and the update: its inner steps
    raising the loss (loss_after > loss_before) on most shards for DIVERGENCE_STRETCH training
    lines in a row, or its validation loss rising DIVERGENCE_MARGIN_BITS above its start's."""
    found: List[str] = []
    with open(log_path) as f:
        lines = f.readlines()
    stretch = 0
    for stats in trainings(lines):
        before, after = per_shard(stats, "loss_before"), per_shard(stats, "loss_after")
        worse = [s for s in before if s in after and after[s] > before[s]]
        stretch = stretch + 1 if before and len(worse) > len(before) / 2 else 0
        if stretch == DIVERGENCE_STRETCH:
            found.append(f"{run}: the inner step raised the loss on most shards ({', '.join(worse)}) in "
                         f"{stretch} training log lines in a row, up to update {stats.get('num_updates', math.nan):.0f}: "
                         "alpha is too large for this model")
            break
    if start_loss is not None:
        for stats in validations(lines):
            if stats.get("loss", -math.inf) > start_loss + DIVERGENCE_MARGIN_BITS:
                found.append(f"{run}: validation loss {stats['loss']:.3f} at update {stats.get('num_updates', math.nan):.0f} "
                             f"is {stats['loss'] - start_loss:.2f} bits above its start's ({start_loss:.3f})")
                break
    return found


def random_init(chain: Chain, done: Dict[str, dict]) -> dict:
    """Stage: the no-pre-training control, CSSL.1's architecture with fresh weights (seed: the chain's)."""
    from ..models.eq_wav2vec2 import save_random_init

    folder = os.path.join(chain.folder, CONTROL)
    record = finished(folder)
    if record is not None:
        return record
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "random_init.pt")
    if not os.path.exists(path):  # else left whole by an interrupted stage (written atomically)
        save_random_init(os.path.join(chain.folder, "cssl.1", done["cssl.1"]["checkpoint"]), path, chain.seed)
    gap = measure(chain, path)
    return mark_finished(folder, "random_init.pt", name=CONTROL, label=CONTROL_LABEL, init_from=None,
                         round=1, num_updates=0, inner_steps=0, passes=0, gap=gap,
                         valid_accuracy={}, chance=math.nan, seconds=0.0)


def measure(chain: Chain, checkpoint: str) -> Dict[str, dict]:
    """eqssl-gap of one checkpoint on the validation batches of every pre-training shard."""
    from ..measures.gap import measure_gap
    from ..tasks.equilibrium_pretraining import discover_shards

    gap = chain.settings["gap"]
    data = os.path.join(chain.corpus, "pretrain")
    args = argparse.Namespace(split="valid", inner_steps=gap["inner_steps"], inner_lr=gap["inner_lr"],
                              max_tokens=64000, max_sample_size=48000, min_sample_size=0,
                              batches=gap["batches"], seed=chain.seed)
    return measure_gap(checkpoint, data, discover_shards(data, ""), args)


def finetune_command(recipe: str, data: str, pretrained: str, save_dir: str, overrides: Sequence[str]) -> List[str]:
    """The fairseq-hydra-train command of one CTC fine-tuning run with a recipes/finetune recipe."""
    return ["fairseq-hydra-train", "--config-dir", os.path.join(RECIPES, "finetune"), "--config-name", recipe,
            f"task.data={os.path.abspath(data)}", f"model.w2v_path={os.path.abspath(pretrained)}",
            f"checkpoint.save_dir={os.path.abspath(save_dir)}", f"common.user_dir={PACKAGE}",
            f"common.tensorboard_logdir={os.path.join(os.path.abspath(save_dir), 'tensorboard')}", *overrides]


def measuring_stage(chain: Chain, kind: str, name: str, set_name: str, input_sha256: Optional[str]) -> tuple:
    """(folder, record) of one measuring stage, OUT/PRESET/seedS/KIND/NAME/SET: its record if it
    finished and still verifies, else None with the folder made, ready to run."""
    folder = os.path.join(chain.folder, kind, name, set_name)
    record = finished(folder, input_sha256)
    if record is None:
        os.makedirs(folder, exist_ok=True)
    return folder, record


def finetune(chain: Chain, name: str, pretrained: str, pretrained_sha256: str, set_name: str) -> dict:
    """Stage: CTC fine-tuning of one pre-trained checkpoint on one set, then its test WER / CER."""
    from ..measures.evaluation import evaluate

    folder, record = measuring_stage(chain, "finetune", name, set_name, pretrained_sha256)
    if record is not None:
        return record
    settings = chain.settings["finetune"]
    data = os.path.abspath(os.path.join(chain.corpus, "finetune", set_name))
    start = time.time()
    command = finetune_command(settings["recipe"], data, pretrained, folder, [
        f"common.seed={chain.seed}", f"optimization.max_update={settings['max_update']}",
        *settings.get("overrides", []), *(settings.get("preset_overrides") or {}).get(chain.preset, [])])
    run_fairseq(command, os.path.join(folder, "train.log"), f"{chain.tag} finetune {name}/{set_name}", None,
                chain.threads)
    with IN_PROCESS:
        report = evaluate(os.path.join(folder, "checkpoint_best.pt"), [f"{set_name}={data}:test"], progress=False)
    result = report["sets"][set_name]
    record = mark_finished(folder, "checkpoint_best.pt", input_sha256=pretrained_sha256, pretrained=name,
                           set=set_name, wer=result["wer"], cer=result["cer"], seconds=round(time.time() - start, 1))
    print(f"{chain.tag} finetune {name}/{set_name}: WER {100 * result['wer']:.1f} CER {100 * result['cer']:.1f} "
          f"({record['seconds']:.0f} s)", flush=True)
    return record


def probe_config(chain: Chain):
    from ..measures.ctc_probe import ProbeConfig

    fields = {k: v for k, v in (chain.settings.get("probe") or {}).items() if k not in ("fbank", "keep_features", "checkpoints")}
    return ProbeConfig(seed=chain.seed, **fields)


def run_probe(chain: Chain, name: str, upstream, upstream_sha256: Optional[str], set_name: str) -> dict:
    """Stage: the frozen-upstream probe of one checkpoint (or FBANK) on one set, with its test WER / CER;
    ``upstream``: an eqssl.measures.features.Upstream, shared by the checkpoint's sets (it loads the encoder once)."""
    import torch

    from ..measures.ctc_probe import probe

    folder, record = measuring_stage(chain, "probe", name, set_name, upstream_sha256)
    if record is not None:
        return record
    start = time.time()
    data = os.path.abspath(os.path.join(chain.corpus, "finetune", set_name))
    result = probe(upstream.source, data, probe_config(chain), os.path.join(chain.out, chain.preset, "features"),
                   set_name, upstream=upstream)
    torch.save(result.pop("head_state"), os.path.join(folder, "probe_head.pt"))
    record = mark_finished(folder, "probe_head.pt", input_sha256=upstream_sha256, upstream=name, set=set_name,
                           wer=result["wer"], cer=result["cer"], layer_weights=result["layer_weights"],
                           final_train_loss=result["final_train_loss"], seconds=round(time.time() - start, 1))
    print(f"{chain.tag} probe {name}/{set_name}: WER {100 * result['wer']:.1f} CER {100 * result['cer']:.1f} "
          f"({record['seconds']:.0f} s)", flush=True)
    return record


def phones_config(chain: Chain) -> dict:
    """The settings of ABX and the phone probe (``phones``): the layer scored, the splits."""
    cfg = {"layer": 0, "train_split": "train_1h", "test_split": "test", **(chain.settings.get("phones") or {})}
    cfg.setdefault("abx_split", cfg["test_split"])
    return cfg


def run_phones(chain: Chain, name: str, upstream, upstream_sha256: Optional[str], set_name: str) -> dict:
    """Stage: ABX (within and across speakers, on the item file of ``phones.abx_split``, the test
    split by default) and the phone probe (fitted on the train split, scored on the test split) of
    one checkpoint (or FBANK) on one set, every layer; deterministic,
    so the same checkpoint always gives the same record."""
    from ..measures.abx import abx_of_upstream
    from ..measures.phone_probe import phone_probe

    folder, record = measuring_stage(chain, "phones", name, set_name, upstream_sha256)
    if record is not None:
        return record
    start = time.time()
    cfg = phones_config(chain)
    data = os.path.abspath(os.path.join(chain.corpus, "finetune", set_name))
    cache = os.path.join(chain.out, chain.preset, "features")
    abx_start = time.time()
    abx = abx_of_upstream(upstream, os.path.join(data, f"{cfg['abx_split']}.item"), cache)
    abx_seconds = time.time() - abx_start
    probed = phone_probe(upstream, data, cache, cfg["train_split"], cfg["test_split"])
    layers = {str(layer): {"abx_within": abx[layer]["within"], "abx_across": abx[layer]["across"],
                           "abx_within_pairs": abx[layer]["within_pairs"], "abx_across_pairs": abx[layer]["across_pairs"],
                           "phone_error": probed[layer]["error"], "phone_frames": probed[layer]["frames"]}
              for layer in sorted(abx)}
    with open(os.path.join(folder, "phones.json"), "w") as f:
        json.dump({"upstream": upstream.source, "set": set_name, "frame_step": upstream.frame_step,
                   "layers": layers}, f, indent=2)
    layer = str(cfg["layer"] if upstream.model is not None else 0)
    if layer not in layers:
        raise ReproduceError(f"{chain.settings['path']}: phones.layer {layer}: {name} has layers 0-{len(layers) - 1}")
    record = mark_finished(folder, "phones.json", input_sha256=upstream_sha256, upstream=name, set=set_name,
                           layers=layers, abx_split=cfg["abx_split"], abx_seconds=round(abx_seconds, 1),
                           seconds=round(time.time() - start, 1))
    shown = layers[layer]
    print(f"{chain.tag} phones {name}/{set_name} (layer {layer}): ABX within {shown['abx_within']:.2f} % across "
          f"{shown['abx_across']:.2f} %, phone error {shown['phone_error']:.1f} % ({record['seconds']:.0f} s)",
          flush=True)
    return record


PHONE_MEASURES = {"abx_within": "abx_within", "abx_across": "abx_across", "phone_probe": "phone_error"}
"""The report's measures (report.MEASURES) that a phones record holds, and its field of each (percent)."""


def phone_measures(records: Dict[str, dict], layer: int) -> Dict[str, Dict[str, dict]]:
    """Per measure and set, the report's cell of a checkpoint's phones records at ``layer`` (FBANK's
    only one for FBANK): the error as a fraction. The layer is read here, not when the record was
    made, so that every layer's record serves whichever one the settings fix."""
    def at(record: dict) -> dict:
        layers = record["layers"]
        return layers["0"] if record.get("upstream") == "fbank" else layers[str(layer)]

    def cell(record: dict, key: str) -> dict:
        found = at(record)
        return {"error": found[key] / 100, **({"pairs": found[f"{key}_pairs"]} if f"{key}_pairs" in found else {})}

    return {measure: {s: cell(r, key) for s, r in records.items()} for measure, key in PHONE_MEASURES.items()}


class Progress:
    """Where a chain stands: stages done of its total, time elapsed, and the time left, estimated
    per kind of stage from the ones that ran in this sitting (pre-training per update, probes and
    fine-tuning per run; skipped stages cost nothing and are not counted) over the chain's lanes."""

    def __init__(self, chain: Chain, work: Dict[str, float], stages: int) -> None:
        self.chain, self.left, self.total, self.done = chain, dict(work), stages, 0
        self.spent: Dict[str, List[float]] = {kind: [0.0, 0.0] for kind in work}  # seconds, work
        self.start = time.time()
        self.lock = threading.Lock()

    def step(self, kind: str, work: float, seconds: float) -> None:
        """One stage of ``kind`` and ``work`` finished after running ``seconds``."""
        with self.lock:
            if seconds > 1.0:  # ran, not skipped
                self.spent[kind][0] += seconds
                self.spent[kind][1] += work
            self.left[kind] -= work
            self.done += 1
            known = [k for k, (_, done) in self.spent.items() if done]
            left = sum(self.left[k] * self.spent[k][0] / self.spent[k][1] for k in known) / self.chain.lanes
            untimed = [k for k in self.left if self.left[k] > 0 and k not in known]
            estimate = f", about {duration(left)} left" if known else ""
            if known and untimed:
                estimate += f" and the {', '.join(untimed)} stages, not yet timed"
            print(f"{self.chain.tag} progress: {self.done}/{self.total} stages, {duration(time.time() - self.start)} "
                  f"elapsed{estimate}", flush=True)


@dataclass
class Stage:
    """One piece of a chain's work and the stages it waits for."""

    name: str
    run: Callable[[], None]
    after: Tuple[str, ...] = ()
    work: float = 1.0
    """How long it runs, in any unit shared by the chain's stages (see :func:`run_stages`)."""


def work_ahead(stages: List[Stage]) -> Dict[str, float]:
    """Per stage, its work plus that of the longest string of stages waiting on it, one on the
    next: the time the chain needs from its start at the least."""
    waiting: Dict[str, List[Stage]] = {s.name: [] for s in stages}
    for s in stages:
        for name in s.after:
            waiting.setdefault(name, []).append(s)
    ahead: Dict[str, float] = {}

    def of(stage: Stage) -> float:
        if stage.name not in ahead:
            ahead[stage.name] = stage.work + max((of(t) for t in waiting[stage.name]), default=0.0)
        return ahead[stage.name]

    for s in stages:
        of(s)
    return ahead


def run_stages(stages: List[Stage], lanes: int) -> None:
    """Every stage once all those it waits for have finished, ``lanes`` at a time (threads: a
    stage's heavy work is a fairseq process or holds IN_PROCESS); a free lane takes the ready
    stage with the most work ahead (:func:`work_ahead`), so that the longest string of runs
    starts first. One lane runs them in list order, which must then respect ``after``. Once an
    error is seen no stage starts; those running finish (their work is kept for a rerun); then
    the error is raised."""
    if lanes == 1:
        for stage in stages:
            stage.run()
        return
    ahead = work_ahead(stages)
    pending, finished, running, error = list(stages), set(), {}, None
    with concurrent.futures.ThreadPoolExecutor(lanes) as pool:
        while True:
            ready = [s for s in pending if set(s.after) <= finished] if error is None else []
            while ready and len(running) < lanes:
                stage = max(ready, key=lambda s: ahead[s.name])  # the first of the largest
                ready.remove(stage)
                pending.remove(stage)
                running[pool.submit(stage.run)] = stage
            if not running:
                break
            ended, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in ended:
                stage = running.pop(future)
                if future.exception() is None:
                    finished.add(stage.name)
                elif error is None:
                    error = future.exception()
    if error is not None:
        raise error
    if pending:
        raise ReproduceError(f"stages wait for stages that do not exist: {', '.join(s.name for s in pending)}")


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 40 s, 12 min, 3.5 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _quiet(chain: Chain) -> None:
    import logging
    import warnings

    import torch

    torch.set_num_threads(chain.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fairseq").setLevel(logging.WARNING)  # in-process gap and evaluation: progress lines only
    warnings.filterwarnings("ignore")


@contextlib.contextmanager
def stage(chain: Chain, name: str, folder: str) -> Iterator[None]:
    """Any error inside one stage becomes a ReproduceError naming the chain, the stage and its log."""
    try:
        yield
    except ReproduceError:
        raise
    except Exception as error:
        log = os.path.join(folder, "train.log")
        where = f"log: {log}" if os.path.isfile(log) else f"folder: {folder}"
        raise ReproduceError(f"{chain.tag} {name} failed ({where})\n{type(error).__name__}: {error}") from error


CHAIN_RATIO = "chain_ratio.json"
"""OUT/PRESET/chain_ratio.json: the α/β the rule chose for rounds >= 2, with its evidence."""


def chain_ratio(chain: Chain) -> Optional[float]:
    """The α/β of rounds >= 2: the only ratio, or the one recorded under OUT/PRESET (None: not chosen yet)."""
    ratios = round1_ratios(chain.settings)
    if len(ratios) == 1:
        return ratios[0]
    path = os.path.join(chain.out, chain.preset, CHAIN_RATIO)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return float(json.load(f)["ratio"])


def needs_chain_ratio(preset: str, settings: dict) -> bool:
    return rounds(preset, settings) > 1 and len(round1_ratios(settings)) > 1


def pretrain_round1(chain: Chain) -> Dict[str, dict]:
    """Stage group: every round-1 pre-training run of the chain (and the no-pre-training control)."""
    _quiet(chain)
    done: Dict[str, dict] = {}
    for run in plan_pretraining(chain.preset, chain.settings):
        if run.round == 1:
            with stage(chain, run.name, os.path.join(chain.folder, run.name)):
                done[run.name] = pretrain(chain, run, done)
                keep_record(chain, done, run.name, done[run.name], run.init_from, pretrained=True)
            if run.name == "cssl.1" and chain.settings.get("control"):
                with stage(chain, CONTROL, os.path.join(chain.folder, CONTROL)):
                    done[CONTROL] = random_init(chain, done)
                    keep_record(chain, done, CONTROL, done[CONTROL], pretrained=True)
    return done


@dataclass
class Step:
    """One stage of a chain as planned, before anything runs: what :func:`run_chain` runs and what
    eqssl.experiment.cells estimates."""

    name: str
    kind: str
    """train (a fairseq pre-training run), finish (its gap and record), control (random init),
    measure (a checkpoint's or FBANK's ABX, phone probe and CTC probe on every set) or finetune."""
    after: Tuple[str, ...] = ()
    run: Optional[str] = None
    """The pre-training run (or "fbank") it is about."""
    set_name: Optional[str] = None
    work: float = 1.0
    """Its share of the chain for run_stages' ordering: updates x passes for a train step."""
    passes: int = 0
    """Shard batches a train step runs forward and backward (updates x shards x passes per update)."""
    phone_sets: int = 0
    probe_sets: int = 0
    recreated: bool = False
    """A run of an earlier round that a cell needs as its start: trained again, not measured."""


def pretrain_shards(preset: str, settings: dict) -> int:
    from .plan import preset_sets

    return len(preset_sets(preset, settings).pretrain)


def chain_steps(preset: str, settings: dict, ratio: Optional[float],
                cell: Optional[Tuple[int, int]] = None) -> Tuple[List[PretrainRun], List[str], List[Step]]:
    """(the pre-training runs, the checkpoints measured, every step) of one chain or of the cell of
    its rounds ``cell`` (first, last): the cell's runs, the earlier runs they start from (recreated:
    pre-training only), the measures of the cell's checkpoints (and of random init and FBANK with
    round 1), and fine-tuning."""
    plan = plan_pretraining(preset, settings, ratio)
    first, last = cell or (1, max(r.round for r in plan))
    wanted = {r.name for r in plan if first <= r.round <= last}
    by_name, needed = {r.name: r for r in plan}, set(wanted)
    stack = list(wanted)
    while stack:  # the runs a cell's runs start from, and their twins, back to CSSL.1
        run = by_name[stack.pop()]
        for other in (run.init_from, run.twin):
            if other and other not in needed:
                needed.add(other)
                stack.append(other)
    plan = [r for r in plan if r.name in needed]
    sets = finetune_sets(preset, settings)
    measured = phone_sets(preset, settings)
    control = bool(settings.get("control")) and first == 1
    names = [n for r in plan if r.name in wanted for n in ([r.name, CONTROL] if r.name == "cssl.1" and control else [r.name])]
    shards, k = pretrain_shards(preset, settings), int(settings["inner_steps"])
    steps: List[Step] = []
    for run in plan:
        updates = int(run.schedule.get("max_update", 0))
        per_update = 1 + k if run.ratio is not None else 1
        sampled = override_value(run.overrides, "++task.shards_per_update")
        source = (run.init_from,) if run.init_from else ()
        recreated = run.name not in wanted
        steps.append(Step(f"train {run.name}", "train", source, run.name, work=float(updates * per_update),
                          passes=updates * per_update * (int(sampled) if sampled else shards), recreated=recreated))
        steps.append(Step(run.name, "finish", (f"train {run.name}", *source, *((run.twin,) if run.twin else ())),
                          run.name, work=0.0, recreated=recreated))
        if run.name == "cssl.1" and control:
            steps.append(Step(CONTROL, "control", ("cssl.1",), CONTROL))
    if first == 1 and (fbank_probed(settings) or measured):
        steps.append(Step("probe fbank", "measure", (), "fbank", phone_sets=len(measured),
                          probe_sets=len(sets) if fbank_probed(settings) else 0))
    if settings.get("probe") or measured:
        steps += [Step(f"probe {n}", "measure", (n,), n, phone_sets=len(measured),
                       probe_sets=len(sets) if ctc_probed(n, settings) else 0) for n in names]
    steps += [Step(f"finetune {n}/{s}", "finetune", (n,), n, s)  # last: the probes rank the checkpoints sooner
              for n in finetuned({n: None for n in names}, settings) for s in sets]
    return plan, names, steps


def run_chain(chain: Chain) -> dict:
    """All stages of one (preset, seed), or of the cell of its rounds ``chain.rounds``: pre-training
    runs with their gaps, then the measures and fine-tuning of every checkpoint, ``chain.lanes``
    stages at a time. Rounds >= 2 need the chain's α/β chosen (CHAIN_RATIO)."""
    from ..measures.features import FBANK, Upstream

    _quiet(chain)
    ratio = chain_ratio(chain)
    if ratio is None and needs_chain_ratio(chain.preset, chain.settings):
        raise ReproduceError(f"{chain.tag}: rounds >= 2 need {CHAIN_RATIO}, which is chosen once every seed's "
                             "round 1 has finished")
    plan, names, steps = chain_steps(chain.preset, chain.settings, ratio, chain.rounds)
    by_name = {r.name: r for r in plan}
    sets = finetune_sets(chain.preset, chain.settings)
    measured = phone_sets(chain.preset, chain.settings)
    updates = {r.name: float(r.schedule.get("max_update", 0)) for r in plan}
    count = {kind: sum(1 for s in steps if s.kind == kind) for kind in ("control", "finetune")}
    phoned = sum(s.phone_sets for s in steps)
    probed = sum(s.probe_sets for s in steps)
    progress = Progress(chain, {"pre-training": sum(updates.values()), "control": float(count["control"]),
                                "phones": float(phoned), "probe": float(probed),
                                "fine-tuning": float(count["finetune"])},
                        len(plan) + count["control"] + phoned + probed + count["finetune"])
    done: Dict[str, dict] = {}
    trained: Dict[str, Tuple[Optional[dict], float]] = {}
    probes: Dict[str, Dict[str, dict]] = {}
    phones: Dict[str, Dict[str, dict]] = {}
    tunes: Dict[str, Dict[str, dict]] = {}
    cache = os.path.join(chain.out, chain.preset, "features")

    def timed(kind: str, work: float, function: Callable[[], None]) -> None:
        start = time.time()
        function()
        progress.step(kind, work, time.time() - start)

    def fit(run: PretrainRun) -> None:
        with stage(chain, run.name, os.path.join(chain.folder, run.name)):
            trained[run.name] = train(chain, run, done)

    def finish(run: PretrainRun, recreated: bool) -> None:
        start = time.time()
        with stage(chain, run.name, os.path.join(chain.folder, run.name)), IN_PROCESS:
            done[run.name] = finish_pretraining(chain, run, done, *trained[run.name])
            keep_record(chain, done, run.name, done[run.name], run.init_from, pretrained=True, recreated=recreated)
        progress.step("pre-training", updates[run.name], trained[run.name][1] + time.time() - start)

    def no_pretraining() -> None:
        with stage(chain, CONTROL, os.path.join(chain.folder, CONTROL)), IN_PROCESS:
            done[CONTROL] = random_init(chain, done)
            keep_record(chain, done, CONTROL, done[CONTROL], pretrained=True)

    def probe_all(name: str) -> None:
        """Every set's measures of one checkpoint (or FBANK), its encoder loaded once: ABX and the
        phone probe, then the CTC probe (all from the same cached features)."""
        probes[name], phones[name] = {}, {}
        record = done.get(name)
        sha256 = None if record is None else record["sha256"]
        loaded = []

        def upstream() -> Upstream:
            if not loaded:
                loaded.append(Upstream(FBANK if record is None else os.path.join(chain.folder, name, record["checkpoint"])))
            return loaded[0]

        for s in measured:
            start = time.time()
            with stage(chain, f"phones {name}/{s}", os.path.join(chain.folder, "phones", name, s)), IN_PROCESS:
                phones[name][s] = run_phones(chain, name, upstream(), sha256, s)
                keep_record(chain, done, f"phones/{name}/{s}", phones[name][s], name)
            progress.step("phones", 1.0, time.time() - start)
        probing = ctc_probed(name, chain.settings)
        for s in sets if probing else {}:
            start = time.time()
            with stage(chain, f"probe {name}/{s}", os.path.join(chain.folder, "probe", name, s)), IN_PROCESS:
                probes[name][s] = run_probe(chain, name, upstream(), sha256, s)
                keep_record(chain, done, f"probe/{name}/{s}", probes[name][s], name)
            progress.step("probe", 1.0, time.time() - start)
        if record is not None and not (chain.settings.get("probe") or {}).get("keep_features", False):
            # Its features serve only its own measures, which have all finished: the cache stays bounded.
            shutil.rmtree(os.path.join(cache, record["sha256"]), ignore_errors=True)

    def finetune_one(name: str, s: str) -> None:
        record = done[name]
        with stage(chain, f"finetune {name}/{s}", os.path.join(chain.folder, "finetune", name, s)):
            tunes.setdefault(name, {})[s] = finetune(chain, name, os.path.join(chain.folder, name, record["checkpoint"]),
                                                     record["sha256"], s)
            keep_record(chain, done, f"finetune/{name}/{s}", tunes[name][s], name)

    def action(step: Step) -> Callable[[], None]:
        if step.kind == "train":
            return lambda: fit(by_name[step.run])
        if step.kind == "finish":
            return lambda: finish(by_name[step.run], step.recreated)
        if step.kind == "control":
            return lambda: timed("control", 1.0, no_pretraining)
        if step.kind == "measure":
            return lambda: probe_all(step.run)
        return lambda: timed("fine-tuning", 1.0, lambda: finetune_one(step.run, step.set_name))

    run_stages([Stage(s.name, action(s), s.after, s.work) for s in steps], chain.lanes)

    results = {}
    if "fbank" in probes:
        results["fbank"] = chain_row(chain, None, probes["fbank"], {}, phones.get("fbank", {}))
    for name in names:
        results[name] = chain_row(chain, done[name], probes.get(name, {}), tunes.get(name, {}), phones.get(name, {}))
    return results


def chain_row(chain: Chain, pretraining: Optional[dict], probes: Dict[str, dict], tunes: Dict[str, dict],
              phones: Dict[str, dict]) -> dict:
    """One checkpoint's (or FBANK's) records of a chain, with the report's phone measures drawn from them."""
    return {"pretraining": pretraining, "probe": probes, "finetune": tunes, "phones": phones,
            **phone_measures(phones, phones_config(chain)["layer"])}


def finetuned(done: Dict[str, dict], settings: dict) -> Dict[str, dict]:
    """The checkpoints that are fine-tuned: finetune.checkpoints (run names), or every one."""
    if settings.get("controls_only"):
        return {}
    chosen = settings["finetune"].get("checkpoints")
    return {n: r for n, r in done.items() if not chosen or n in chosen}


def fbank_probed(settings: dict) -> bool:
    return bool(settings.get("probe")) and bool(settings["probe"].get("fbank", True))


def ctc_probed(name: str, settings: dict) -> bool:
    """Whether the CTC probe runs on a checkpoint (or "fbank"): ``probe.checkpoints`` (run names),
    or every one; FBANK with ``probe.fbank``."""
    if name == "fbank":
        return fbank_probed(settings)
    chosen = (settings.get("probe") or {}).get("checkpoints")
    return bool(settings.get("probe")) and (not chosen or name in chosen)


Lookup = Callable[[str, Optional[str]], Optional[dict]]
"""(a stage's path under the seed, e.g. ``phones/cssl.1/sv``, the SHA-256 of the checkpoint it
started from or measured) -> its finished record, or None."""


def run_folder_lookup(chain: Chain) -> Lookup:
    """Records from the run folder: each stage's, if its checkpoint and its start still verify."""
    return lambda path, input_sha256: finished(os.path.join(chain.folder, path), input_sha256, False)


def collect_chain(chain: Chain, lookup: Optional[Lookup] = None, ratio: Optional[float] = None) -> Optional[dict]:
    """run_chain's results from the stage records (the run folder's, or ``lookup``'s: the records
    in git) if every stage of the chain finished, else None; runs and changes nothing."""
    lookup = lookup or run_folder_lookup(chain)
    done: Dict[str, dict] = {}
    if ratio is None and needs_chain_ratio(chain.preset, chain.settings):
        ratio = chain_ratio(chain)  # a one-round chain needs none (and a report from records has no OUT)
        if ratio is None:
            return None
    for run in plan_pretraining(chain.preset, chain.settings, ratio):
        source = done[run.init_from] if run.init_from else None
        record = lookup(run.name, source["sha256"] if source else None)
        if record is None:
            return None
        done[run.name] = record
        if run.name == "cssl.1" and chain.settings.get("control"):
            done[CONTROL] = lookup(CONTROL, None)
            if done[CONTROL] is None:
                return None
    sets = finetune_sets(chain.preset, chain.settings)
    measured = phone_sets(chain.preset, chain.settings)
    shas = {name: record["sha256"] for name, record in done.items()}
    if fbank_probed(chain.settings) or measured:
        shas = {"fbank": None, **shas}
    results = {}
    for name, sha in shas.items():
        probed = ctc_probed(name, chain.settings)
        probes = {s: lookup(f"probe/{name}/{s}", sha) for s in (sets if probed else ())}
        phones = {s: lookup(f"phones/{name}/{s}", sha) for s in measured}
        if any(r is None for r in [*probes.values(), *phones.values()]):
            return None
        results[name] = chain_row(chain, done.get(name), probes, {}, phones)
    for name, record in finetuned(done, chain.settings).items():
        tuned = {s: lookup(f"finetune/{name}/{s}", record["sha256"]) for s in sets}
        if any(r is None for r in tuned.values()):
            return None
        results[name]["finetune"] = tuned
    return results


def new_path(path: str) -> str:
    """path, or path with .1, .2 … before the extension if it exists: results are never overwritten."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(path):
        path, n = f"{stem}.{n}{ext}", n + 1
    return path


def make_corpus(out: str, preset: str, size: str, source: Optional[str] = None) -> None:
    """Stage: the preset's built-in corpus (eqssl-make-corpus resumes and verifies on a rerun);
    ``source``: the preset's file if it is not a built-in."""
    folder = os.path.join(out, preset, "corpus")
    print(f"[{preset}] corpus: eqssl-make-corpus {folder} --preset {source or preset} --size {size}", flush=True)
    result = subprocess.run(["eqssl-make-corpus", folder, "--preset", source or preset, "--size", size])
    if result.returncode != 0:  # eqssl-make-corpus printed why
        raise SystemExit(f"eqssl-reproduce: [{preset}] corpus: eqssl-make-corpus {folder} failed (exit status "
                         f"{result.returncode}); nothing was trained")
