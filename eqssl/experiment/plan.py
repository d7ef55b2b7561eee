"""The experiment's plan: its settings file read and checked, and every pre-training run of one
(preset, seed) with the runs it starts from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import yaml

from ..corpus.presets import RECIPES, SIZES, Preset, is_file, load_preset, preset_name, preset_path

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The eqssl package folder: fairseq's --user-dir."""


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


def pretraining_kind(preset: str, settings: dict) -> str:
    """"multilingual" when the pre-training shards differ in language, else "multi-domain"."""
    return "multilingual" if len({s.language for s in preset_sets(preset, settings).pretrain}) > 1 else "multi-domain"
