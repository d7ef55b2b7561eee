"""eqssl-reproduce: the paper's experiment in miniature, with compute-matched baselines and seeds.

    eqssl-reproduce --preset multidomain multilingual --size small --seeds 3 --out runs/small --jobs 2

For each preset: the built-in corpus; then for each seed, stage by stage:

1. ``cssl.1``: CSSL from scratch for a fixed budget of ``cssl1.max_update`` updates; its last
   checkpoint starts the rest (no patience rule: wav2vec 2.0 first sits on a plateau at chance
   where the loss barely moves, and patience counted on that loss ended runs before they learned);
   ``none``, the no-pre-training control: CSSL.1's architecture with fresh random weights;
2. from CSSL.1, for every K in ``inner_steps``: ``ptloc.1.kK`` (PTLOC, ``ptloc.max_update``
   updates) and ``cssl.1+Nx``, CSSL continued for N = K+1 times as many updates at the same lr
   and schedule shape, i.e. as many forward/backward passes per shard as PTLOC spent;
   multilingual only: ``cssl.1-temp``, CSSL from scratch with XLS-R-style language sampling;
3. the alternating rounds ``cssl.r`` -> ``ptloc.r`` (r >= 2), each from the previous one;
4. ``eqssl-gap`` on every pre-trained checkpoint;
5. the frozen-upstream probe (``eqssl-probe``) of every checkpoint and of FBANK features on every
   fine-tuning set: encoder frozen, a weighted sum of its layers and a CTC head trained on the
   set's labels (features cached per checkpoint SHA-256 under OUT/PRESET/features);
6. CTC fine-tuning of every checkpoint on every fine-tuning set (same recipe, budget, updates and
   seed), then greedy-CTC WER / CER on its test split.

Then ``results.json`` and ``results.md`` under OUT: per measure (probe, fine-tuning) rows are
checkpoints, columns the fine-tuning sets (seen / unseen in pre-training), cells mean ± standard
deviation over seeds, with the minimum difference the seed spread lets the experiment detect;
and each pre-training run's validation accuracy per shard against chance.
A stage that finished leaves ``eqssl_stage.json`` (its checkpoint's SHA-256) and is skipped on
a rerun if that still verifies; an interrupted fairseq run is resumed from its checkpoint_last.pt.
The settings of each size are YAML files in ``recipes/reproduce``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import yaml
from scipy.stats import t as student_t

from ..checkpoints import file_sha256
from ..locking import FolderLockedError, folder_lock
from ..corpus.presets import RECIPES, SIZES, CorpusError, Preset, is_file, load_preset, preset_name, preset_path

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The eqssl package folder: fairseq's --user-dir."""
MARKER = "eqssl_stage.json"
CONTROL, CONTROL_LABEL = "none", "No pre-training (random init)"
FBANK_LABEL = "FBANK (probe only)"


class ReproduceError(RuntimeError):
    """A run of the experiment failed; the message names its log."""


# ------------------------------------------------------------------ plan
@dataclass
class PretrainRun:
    """One fairseq pre-training run of the experiment."""

    name: str
    """Folder name under OUT/PRESET/seedS and the row key of the tables."""
    label: str
    """Row label of the tables."""
    recipe: str
    """recipes/pretrain/<recipe>.yaml"""
    overrides: List[str]
    init_from: Optional[str] = None
    """Name of the run whose checkpoint starts this one (None: from scratch)."""
    checkpoint: str = "checkpoint_last.pt"
    """Which of the run's checkpoints is its result."""
    matched_to: Optional[str] = None
    """For a compute-matched baseline: the PTLOC run whose passes it matches."""
    compared_with: Optional[str] = None
    """For a PTLOC run of the inner step-size sweep: the compute-matched CSSL run it is compared with."""


FAMILIES = {"wav2vec2": "", "bestrq": "bestrq_"}
"""Model families eqssl-reproduce runs: --model NAME picks recipes/pretrain/{cssl,ptloc}_<prefix><model>."""


def load_settings(size_or_path: str, family: str = "wav2vec2") -> dict:
    """The experiment settings: recipes/reproduce/<size>.yaml, or a YAML file path; for a model
    family other than wav2vec 2.0 the fields under ``families.<family>`` replace the top-level ones."""
    path = size_or_path if size_or_path.endswith((".yaml", ".yml")) else os.path.join(
        RECIPES, "reproduce", f"{size_or_path}.yaml")
    if not os.path.exists(path):
        choices = sorted(f[:-5] for f in os.listdir(os.path.join(RECIPES, "reproduce")) if f.endswith(".yaml"))
        raise ReproduceError(f"no settings {path}; sizes: {', '.join(choices)} (or a .yaml path)")
    with open(path) as f:
        settings = yaml.safe_load(f)
    required = ["corpus_size", "model", "rounds", "inner_steps", "validate_interval_updates", "cssl1",
                "ptloc", "cssl_round", "temperature_baseline", "gap", "finetune"]
    missing = [k for k in required if k not in settings]
    if missing:
        raise ReproduceError(f"{path}: missing field(s) {', '.join(missing)}")
    if "patience" in settings["cssl1"]:
        raise ReproduceError(
            f"{path}: cssl1.patience is no longer read: CSSL.1 runs a fixed budget of cssl1.max_update "
            "updates (patience on a loss that barely moves on wav2vec 2.0's early plateau stopped runs "
            "at chance); remove the field")
    if family not in FAMILIES:
        raise ReproduceError(f"--model {family}: unknown model family; choose one of {', '.join(FAMILIES)}")
    if family != "wav2vec2":
        if family not in (settings.get("families") or {}):
            raise ReproduceError(f"{path}: no families.{family} section: the wav2vec 2.0 overrides of this "
                                 f"file do not apply to {family}; add the section (it may be empty: {{}})")
        for key, value in settings["families"][family].items():  # mappings are merged one level deep
            merge = isinstance(value, dict) and isinstance(settings.get(key), dict)
            settings[key] = {**settings[key], **value} if merge else value
    settings["family"] = family
    settings["path"] = os.path.abspath(path)
    return settings


def plan_pretraining(preset: str, settings: dict) -> List[PretrainRun]:
    """Every pre-training run of one seed, in an order where each run's start exists before it."""
    model, ptloc, gap = settings["model"], settings["ptloc"], settings["gap"]
    model = FAMILIES[settings.get("family", "wav2vec2")] + str(model)
    interval = settings["validate_interval_updates"]
    common = [f"++task.validation_gap_steps={gap['inner_steps']}", f"++task.validation_gap_lr={gap['inner_lr']}",
              f"dataset.validate_interval_updates={interval}", f"checkpoint.save_interval_updates={interval}",
              "common.log_interval=10", *settings.get("pretrain_overrides", [])]
    first = settings["inner_steps"][0]
    continued = common + settings.get("continued_overrides", [])  # every run that starts from another

    def ptloc_run(name: str, label: str, k: int, init: str, inner_lr: float = ptloc["inner_lr"],
                  compared_with: Optional[str] = None) -> PretrainRun:
        return PretrainRun(name, label, f"ptloc_{model}", continued + [
            f"++task.inner_steps={k}", f"++task.inner_lr={inner_lr}", f"optimization.lr=[{ptloc['lr']}]",
            f"optimization.max_update={ptloc['max_update']}", f"lr_scheduler.warmup_updates={ptloc['warmup_updates']}",
        ], init_from=init, compared_with=compared_with)

    cssl1 = settings["cssl1"]
    budget = [f"dataset.validate_interval_updates={cssl1['validate_interval_updates']}",
              f"checkpoint.save_interval_updates={cssl1['validate_interval_updates']}",
              *cssl1.get("overrides", [])]
    runs = [PretrainRun("cssl.1", "CSSL.1", f"cssl_{model}", common + budget + [
        f"optimization.max_update={cssl1['max_update']}"])]
    for k in settings["inner_steps"]:
        runs.append(ptloc_run(f"ptloc.1.k{k}", f"PTLOC.1 K={k}", k, "cssl.1"))
        runs.append(PretrainRun(
            f"cssl.1+{k + 1}x", f"CSSL.1 +{k + 1}x updates (matched to PTLOC.1 K={k})", f"cssl_{model}", continued + [
                f"optimization.lr=[{ptloc['lr']}]", f"optimization.max_update={ptloc['max_update'] * (k + 1)}",
                f"lr_scheduler.warmup_updates={ptloc['warmup_updates'] * (k + 1)}",
            ], init_from="cssl.1", matched_to=f"ptloc.1.k{k}"))
    sweep = settings.get("step_size_sweep") or {}
    if preset in (sweep.get("presets") or [preset]):
        # The paper fixes alpha/beta = 10; one inner step that small barely moves a shard's loss,
        # so PTLOC's gradient is nearly CSSL's. Larger inner steps, against the same matched CSSL.
        for ratio in sweep.get("ratios") or []:
            runs.append(ptloc_run(f"ptloc.1.k{first}.r{ratio:g}", f"PTLOC.1 K={first} α/β={ratio:g}", first, "cssl.1",
                                  inner_lr=float(f"{ratio * float(ptloc['lr']):.6g}"),
                                  compared_with=f"cssl.1+{first + 1}x"))
    pretrain = preset_sets(preset, settings).pretrain
    if len({spec.language for spec in pretrain}) > 1:  # multilingual pre-training: language sampling
        temp = settings["temperature_baseline"]
        shards = len(pretrain)
        per = temp["shards_per_update"]
        # As many shard passes as CSSL.1's budget: 1/per-th of the shards per update.
        scale = max(1, shards // per)
        runs.append(PretrainRun(
            "cssl.1-temp", f"CSSL.1 temperature sampling (T={temp['temperature']}, {per} language/update)",
            f"cssl_{model}", common + cssl1.get("overrides", []) + [
                "++task.shard_sampling=temperature", f"++task.sampling_temperature={temp['temperature']}",
                f"++task.shards_per_update={per}", f"optimization.max_update={cssl1['max_update'] * scale}",
                f"dataset.validate_interval_updates={cssl1['validate_interval_updates'] * scale}",
                f"checkpoint.save_interval_updates={cssl1['validate_interval_updates'] * scale}",
            ]))
    previous = f"ptloc.1.k{first}"
    for r in range(2, settings["rounds"] + 1):
        runs.append(PretrainRun(f"cssl.{r}", f"CSSL.{r}", f"cssl_{model}", continued + [
            f"optimization.max_update={settings['cssl_round']['max_update']}"], init_from=previous))
        runs.append(ptloc_run(f"ptloc.{r}", f"PTLOC.{r} K={first}", first, f"cssl.{r}"))
        previous = f"ptloc.{r}"
    return runs


def finetune_sets(preset: str, settings: dict) -> Dict[str, bool]:
    """The fine-tuning sets of the experiment, each with whether it is seen in pre-training."""
    sets = {spec.name: spec.seen for spec in preset_sets(preset, settings).finetune}
    chosen = (settings["finetune"].get("sets") or {}).get(preset)
    if chosen:
        unknown = [s for s in chosen if s not in sets]
        if unknown:
            raise ReproduceError(f"{settings['path']}: finetune.sets.{preset}: unknown set(s) {unknown}; "
                                 f"the preset has {', '.join(sets)}")
        sets = {s: sets[s] for s in chosen}
    return sets


def resolve_presets(values: Sequence[str], settings: dict) -> Dict[str, str]:
    """--preset values (built-in names or preset .yaml files), each read and checked before any
    work (PresetError naming the file and field); returns name -> absolute path of the file-given ones."""
    files: Dict[str, str] = {}
    names: Dict[str, str] = {}
    for value in values:
        name, path = preset_name(value), os.path.abspath(preset_path(value))
        if names.setdefault(name, path) != path:
            raise ReproduceError(f"--preset: two presets named {name} ({names[name]} and {path}): the experiment's "
                                 "folders are named after the presets; rename one file")
        sizes = {**SIZES, **load_preset(path).sizes}
        if settings["corpus_size"] not in sizes:
            raise ReproduceError(f"{settings['path']}: corpus_size {settings['corpus_size']}: preset {name} has "
                                 f"no such size; it has {', '.join(sizes)}")
        if is_file(value):
            files[name] = path
    return files


def preset_sets(preset: str, settings: dict) -> Preset:
    """The sets of a preset of the experiment: a built-in by name, or the file main() resolved."""
    return load_preset((settings.get("preset_files") or {}).get(preset, preset), check=False)


# ------------------------------------------------------------------ stage bookkeeping
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


def run_fairseq(command: List[str], log_path: str, tag: str, max_update: Optional[int], threads: int) -> None:
    """Run a fairseq command, its output appended to log_path, printing progress at each validation."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    start = time.time()
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:
            log.write(line)
            if "| valid on" in line and max_update:
                updates = re.search(r"num_updates (\d+)", line)
                loss = re.search(r"\| loss ([-\d.]+)", line)
                print(f"{tag}: {updates.group(1) if updates else '?'}/{max_update} updates, valid loss "
                      f"{loss.group(1) if loss else '?'} ({time.time() - start:.0f} s)", flush=True)
        code = process.wait()
    if code != 0:
        with open(log_path) as f:
            tail = "".join(f.readlines()[-15:])
        raise ReproduceError(f"{tag} failed (exit {code}); log: {log_path}\n{tail}")


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    return values[-1] if values else None


def checkpoint_updates(path: str) -> tuple:
    """(num_updates, task config, chance accuracy) of a fairseq pre-training checkpoint; chance is
    1 / (negatives + 1) for wav2vec 2.0 and None for BEST-RQ (read from its log: ``log_chance``)."""
    from ..models.eq_wav2vec2 import load_pretraining_checkpoint

    state = load_pretraining_checkpoint(path)
    model_cfg = state["cfg"]["model"]
    chance = None if str(model_cfg.get("_name")).startswith("eq_bestrq") else \
        1.0 / (int(model_cfg.get("num_negatives", 100)) + 1)
    return int(state["optimizer_history"][-1]["num_updates"]), state["cfg"]["task"], chance


def last_validation_accuracy(log_path: str, key: str = "accuracy") -> Dict[str, float]:
    """Per shard, ``key`` (the accuracy; for BEST-RQ also ``majority``, the majority code's share)
    at the last validation in a fairseq training log."""
    accuracy: Dict[str, float] = {}
    with open(log_path) as f:
        for line in f:
            if "valid on 'valid' subset" in line:
                accuracy = {m.group(1): float(m.group(2)) for m in re.finditer(rf"\| {key}_(\S+) ([-\d.]+)", line)}
    return accuracy


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
    folder = os.path.join(chain.folder, run.name)
    source = done[run.init_from] if run.init_from else None
    record = finished(folder, source["sha256"] if source else None)
    if record is not None:
        print(f"{chain.tag} {run.name}: done, skipped ({record['num_updates']} updates)", flush=True)
        return record
    os.makedirs(folder, exist_ok=True)
    start = time.time()
    init = os.path.join(chain.folder, run.init_from, source["checkpoint"]) if source else None
    max_update = int(override_value(run.overrides, "optimization.max_update") or 0)
    print(f"{chain.tag} {run.name}: {run.label}{' from ' + run.init_from if run.init_from else ''}", flush=True)
    command = pretrain_command(run, os.path.join(chain.corpus, "pretrain"), folder, chain.seed, init)
    run_fairseq(command, os.path.join(folder, "train.log"), f"{chain.tag} {run.name}", max_update, chain.threads)
    updates, task_cfg, chance = checkpoint_updates(os.path.join(folder, "checkpoint_last.pt"))
    accuracy = last_validation_accuracy(os.path.join(folder, "train.log"))
    if chance is None:  # BEST-RQ: the largest majority-code share over the shards (conservative)
        chance = max(last_validation_accuracy(os.path.join(folder, "train.log"), "majority").values(),
                     default=math.nan)
    gap = measure(chain, os.path.join(folder, run.checkpoint))
    record = mark_finished(
        folder, run.checkpoint, input_sha256=source["sha256"] if source else None, name=run.name, label=run.label,
        init_from=run.init_from, matched_to=run.matched_to, compared_with=run.compared_with, num_updates=updates,
        inner_steps=int(task_cfg["inner_steps"]), passes=passes(updates, task_cfg),
        gap=gap, valid_accuracy=accuracy, chance=chance, seconds=round(time.time() - start, 1),
    )
    lowest = min(accuracy.values()) if accuracy else math.nan
    print(f"{chain.tag} {run.name}: finished, {updates} updates, validation accuracy {lowest:.3f} on its lowest "
          f"shard ({lowest / chance:.1f}x chance), mean gap {mean(g['gap'] for g in gap.values()):+.4f} bits "
          f"({record['seconds']:.0f} s)", flush=True)
    return record


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
                         matched_to=None, num_updates=0, inner_steps=0, passes=0, gap=gap,
                         valid_accuracy={}, chance=math.nan, seconds=0.0)


def measure(chain: Chain, checkpoint: str) -> Dict[str, dict]:
    """eqssl-gap of one checkpoint on the validation batches of every pre-training shard."""
    from .gap import measure_gap
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


def finetune(chain: Chain, name: str, pretrained: str, pretrained_sha256: str, set_name: str) -> dict:
    """Stage: CTC fine-tuning of one pre-trained checkpoint on one set, then its test WER / CER."""
    from .evaluate import evaluate

    folder = os.path.join(chain.folder, "finetune", name, set_name)
    record = finished(folder, pretrained_sha256)
    if record is not None:
        return record
    os.makedirs(folder, exist_ok=True)
    settings = chain.settings["finetune"]
    data = os.path.abspath(os.path.join(chain.corpus, "finetune", set_name))
    start = time.time()
    command = finetune_command(settings["recipe"], data, pretrained, folder, [
        f"common.seed={chain.seed}", f"optimization.max_update={settings['max_update']}",
        *settings.get("overrides", []), *(settings.get("preset_overrides") or {}).get(chain.preset, [])])
    run_fairseq(command, os.path.join(folder, "train.log"), f"{chain.tag} finetune {name}/{set_name}", None,
                chain.threads)
    report = evaluate(os.path.join(folder, "checkpoint_best.pt"), [f"{set_name}={data}:test"], progress=False)
    result = report["sets"][set_name]
    record = mark_finished(folder, "checkpoint_best.pt", input_sha256=pretrained_sha256, pretrained=name,
                           set=set_name, wer=result["wer"], cer=result["cer"], seconds=round(time.time() - start, 1))
    print(f"{chain.tag} finetune {name}/{set_name}: WER {100 * result['wer']:.1f} CER {100 * result['cer']:.1f} "
          f"({record['seconds']:.0f} s)", flush=True)
    return record


def probe_config(chain: Chain):
    from .probe import ProbeConfig

    fields = {k: v for k, v in (chain.settings.get("probe") or {}).items() if k != "fbank"}
    return ProbeConfig(seed=chain.seed, **fields)


def run_probe(chain: Chain, name: str, upstream, upstream_sha256: Optional[str], set_name: str) -> dict:
    """Stage: the frozen-upstream probe of one checkpoint (or FBANK) on one set, with its test WER / CER;
    ``upstream``: an eqssl.cli.probe.Upstream, shared by the checkpoint's sets (it loads the encoder once)."""
    import torch

    from .probe import probe

    folder = os.path.join(chain.folder, "probe", name, set_name)
    record = finished(folder, upstream_sha256)
    if record is not None:
        return record
    os.makedirs(folder, exist_ok=True)
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


def run_chain(chain: Chain) -> dict:
    """All stages of one (preset, seed): pre-training runs with their gaps, then fine-tuning."""
    import logging
    import warnings

    import torch

    from .probe import FBANK, Upstream

    torch.set_num_threads(chain.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fairseq").setLevel(logging.WARNING)  # in-process gap and evaluation: progress lines only
    warnings.filterwarnings("ignore")
    done: Dict[str, dict] = {}
    for run in plan_pretraining(chain.preset, chain.settings):
        done[run.name] = pretrain(chain, run, done)
        if run.name == "cssl.1" and chain.settings.get("control"):
            done[CONTROL] = random_init(chain, done)
    sets = finetune_sets(chain.preset, chain.settings)
    results = {}
    if fbank_probed(chain.settings):
        fbank = Upstream(FBANK)
        results["fbank"] = {"pretraining": None, "finetune": {},
                            "probe": {s: run_probe(chain, "fbank", fbank, None, s) for s in sets}}
    for name, record in done.items():
        pretrained = os.path.join(chain.folder, name, record["checkpoint"])
        results[name] = {"pretraining": record, "probe": {}, "finetune": {}}
        if chain.settings.get("probe"):
            upstream = Upstream(pretrained)
            results[name]["probe"] = {s: run_probe(chain, name, upstream, record["sha256"], s) for s in sets}
    for name, record in finetuned(done, chain.settings).items():  # last: the probes rank the checkpoints sooner
        pretrained = os.path.join(chain.folder, name, record["checkpoint"])
        results[name]["finetune"] = {s: finetune(chain, name, pretrained, record["sha256"], s) for s in sets}
    return results


def finetuned(done: Dict[str, dict], settings: dict) -> Dict[str, dict]:
    """The checkpoints that are fine-tuned: finetune.checkpoints (run names), or every one."""
    chosen = settings["finetune"].get("checkpoints")
    return {n: r for n, r in done.items() if not chosen or n in chosen}


def fbank_probed(settings: dict) -> bool:
    return bool(settings.get("probe")) and bool(settings["probe"].get("fbank", True))


def collect_chain(chain: Chain) -> Optional[dict]:
    """run_chain's results from the stage records if every stage of the chain finished and
    verifies, else None; runs and changes nothing."""
    done: Dict[str, dict] = {}
    for run in plan_pretraining(chain.preset, chain.settings):
        source = done[run.init_from] if run.init_from else None
        record = finished(os.path.join(chain.folder, run.name), source["sha256"] if source else None, False)
        if record is None:
            return None
        done[run.name] = record
        if run.name == "cssl.1" and chain.settings.get("control"):
            done[CONTROL] = finished(os.path.join(chain.folder, CONTROL), None, False)
            if done[CONTROL] is None:
                return None
    sets = finetune_sets(chain.preset, chain.settings)
    upstreams = {name: record["sha256"] for name, record in done.items()} if chain.settings.get("probe") else {}
    if fbank_probed(chain.settings):
        upstreams = {"fbank": None, **upstreams}
    results = {}
    for name, sha in upstreams.items():
        probes = {s: finished(os.path.join(chain.folder, "probe", name, s), sha, False) for s in sets}
        if any(r is None for r in probes.values()):
            return None
        results[name] = {"pretraining": done.get(name), "probe": probes, "finetune": {}}
    for name, record in done.items():
        results.setdefault(name, {"pretraining": record, "probe": {}, "finetune": {}})
    for name, record in finetuned(done, chain.settings).items():
        tuned = {s: finished(os.path.join(chain.folder, "finetune", name, s), record["sha256"], False) for s in sets}
        if any(r is None for r in tuned.values()):
            return None
        results[name]["finetune"] = tuned
    return results


# ------------------------------------------------------------------ results
def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for a single seed)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarise(values: Sequence[float]) -> dict:
    return {"mean": mean(values), "sd": spread(values), "min": min(values), "max": max(values),
            "seeds": len(values)}


MEASURES = {"probe": "frozen-upstream probe", "finetune": "full fine-tuning"}
POWER = 0.80
"""The power the minimum detectable difference is stated at: detected four times in five."""


def t_quantile(probability: float, degrees: int) -> float:
    """Student's t quantile."""
    return float(student_t.ppf(probability, degrees))


def minimum_detectable_difference(pooled_sd: float, seeds: int, paired: bool = False) -> float:
    """The smallest true difference between two rows of `seeds` seeds each that a two-sided 5 %
    t-test detects with 80 % power, given the per-seed standard deviation (nan for one seed);
    ``paired``: the standard deviation is that of the per-seed differences. The usual approximation
    (t₀.₉₇₅ + t₀.₈₀) standard errors, with n − 1 degrees of freedom paired and 2(n − 1) unpaired
    (simulated power at 3 seeds: 77 %); the normal's 2.80 standard errors would understate it by
    about half at 3 seeds."""
    if seeds < 2:
        return math.nan
    degrees = seeds - 1 if paired else 2 * (seeds - 1)
    factor = t_quantile(0.975, degrees) + t_quantile(POWER, degrees)
    return factor * math.sqrt((1.0 if paired else 2.0) / seeds) * pooled_sd


def seeds_needed(pooled_sd: float, difference: float, paired: bool = False) -> int:
    """The fewest seeds per row (at least 2) for minimum_detectable_difference to reach `difference`."""
    seeds = 2
    while minimum_detectable_difference(pooled_sd, seeds, paired) > difference and seeds < 100000:
        seeds += 1
    return seeds


PAPER_GAINS = {"multi-domain": (0.045, 0.30), "multilingual": (0.008, 0.034)}
"""The paper's one-round relative gains of PTLOC over CSSL (../shared/METHOD.md), by pre-training kind."""


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """a − b paired by seed: mean, sd and the 95 % t-interval of the mean (nan bounds for one seed)."""
    deltas = [x - y for x, y in zip(a, b)]
    m, sd, n = mean(deltas), spread(deltas), len(deltas)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": m, "sd": sd, "low": m - half, "high": m + half, "seeds": n}


def ranks(values: Sequence[float]) -> List[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (nan for fewer than 3 points or a constant series)."""
    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    sx = math.sqrt(sum((v - mx) ** 2 for v in rx))
    sy = math.sqrt(sum((v - my) ** 2 for v in ry))
    if sx == 0 or sy == 0:
        return math.nan
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy)


def pretraining_kind(preset: str, settings: dict) -> str:
    """"multilingual" when the pre-training shards differ in language, else "multi-domain"."""
    return "multilingual" if len({s.language for s in preset_sets(preset, settings).pretrain}) > 1 else "multi-domain"


def comparison_pairs(table: dict) -> List[tuple]:
    """(a, b) row pairs the tables compare as a − b: CSSL.1 − no pre-training, every PTLOC − its
    compute-matched CSSL, and every run of the step-size sweep − the matched CSSL it names."""
    pairs = [("cssl.1", CONTROL)] if "cssl.1" in table and CONTROL in table else []
    pairs += [(r["matched_to"], n) for n, r in table.items() if r["matched_to"] in table]
    pairs += [(n, r["compared_with"]) for n, r in table.items() if r.get("compared_with") in table]
    return pairs


def is_matched_pair(table: dict, a: str, b: str) -> bool:
    """True where b is the CSSL compute-matched to a: the pairs the experiment is about, not the
    step-size sweep's (which reuse a matched CSSL) nor CSSL.1 against random init."""
    return b in table and table[b]["matched_to"] == a


def mean_gap(record: dict) -> float:
    """A pre-trained checkpoint's equilibrium gap averaged over its shards."""
    return mean(shard["gap"] for shard in record["gap"].values())


def stage_seconds(per_seed: Dict[int, dict]) -> Dict[str, float]:
    """Seconds the finished stages took (their records), summed over seeds, per kind of stage."""
    total = {"pretraining": 0.0, "probe": 0.0, "finetune": 0.0}
    for results in per_seed.values():
        for row in results.values():
            if row["pretraining"]:
                total["pretraining"] += row["pretraining"].get("seconds") or 0.0
            for measure in ("probe", "finetune"):
                total[measure] += sum(r.get("seconds") or 0.0 for r in row[measure].values())
    return total


def analyse(preset: str, settings: dict, per_seed: Dict[int, dict], table: dict) -> dict:
    """Differences paired by seed (CER, gap), the gap against downstream CER, and the step-size sweep."""
    seeds = sorted(per_seed)
    sets = finetune_sets(preset, settings)
    comparisons = {measure: [] for measure in MEASURES}
    gap_differences = []
    for a, b in comparison_pairs(table):
        for measure in MEASURES:
            cells = {}
            for s in sets:
                if s in table[a][measure] and s in table[b][measure]:
                    cells[s] = paired_difference([per_seed[n][a][measure][s]["cer"] for n in seeds],
                                                 [per_seed[n][b][measure][s]["cer"] for n in seeds])
            if cells:
                comparisons[measure].append({"a": a, "b": b, "cer": cells})
        if b != CONTROL:
            records = {name: [per_seed[n][name]["pretraining"] for n in seeds] for name in (a, b)}
            shards = {shard: paired_difference([r["gap"][shard]["gap"] for r in records[a]],
                                               [r["gap"][shard]["gap"] for r in records[b]])
                      for shard in records[a][0]["gap"]}
            shards["mean"] = paired_difference([mean_gap(r) for r in records[a]], [mean_gap(r) for r in records[b]])
            gap_differences.append({"a": a, "b": b, "gap": shards})
    # Does a lower gap go with better downstream scores? Every pre-trained row (not random weights).
    gap_vs_cer = {}
    for measure in MEASURES:
        points = [(name, mean(mean_gap(per_seed[n][name]["pretraining"]) for n in seeds),
                   mean(row[measure][s]["cer"]["mean"] for s in sets))
                  for name, row in table.items()
                  if name != CONTROL and row["gap"] and all(s in row[measure] for s in sets)]
        gap_vs_cer[measure] = {"rows": [{"name": n, "gap": g, "cer": c} for n, g, c in points],
                               "spearman": spearman([p[1] for p in points], [p[2] for p in points])}
    sweep = []
    ptloc = settings["ptloc"]
    base = float(ptloc["inner_lr"]) / float(ptloc["lr"])
    first = settings["inner_steps"][0]
    for name, row in table.items():
        match = re.fullmatch(rf"ptloc\.1\.k{first}(?:\.r([\d.e+-]+))?", name)
        if not match or not row["gap"]:
            continue
        ratio = float(match.group(1)) if match.group(1) else base
        gap = next((d for d in gap_differences if d["a"] == name), None)  # PTLOC is always a
        entry = {"name": name, "ratio": ratio, "inner_lr": ratio * float(ptloc["lr"]),
                 "against": gap["b"] if gap else None,
                 "gap": mean(mean_gap(per_seed[n][name]["pretraining"]) for n in seeds)}
        if gap:
            entry["gap_difference"] = gap["gap"]["mean"]["mean"]
            for measure in MEASURES:
                cells = next((c["cer"] for c in comparisons[measure] if c["a"] == name), {})
                if cells:
                    entry[measure] = {"cer_difference": mean(c["mean"] for c in cells.values()), "sets": len(cells)}
        sweep.append(entry)
    sweep.sort(key=lambda e: e["ratio"])
    return {"comparisons": comparisons, "gap_differences": gap_differences, "gap_vs_cer": gap_vs_cer,
            "step_size": sweep if len(sweep) > 1 else [], "seconds": stage_seconds(per_seed),
            "kind": pretraining_kind(preset, settings)}


def aggregate(preset: str, settings: dict, per_seed: Dict[int, dict]) -> dict:
    """One preset's results: per row (checkpoint, FBANK), per measure and set, WER and CER over
    seeds with the minimum detectable difference; gaps, validation accuracy, passes."""
    sets = finetune_sets(preset, settings)
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    table = {}
    for name in first:
        pretraining = [per_seed[s][name]["pretraining"] for s in seeds]
        label = pretraining[0]["label"] if pretraining[0] else FBANK_LABEL
        row = {"label": label, "matched_to": pretraining[0]["matched_to"] if pretraining[0] else None,
               "compared_with": pretraining[0].get("compared_with") if pretraining[0] else None,
               "probe": {}, "finetune": {}, "gap": {}, "valid_accuracy": {}, "chance": None, "passes": {},
               "num_updates": {}}
        for measure in MEASURES:
            for set_name in sets:
                cells = [per_seed[s][name][measure].get(set_name) for s in seeds]
                if all(c is not None for c in cells):
                    row[measure][set_name] = {"wer": summarise([c["wer"] for c in cells]),
                                              "cer": summarise([c["cer"] for c in cells])}
        if pretraining[0]:
            for shard in pretraining[0]["gap"]:
                row["gap"][shard] = {key: summarise([r["gap"][shard][key] for r in pretraining])
                                     for key in ("loss_before", "loss_after", "gap")}
            for shard in pretraining[0].get("valid_accuracy") or {}:
                row["valid_accuracy"][shard] = summarise([r["valid_accuracy"][shard] for r in pretraining])
            row["chance"] = pretraining[0].get("chance")
            row["passes"] = {str(s): r["passes"] for s, r in zip(seeds, pretraining)}
            row["num_updates"] = {str(s): r["num_updates"] for s, r in zip(seeds, pretraining)}
        table[name] = row
    detectable = {}
    for measure in MEASURES:
        detectable[measure] = {}
        for set_name in sets:
            detectable[measure][set_name] = {}
            for metric in ("wer", "cer"):
                sds = [row[measure][set_name][metric]["sd"] for row in table.values() if set_name in row[measure]]
                if not sds:
                    continue
                pooled = math.sqrt(mean(sd ** 2 for sd in sds))
                reference = table.get("cssl.1", {}).get(measure, {}).get(set_name, {}).get(metric, {}).get("mean")
                mdd = minimum_detectable_difference(pooled, len(seeds))
                detectable[measure][set_name][metric] = {
                    "pooled_sd": pooled, "mdd": mdd, "cssl1_mean": reference,
                    "mdd_relative": mdd / reference if reference else math.nan,
                    "seeds_for_5_percent_relative": seeds_needed(pooled, 0.05 * reference)
                    if reference and pooled > 0 else None}
    analysis = analyse(preset, settings, per_seed, table)
    for measure in MEASURES:
        for set_name in sets:
            found = detectable[measure][set_name].get("cer")
            # PTLOC and its matched CSSL share their seed's CSSL.1 and probe or fine-tuning seed:
            # the spread of their paired differences, not of each row, limits what can be seen.
            # The sweep's pairs stay out: a step size that breaks the model would inflate the spread.
            sds = [c["cer"][set_name]["sd"] for c in analysis["comparisons"][measure]
                   if is_matched_pair(table, c["a"], c["b"]) and set_name in c["cer"]]
            if not found or not sds:
                continue
            pooled = math.sqrt(mean(sd ** 2 for sd in sds))
            mdd = minimum_detectable_difference(pooled, len(seeds), paired=True)
            reference = found["cssl1_mean"]
            found.update(paired_sd=pooled, paired_mdd=mdd, paired_mdd_relative=mdd / reference if reference else math.nan,
                         paired_seeds_for_5_percent_relative=seeds_needed(pooled, 0.05 * reference, paired=True)
                         if reference and pooled > 0 else None)
    return {"sets": sets, "seeds": seeds, "checkpoints": table, "detectable": detectable,
            "family": settings.get("family", "wav2vec2"), **analysis}


LEARNED = 2.0
"""CSSL.1 has left chance when its lowest shard's validation accuracy is this many times chance."""


def learning_verdict(cssl1: dict, chance: float, family: str = "wav2vec2") -> str:
    """One plain sentence: did CSSL.1 leave chance (wav2vec 2.0's early plateau), and what that means."""
    lowest = min(stat["mean"] for stat in cssl1["valid_accuracy"].values())
    if family == "bestrq" and lowest < LEARNED * chance:
        return (f"**CSSL.1 is still near chance** (masked-code accuracy {lowest:.3f} on its lowest shard, "
                f"majority code {chance:.3f}): this budget is too short for BEST-RQ to learn, so no row below "
                "can show whether pre-training or PTLOC helps; run the `small` settings.")
    if lowest >= LEARNED * chance:
        return (f"CSSL.1 learned: validation accuracy {lowest:.3f} on its lowest shard, {lowest / chance:.1f}x "
                "chance; the downstream rows below compare models that learned.")
    return (f"**CSSL.1 is still at chance** (validation accuracy {lowest:.3f} on its lowest shard, chance "
            f"{chance:.3f}): this budget ends inside wav2vec 2.0's early plateau, so no row below can show "
            "whether pre-training or PTLOC helps. The `small` settings leave the plateau (README \"Learning "
            "curves\"): eqssl-reproduce --preset multidomain multilingual --size small --seeds 3 --jobs 2 --out runs/small")


def _cell(stat: dict) -> str:
    if stat["seeds"] > 1:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['sd']:.1f}"
    return f"{100 * stat['mean']:.1f}"


def _difference_cell(result: dict, measure: str, pair: dict, set_name: str, relative: bool = True) -> str:
    """One paired CER difference in points, * where |Δ| exceeds the minimum detectable difference
    (the rows' pooled one against random init, the pooled paired one against a matched CSSL, the
    pair's own otherwise), with the change relative to b and the 95 % interval."""
    d = pair["cer"].get(set_name)
    if d is None:
        return "–"
    found = result["detectable"][measure][set_name]["cer"]
    if pair["b"] == CONTROL:
        mdd = found["mdd"]
    elif is_matched_pair(result["checkpoints"], pair["a"], pair["b"]):
        mdd = found.get("paired_mdd", math.nan)
    else:  # the step-size sweep: its spread is its own (a step size can break a model), not the pool's
        mdd = minimum_detectable_difference(d["sd"], d["seeds"], paired=True)
    star = "*" if math.isfinite(mdd) and abs(d["mean"]) > mdd else ""
    cell = f"{100 * d['mean']:+.1f}{star}"
    if relative:
        cell += f" ({100 * d['mean'] / result['checkpoints'][pair['b']][measure][set_name]['cer']['mean']:+.0f} %)"
    if math.isfinite(d["low"]):
        cell += f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    return cell


def _difference_lines(result: dict, measure: str, heads: List[str]) -> List[str]:
    """Rows of `a minus b` CER differences paired by seed, in points, with the relative change
    against b and the 95 % interval; * where |Δ| exceeds the minimum detectable difference."""
    rows, sets = result["checkpoints"], result["sets"]
    lines = ["| comparison | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)]
    for pair in result["comparisons"][measure]:
        cells = [_difference_cell(result, measure, pair, s) for s in sets]
        lines.append(f"| {rows[pair['a']]['label']} − {rows[pair['b']]['label']} | " + " | ".join(cells) + " |")
    return lines


def _summary_lines(preset: str, result: dict, heads: List[str]) -> List[str]:
    """The answer in one table: per measure, CSSL.1 against random init and each PTLOC.1 against its
    compute-matched CSSL (CER points, paired over seeds), beside the paired minimum detectable
    difference and the paper's gains in points; then the gap of each PTLOC against its matched CSSL."""
    rows, sets = result["checkpoints"], result["sets"]
    short = {CONTROL: "random init"}
    lines = []
    for measure, title in MEASURES.items():
        pairs = [p for p in result["comparisons"][measure]
                 if p["b"] == CONTROL or is_matched_pair(rows, p["a"], p["b"])]
        if not pairs:
            continue
        for pair in pairs:
            name = f"{rows[pair['a']]['label']} − {short.get(pair['b'], 'matched CSSL')}"
            lines.append(f"| {title}: {name} | " + " | ".join(_difference_cell(result, measure, pair, s, relative=False)
                                                           for s in sets) + " |")
        cells = []
        for s in sets:
            found = result["detectable"][measure][s].get("cer") or {}
            mdd = found.get("paired_mdd", math.nan)
            cells.append(f"{100 * mdd:.1f} ({100 * found['paired_mdd_relative']:.0f} %)" if math.isfinite(mdd) else "n/a")
        lines.append(f"| {title}: paired MDD, PTLOC − matched CSSL | " + " | ".join(cells) + " |")
        lines.append(_paper_gain_line(result, measure, prefix=f"{title}: "))
    if not lines:
        return []
    seeds = len(result["seeds"])
    lines = [f"### {preset}: summary, CER differences a − b in points (paired over {seeds} seed(s); 95 % interval; "
             "* = beyond the minimum detectable difference, MDD; negative: a is better)", "",
             "| comparison | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)] + lines
    gaps = [d for d in result.get("gap_differences") or [] if is_matched_pair(rows, d["a"], d["b"])]
    if gaps:
        parts = []
        for d in gaps:
            g = d["gap"]["mean"]
            interval = f" [{g['low']:+.4f}, {g['high']:+.4f}]" if math.isfinite(g["low"]) else ""
            parts.append(f"{rows[d['a']]['label']} {g['mean']:+.4f}{interval}")
        lines += ["", "Equilibrium gap, PTLOC − matched CSSL, mean over shards (bits; negative: nearer "
                  "equilibrium): " + "; ".join(parts) + "."]
    return lines + [""]


def _gap_lines(preset: str, result: dict) -> List[str]:
    """The gap of each PTLOC run minus its matched CSSL's, and the gap against downstream CER."""
    rows, lines = result["checkpoints"], []
    differences = result.get("gap_differences") or []
    if differences:
        shards = list(differences[0]["gap"])
        lines += [f"### {preset}: equilibrium gap, PTLOC minus its compute-matched CSSL (bits; paired over seeds, "
                  "95 % interval; negative: PTLOC is nearer equilibrium)", "",
                  "| comparison | " + " | ".join(shards) + " |", "|---|" + "---|" * len(shards)]
        for d in differences:
            cells = [f"{g['mean']:+.4f}" + (f" [{g['low']:+.4f}, {g['high']:+.4f}]" if math.isfinite(g["low"]) else "")
                     for g in d["gap"].values()]
            lines.append(f"| {rows[d['a']]['label']} − {rows[d['b']]['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    for measure, title in MEASURES.items():
        found = (result.get("gap_vs_cer") or {}).get(measure)
        if found and len(found["rows"]) >= 3:
            rho = found["spearman"]
            lines.append(f"Gap against {title} CER: Spearman ρ = {rho:+.2f} over {len(found['rows'])} pre-trained "
                         "checkpoints (mean gap over shards and seeds against mean CER over sets and seeds; "
                         "ρ > 0: a lower gap goes with a lower CER).")
    return lines + [""] if lines else []


def _step_size_lines(preset: str, result: dict) -> List[str]:
    """The inner step-size sweep: per α/β, PTLOC.1's gap and its downstream CER minus the matched CSSL's."""
    sweep = result.get("step_size") or []
    if not sweep:
        return []
    rows = result["checkpoints"]
    lines = [f"### {preset}: the inner step size of PTLOC.1 (α = ratio × β; each against the same compute-matched "
             "CSSL, mean over seeds and sets)", "",
             "| α/β | α | mean gap (bits) | gap − matched CSSL's | probe CER − matched (points) "
             "| fine-tuning CER − matched (points) |", "|---|---|---|---|---|---|"]
    for e in sweep:
        diff = e.get("gap_difference")
        cells = [f"{e['ratio']:g}", f"{e['inner_lr']:g}", f"{e['gap']:.4f}", f"{diff:+.4f}" if diff is not None else "–"]
        cells += [f"{100 * e[m]['cer_difference']:+.1f}" if m in e else "–" for m in MEASURES]
        lines.append("| " + " | ".join(cells) + " |")
    against = {e["against"] for e in sweep if e.get("against")}
    if against:
        lines += ["", "Matched CSSL: " + ", ".join(rows[a]["label"] for a in sorted(against)) + "."]
    return lines + [""]


def _paper_gain_line(result: dict, measure: str, prefix: str = "") -> str:
    """The table row of the paper's one-round relative gains for this kind of pre-training, per set
    in CER points of CSSL.1; `prefix` leads its label (the summary names the measure)."""
    kind = result.get("kind", "multi-domain")
    low, high = PAPER_GAINS[kind]
    cells = []
    for s in result["sets"]:
        reference = result["detectable"][measure][s].get("cer", {}).get("cssl1_mean")
        cells.append(f"{100 * low * reference:.1f}–{100 * high * reference:.1f}" if reference else "–")
    return f"| {prefix}the paper's {kind} gains ({100 * low:g}–{100 * high:g} % rel.) on CSSL.1's CER | " + " | ".join(cells) + " |"


def _cost_line(preset: str, result: dict) -> str:
    seconds = result.get("seconds")
    if not seconds:
        return ""
    parts = ", ".join(f"{name} {value / 60:.0f}" for name, value in seconds.items())
    return (f"Compute of {preset} ({len(result['seeds'])} seed(s)), the stages' own times summed: {parts} minutes; "
            f"{sum(seconds.values()) / 3600:.1f} process-hours in all.\n")


def markdown(preset: str, result: dict) -> str:
    """Per preset: pre-training accuracy, both downstream measures with their minimum detectable
    differences and comparisons, and the gap table."""
    sets, rows = result["sets"], result["checkpoints"]
    seeds = len(result["seeds"])
    heads = [f"{s} ({'seen' if seen else 'unseen'})" for s, seen in sets.items()]
    pretrained = {n: r for n, r in rows.items() if r["valid_accuracy"]}
    lines = _summary_lines(preset, result, heads)
    if pretrained:
        shards = list(next(iter(pretrained.values()))["valid_accuracy"])
        chance = next(iter(pretrained.values()))["chance"]
        family = result.get("family", "wav2vec2")
        what = ("masked-code accuracy" if family == "bestrq" else "contrastive accuracy")
        chance_is = ("chance: the largest majority-code share" if family == "bestrq" else "chance")
        lines += [f"### {preset}: did pre-training learn? Validation {what} per shard at the end "
                  f"of each run ({chance_is} {chance:.3f})", "",
                  "| checkpoint | " + " | ".join(shards) + " | lowest / chance | updates per seed |",
                  "|---|" + "---|" * (len(shards) + 2)]
        for row in pretrained.values():
            lowest = min(row["valid_accuracy"][s]["mean"] for s in shards)
            lines.append(f"| {row['label']} | " + " | ".join(f"{row['valid_accuracy'][s]['mean']:.3f}" for s in shards)
                         + f" | {lowest / chance:.1f}x | {next(iter(row['num_updates'].values()))} |")
        if "cssl.1" in pretrained:
            lines += ["", learning_verdict(pretrained["cssl.1"], chance, family)]
        lines.append("")
    for measure, title in MEASURES.items():
        shown = {n: r for n, r in rows.items() if r[measure]}
        if not shown:
            continue
        lines += [f"### {preset}: {title}, WER / CER (%) on the test sets, mean ± sd over {seeds} seed(s)", "",
                  "| checkpoint | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)]
        for row in shown.values():
            cells = [f"{_cell(row[measure][s]['wer'])} / {_cell(row[measure][s]['cer'])}" if s in row[measure] else "–"
                     for s in sets]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        detectable = result["detectable"][measure]
        cells = []
        for s in sets:
            d = detectable[s].get("cer")
            if not d or not math.isfinite(d["mdd"]):
                cells.append("n/a (one seed)")
            else:
                need = f"; {d['seeds_for_5_percent_relative']} seeds for 5 % rel." if d["seeds_for_5_percent_relative"] else ""
                cells.append(f"{100 * d['mdd']:.1f} ({100 * d['mdd_relative']:.0f} % rel.){need}")
        lines.append("| minimum detectable CER difference | " + " | ".join(cells) + " |")
        if any("paired_mdd" in detectable[s].get("cer", {}) for s in sets):
            cells = []
            for s in sets:
                d = detectable[s].get("cer") or {}
                if not math.isfinite(d.get("paired_mdd", math.nan)):
                    cells.append("n/a (one seed)" if seeds == 1 else "–")
                    continue
                need = d["paired_seeds_for_5_percent_relative"]
                cells.append(f"{100 * d['paired_mdd']:.1f} ({100 * d['paired_mdd_relative']:.0f} % rel.)"
                             + (f"; {need} seeds for 5 % rel." if need else ""))
            lines.append("| … paired, PTLOC − matched CSSL | " + " | ".join(cells) + " |")
        lines += [_paper_gain_line(result, measure), ""]
        if result["comparisons"][measure]:
            lines += [f"{title}: CER differences a − b (points, paired over seeds; relative to b; 95 % interval; "
                      "* = beyond the minimum detectable difference: the pooled paired one against a matched CSSL, "
                      "the pair's own for the step-size sweep)", ""]
            lines += _difference_lines(result, measure, heads) + [""]
    gapped = {n: r for n, r in rows.items() if r["gap"]}
    shards = list(next(iter(gapped.values()))["gap"])
    lines += [f"### {preset}: validation loss / equilibrium gap per pre-training shard (bits per target)", "",
              "| checkpoint | " + " | ".join(shards) + " | passes per seed |", "|---|" + "---|" * (len(shards) + 1)]
    for row in gapped.values():
        cells = [f"{row['gap'][s]['loss_before']['mean']:.3f} / {row['gap'][s]['gap']['mean']:+.4f}" for s in shards]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {next(iter(row['passes'].values()))} |")
    lines += [""] + _gap_lines(preset, result) + _step_size_lines(preset, result)
    return "\n".join(lines) + "\n" + _cost_line(preset, result)


def new_path(path: str) -> str:
    """path, or path with .1, .2 … before the extension if it exists: results are never overwritten."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(path):
        path, n = f"{stem}.{n}{ext}", n + 1
    return path


# ------------------------------------------------------------------ command line
def make_corpus(out: str, preset: str, size: str, source: Optional[str] = None) -> None:
    """Stage: the preset's built-in corpus (eqssl-make-corpus resumes and verifies on a rerun);
    ``source``: the preset's file if it is not a built-in."""
    folder = os.path.join(out, preset, "corpus")
    print(f"[{preset}] corpus: eqssl-make-corpus {folder} --preset {source or preset} --size {size}", flush=True)
    result = subprocess.run(["eqssl-make-corpus", folder, "--preset", source or preset, "--size", size])
    if result.returncode != 0:  # eqssl-make-corpus printed why
        raise SystemExit(f"eqssl-reproduce: [{preset}] corpus: eqssl-make-corpus {folder} failed (exit status "
                         f"{result.returncode}); nothing was trained")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqssl-reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["multidomain"],
                        help="built-in corpus presets (recipes/corpus/NAME.yaml: multidomain, multilingual, ...) "
                        "or preset .yaml files (docs/corpus.md); each runs in OUT/<its name>")
    parser.add_argument("--size", default="tiny", help="tiny, small, full, or a settings .yaml file")
    parser.add_argument("--model", default="wav2vec2", choices=sorted(FAMILIES),
                        help="model family: wav2vec2 (eq_wav2vec2) or bestrq (eq_bestrq, the paper's); "
                        "the recipes are recipes/pretrain/{cssl,ptloc}_[bestrq_]<size's model>.yaml")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 1..N (training and fine-tuning)")
    parser.add_argument("--out", required=True, help="experiment folder (reruns continue it)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="(preset, seed) chains run at once, each with cores/jobs threads")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: tabulate the seeds whose every stage has finished")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        raise SystemExit("eqssl-reproduce: --seeds and --jobs must be at least 1")
    try:
        settings = load_settings(args.size, args.model)
        settings["preset_files"] = resolve_presets(args.preset, settings)
        args.preset = list(dict.fromkeys(preset_name(p) for p in args.preset))
        for preset in args.preset:
            finetune_sets(preset, settings)  # fail on a bad set or run name before any work
            names = [r.name for r in plan_pretraining(preset, settings)] + [CONTROL]
            unknown = [n for n in settings["finetune"].get("checkpoints") or [] if n not in names]
            if unknown:
                raise ReproduceError(f"{settings['path']}: finetune.checkpoints: unknown run(s) {unknown}; "
                                     f"the {preset} runs are {', '.join(names)}")
    except (ReproduceError, CorpusError) as error:
        raise SystemExit(f"eqssl-reproduce: {error}")
    if args.report:  # reads finished records only, and never overwrites a results file
        return run_experiment(args, settings)
    try:
        with folder_lock(args.out, "eqssl-reproduce"):
            return run_experiment(args, settings)
    except FolderLockedError as error:
        raise SystemExit(f"eqssl-reproduce: {error}")


def run_experiment(args: argparse.Namespace, settings: dict) -> int:
    """The corpora, every (preset, seed) chain (or, with --report, the finished ones), the tables."""
    start = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    chains = [Chain(p, s, args.out, settings, threads) for p in args.preset for s in range(1, args.seeds + 1)]
    results: Dict[str, Dict[int, dict]] = {p: {} for p in args.preset}
    if not args.report:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each corpus is one subprocess
            list(pool.map(lambda preset: make_corpus(args.out, preset, settings["corpus_size"],
                                                     settings["preset_files"].get(preset)), args.preset))
    try:
        if args.report:
            for chain in chains:
                found = collect_chain(chain)
                if found is None:
                    print(f"{chain.tag}: not finished, left out of the tables", flush=True)
                else:
                    results[chain.preset][chain.seed] = found
            empty = [p for p in args.preset if not results[p]]
            if empty:
                raise ReproduceError(f"no finished seed for {', '.join(empty)} under {args.out}")
        elif args.jobs == 1:
            for chain in chains:
                results[chain.preset][chain.seed] = run_chain(chain)
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
                futures = {pool.submit(run_chain, c): c for c in chains}
                for future in concurrent.futures.as_completed(futures):
                    chain = futures[future]
                    results[chain.preset][chain.seed] = future.result()
    except ReproduceError as error:
        raise SystemExit(f"eqssl-reproduce: {error}")
    summary = {"settings": settings, "wall_seconds": round(time.time() - start, 1),
               "presets": {p: aggregate(p, settings, results[p]) for p in args.preset}}
    text = "\n".join(markdown(p, summary["presets"][p]) for p in args.preset)
    md, js = new_path(os.path.join(args.out, "results.md")), new_path(os.path.join(args.out, "results.json"))
    with open(js, "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    with open(md, "w") as f:
        f.write(text)
    print("\n" + text + f"\n(written to {md} and {js}; {summary['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
