"""The experiment's plan: its settings file read and checked, and every pre-training run of one
(preset, seed) with the runs it starts from."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import yaml

from .statistics import mean
from ..corpus.presets import RECIPES, SIZES, Preset, is_file, load_preset, preset_name, preset_path

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The eqssl package folder: fairseq's --user-dir."""


CONTROL, CONTROL_LABEL = "none", "No pre-training (random init)"
FBANK_LABEL = "FBANK (probe only)"


class ReproduceError(RuntimeError):
    """A run of the experiment failed; the message names its log."""


# ------------------------------------------------------------------ plan
PAPER_RATIO = 10.0
"""α/β in the paper (both settings)."""

COMPARISONS = {
    "pre-training": "CSSL.1 − random init: does pre-training show at all",
    "½ budget": "CSSL.1 − CSSL.1 at ½ budget: the positive control (a known, better model)",
    "¼ budget": "CSSL.1 − CSSL.1 at ¼ budget",
    "constraint": "PTLOC − its twin (inner_steps 0, same start, updates, learning rates, schedule)",
    "pass-matched": "PTLOC − CSSL with as many forward/backward passes, same learning rate and shape",
    "twin chain": "PTLOC.r − PTLOC.r of the chain with the constraint off in every PTLOC round",
    "vs CSSL.1": "the paper's comparison: PTLOC.r − CSSL.1",
    "vs CSSL.r": "the paper's comparison: PTLOC.r − the CSSL round it started from",
}
"""The kinds of a − b comparisons a run can ask for (PretrainRun.against), in the order reported."""


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
    round: int = 1
    ratio: Optional[float] = None
    """α/β of a PTLOC run (None for every other run)."""
    twin: Optional[str] = None
    """For a PTLOC run: its constraint-off twin, the run its trajectory divergence is measured from."""
    against: Dict[str, str] = field(default_factory=dict)
    """Comparison kind (COMPARISONS) -> the run b of the row `this − b`."""
    schedule: Dict[str, float] = field(default_factory=dict)
    """The learning-rate schedule (fairseq scheduler and its numbers), for the proportions table."""


FAMILIES = {"wav2vec2": "", "bestrq": "bestrq_", "cpc": "cpc_"}
"""Model families eqssl-reproduce runs: --model NAME picks recipes/pretrain/{cssl,ptloc}_<prefix><model>."""

PROPORTION_FIELDS = {
    "ptloc_length": "PTLOC.r updates / CSSL.r updates",
    "ptloc_lr": "β / the CSSL round's peak learning rate",
    "ptloc_decay": "the part of a PTLOC round whose learning rate decays",
    "final_lr_scale": "the learning rate at the end of a PTLOC round / β",
}
"""What a settings file's ``proportions.<kind>`` states, per kind of pre-training."""

RETIRED = {
    ("cssl1", "patience"): "CSSL.1 runs a fixed budget of cssl1.max_update updates (patience on a loss that "
                           "barely moves on wav2vec 2.0's early plateau stopped runs at chance)",
    ("ptloc", "max_update"): "a PTLOC round is proportions.<kind>.ptloc_length of its CSSL round",
    ("ptloc", "lr"): "β is proportions.<kind>.ptloc_lr x the CSSL round's peak learning rate",
    ("ptloc", "inner_lr"): "α is each of ptloc.ratios x β",
    ("ptloc", "warmup_updates"): "ptloc.warmup is the warm-up's share of the round",
    ("cssl_round", "max_update"): "CSSL.r (r >= 2) is as long as CSSL.1 and runs on its schedule",
}


NOT_SETTINGS = ("path", "preset_files", "controls_only", "family", "sha256", "families", "costs", "cells")
"""Settings entries that are not part of what a record was computed under: where the file lies,
what this invocation runs, the hash itself; the family is in the experiment's name and its section
is already merged (the other families' sections do not count); the plan's costs and cell limit
change estimates, not results."""


def settings_sha256(settings: dict) -> str:
    """The settings' hash: SHA-256 of their canonical JSON (comments and key order do not count)."""
    kept = {k: v for k, v in settings.items() if k not in NOT_SETTINGS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def load_settings(size_or_path: str, family: str = "wav2vec2") -> dict:
    """The experiment settings: recipes/reproduce/<size>.yaml, or a YAML file path; for a model
    family other than wav2vec 2.0 the fields under ``families.<family>`` replace the top-level ones."""
    path = size_or_path if size_or_path.endswith((".yaml", ".yml")) else os.path.join(
        RECIPES, "reproduce", f"{size_or_path}.yaml")
    if not os.path.exists(path):
        choices = sorted(f[:-5] for f in os.listdir(os.path.join(RECIPES, "reproduce")) if f.endswith(".yaml"))
        raise ReproduceError(f"--size {size_or_path}: no such settings file; sizes: {', '.join(choices)} "
                             "(or a .yaml path)")
    with open(path) as f:
        settings = yaml.safe_load(f)
    if family not in FAMILIES:
        raise ReproduceError(f"--model {family}: unknown model family; choose one of {', '.join(FAMILIES)}")
    if family != "wav2vec2":
        if family not in (settings.get("families") or {}):
            raise ReproduceError(f"{path}: no families.{family} section: the wav2vec 2.0 overrides of this "
                                 f"file do not apply to {family}; add the section (it may be empty: {{}})")
        for key, value in settings["families"][family].items():  # mappings are merged one level deep
            merge = isinstance(value, dict) and isinstance(settings.get(key), dict)
            settings[key] = {**settings[key], **value} if merge else value
    check_settings(path, settings)
    settings["family"] = family
    settings["sha256"] = settings_sha256(settings)  # before any invocation's changes (--controls-only)
    settings["path"] = os.path.abspath(path)
    return settings


def check_settings(path: str, settings: dict) -> None:
    """Every field the plan reads, present and of the right kind; retired fields named with why."""
    required = ["corpus_size", "model", "rounds", "inner_steps", "validate_interval_updates", "cssl1",
                "ptloc", "proportions", "temperature_baseline", "gap", "finetune"]
    missing = [k for k in required if k not in settings]
    if missing:
        raise ReproduceError(f"{path}: missing field(s) {', '.join(missing)}")
    for (section, key), why in RETIRED.items():
        if key in (settings.get(section) or {}):
            raise ReproduceError(f"{path}: {section}.{key} is no longer read: {why}; remove the field")
    if not isinstance(settings["inner_steps"], int) or settings["inner_steps"] < 1:
        raise ReproduceError(f"{path}: inner_steps: one K >= 1 for every PTLOC run, got {settings['inner_steps']!r}")
    if not isinstance(settings["rounds"], int) or not 1 <= settings["rounds"] <= 3:
        raise ReproduceError(f"{path}: rounds: 1, 2 or 3, got {settings['rounds']!r}")
    ratios = settings["ptloc"].get("ratios")
    if not ratios or any(not isinstance(r, (int, float)) or r <= 0 for r in ratios):
        raise ReproduceError(f"{path}: ptloc.ratios: a list of α/β values > 0, got {ratios!r}")
    for kind in ("multi-domain", "multilingual"):
        found = (settings["proportions"] or {}).get(kind) or {}
        absent = [k for k in PROPORTION_FIELDS if k not in found]
        if absent:
            raise ReproduceError(f"{path}: proportions.{kind}: missing field(s) {', '.join(absent)} "
                                 f"({'; '.join(f'{k}: {PROPORTION_FIELDS[k]}' for k in absent)})")
        if not 0 < float(settings["ptloc"].get("warmup", 0)) + float(found["ptloc_decay"]) < 1:
            raise ReproduceError(f"{path}: ptloc.warmup + proportions.{kind}.ptloc_decay must be in (0, 1)")
    phones = settings.get("phones")
    if phones is not None:
        if not isinstance(phones, dict) or not isinstance(phones.get("layer"), int) or phones["layer"] < 0:
            raise ReproduceError(f"{path}: phones.layer: the encoder layer that ABX and the phone probe score "
                                 f"(an integer >= 0, fixed before any PTLOC comparison), got {phones!r}")
    for fraction in settings.get("positive_control") or []:
        if not 0 < fraction < 1:
            raise ReproduceError(f"{path}: positive_control: fractions of CSSL.1's budget in (0, 1), got {fraction!r}")


def recipe_value(recipe: str, section: str, key: str):
    """A field of a recipes/pretrain recipe (e.g. optimization.lr), as the YAML states it."""
    with open(os.path.join(RECIPES, "pretrain", f"{recipe}.yaml")) as f:
        return (yaml.safe_load(f).get(section) or {}).get(key)


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The value the last ``key=value`` (or ``++key=value``) override gives, else None."""
    values = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith(key + "=")]
    return values[-1] if values else None


def proportions(preset: str, settings: dict) -> dict:
    """The settings' proportions for this preset's kind of pre-training (multi-domain / multilingual)."""
    return settings["proportions"][pretraining_kind(preset, settings)]


def ptloc_schedule(updates: int, beta: float, warmup: float, decay: float, final_lr_scale: float) -> Dict[str, float]:
    """fairseq's tri_stage in steps: warm-up, constant at β, then exponential decay to final_lr_scale·β."""
    warmup_steps, decay_steps = round(warmup * updates), max(1, round(decay * updates))
    return {"scheduler": "tri_stage", "lr": beta, "max_update": updates, "warmup_steps": warmup_steps,
            "hold_steps": updates - warmup_steps - decay_steps, "decay_steps": decay_steps,
            "init_lr_scale": 0.01, "final_lr_scale": final_lr_scale}


def schedule_overrides(schedule: Dict[str, float]) -> List[str]:
    """The hydra overrides that give a PTLOC-recipe run this tri_stage schedule."""
    return [f"optimization.lr=[{schedule['lr']:.6g}]", f"optimization.max_update={schedule['max_update']}",
            "lr_scheduler.phase_ratio=null", f"lr_scheduler.warmup_steps={schedule['warmup_steps']}",
            f"lr_scheduler.hold_steps={schedule['hold_steps']}", f"lr_scheduler.decay_steps={schedule['decay_steps']}",
            f"lr_scheduler.init_lr_scale={schedule['init_lr_scale']}",
            f"lr_scheduler.final_lr_scale={schedule['final_lr_scale']}"]


def plan_pretraining(preset: str, settings: dict, chain_ratio: Optional[float] = None) -> List[PretrainRun]:
    """Every pre-training run of one seed, in an order where each run's start (and a PTLOC run's
    twin) exists before it. Rounds r >= 2 run PTLOC at ``chain_ratio``, which the α rule picks
    from round 1 (choose_chain_ratio); without it they are left out, unless one ratio is set.
    With ``controls_only``: CSSL.1 and its positive controls alone (eqssl-reproduce --controls-only)."""
    runs = _plan_pretraining(preset, settings, chain_ratio)
    if settings.get("controls_only"):
        runs = [r for r in runs if r.name == "cssl.1" or r.name.startswith("cssl.1.x")]
    return runs


def _plan_pretraining(preset: str, settings: dict, chain_ratio: Optional[float] = None) -> List[PretrainRun]:
    family = settings.get("family", "wav2vec2")
    model = FAMILIES[family] + str(settings["model"])
    ptloc, gap, k = settings["ptloc"], settings["gap"], settings["inner_steps"]
    kind = proportions(preset, settings)
    ratios = [float(r) for r in ptloc["ratios"]]
    if chain_ratio is None and len(ratios) == 1:
        chain_ratio = ratios[0]
    interval = settings["validate_interval_updates"]
    common = [f"++task.validation_gap_steps={gap['inner_steps']}", f"++task.validation_gap_lr={gap['inner_lr']}",
              f"dataset.validate_interval_updates={interval}", f"checkpoint.save_interval_updates={interval}",
              "common.log_interval=10", *settings.get("pretrain_overrides", [])]
    continued = common + settings.get("continued_overrides", [])  # every run that starts from another

    cssl1 = settings["cssl1"]
    cssl_recipe = f"cssl_{model}"
    budget = [f"dataset.validate_interval_updates={cssl1['validate_interval_updates']}",
              f"checkpoint.save_interval_updates={cssl1['validate_interval_updates']}", *cssl1.get("overrides", [])]
    cssl_updates = int(cssl1["max_update"])
    peak = float((override_value(common + budget, "optimization.lr") or str(recipe_value(cssl_recipe, "optimization", "lr")))
                 .strip("[]").split(",")[0])
    warmup = int(override_value(common + budget, "lr_scheduler.warmup_updates")
                 or recipe_value(cssl_recipe, "lr_scheduler", "warmup_updates") or 0)

    def cssl_schedule(updates: int, warmup_updates: int) -> Dict[str, float]:
        return {"scheduler": "polynomial_decay", "lr": peak, "max_update": updates, "warmup_updates": warmup_updates}

    def cssl_run(name: str, label: str, init: Optional[str], fraction: float = 1.0, r: int = 1, **extra) -> PretrainRun:
        updates, warm = round(cssl_updates * fraction), round(warmup * fraction)
        base = continued if init else common
        return PretrainRun(name, label, cssl_recipe, base + budget + [
            f"optimization.max_update={updates}", f"lr_scheduler.warmup_updates={warm}"],
            init_from=init, round=r, schedule=cssl_schedule(updates, warm), **extra)

    ptloc_updates = round(float(kind["ptloc_length"]) * cssl_updates)
    beta = float(f"{float(kind['ptloc_lr']) * peak:.6g}")

    def ptloc_run(name: str, label: str, init: str, inner_steps: int, ratio: Optional[float], r: int,
                  passes: int = 1, **extra) -> PretrainRun:
        """PTLOC (inner_steps K), its twin (0) or its pass-matched CSSL (0, passes = K + 1 times
        the updates): the PTLOC recipe, β, and the same schedule shape stretched to its length."""
        schedule = ptloc_schedule(ptloc_updates * passes, beta, float(ptloc.get("warmup", 0.05)),
                                  float(kind["ptloc_decay"]), float(kind["final_lr_scale"]))
        overrides = continued + schedule_overrides(schedule) + [f"++task.inner_steps={inner_steps}"]
        if ratio is not None:
            overrides.append(f"++task.inner_lr={float(f'{ratio * beta:.6g}')}")
            schedule = dict(schedule, inner_lr=float(f"{ratio * beta:.6g}"))
        return PretrainRun(name, label, f"ptloc_{model}", overrides, init_from=init, round=r, ratio=ratio,
                           schedule=schedule, **extra)

    fractions = sorted(float(f) for f in settings.get("positive_control") or [])
    against = {"pre-training": CONTROL}
    against.update({f"{'½' if f == 0.5 else '¼' if f == 0.25 else f'{f:g}x'} budget": f"cssl.1.x{f:g}" for f in fractions})
    runs = [cssl_run("cssl.1", "CSSL.1", None, against=against)]
    # The positive control: CSSL.1 from scratch with a fraction of its budget, the same schedule shape.
    for f in fractions:
        runs.append(cssl_run(f"cssl.1.x{f:g}", f"CSSL.1 at {f:g} of its budget", None, fraction=f))
    twin, matched = "ptloc.1.off", f"cssl.1+{k + 1}x"
    runs.append(ptloc_run(twin, "PTLOC.1 constraint off (twin, K=0)", "cssl.1", 0, None, 1))
    if ptloc.get("pass_matched", True):
        runs.append(ptloc_run(matched, f"CSSL.1 +{k + 1}x updates (pass-matched to PTLOC.1)", "cssl.1", 0, None, 1,
                              passes=k + 1))
    for ratio in ratios:
        pairs = {"constraint": twin, "pass-matched": matched, "vs CSSL.1": "cssl.1"}
        if not ptloc.get("pass_matched", True):
            del pairs["pass-matched"]
        runs.append(ptloc_run(f"ptloc.1.r{ratio:g}", f"PTLOC.1 K={k} α/β={ratio:g}", "cssl.1", k, ratio, 1, twin=twin,
                              against=pairs))
    pretrain = preset_sets(preset, settings).pretrain
    if len({spec.language for spec in pretrain}) > 1:  # multilingual pre-training: language sampling
        temp = settings["temperature_baseline"]
        per = temp["shards_per_update"]
        scale = max(1, len(pretrain) // per)  # as many shard passes as CSSL.1: 1/per-th of the shards per update
        runs.append(PretrainRun(
            "cssl.1-temp", f"CSSL.1 temperature sampling (T={temp['temperature']}, {per} language/update)",
            cssl_recipe, common + cssl1.get("overrides", []) + [
                "++task.shard_sampling=temperature", f"++task.sampling_temperature={temp['temperature']}",
                f"++task.shards_per_update={per}", f"optimization.max_update={cssl_updates * scale}",
                f"lr_scheduler.warmup_updates={warmup * scale}",
                f"dataset.validate_interval_updates={cssl1['validate_interval_updates'] * scale}",
                f"checkpoint.save_interval_updates={cssl1['validate_interval_updates'] * scale}",
            ], schedule=cssl_schedule(cssl_updates * scale, warmup * scale)))
    if rounds(preset, settings) < 2 or chain_ratio is None:
        return runs
    previous, previous_twin = f"ptloc.1.r{chain_ratio:g}", twin
    for r in range(2, rounds(preset, settings) + 1):
        runs.append(cssl_run(f"cssl.{r}", f"CSSL.{r}", previous, r=r))
        runs.append(cssl_run(f"cssl.{r}.twin", f"CSSL.{r} of the twin chain", previous_twin, r=r))
        runs.append(ptloc_run(f"ptloc.{r}.off", f"PTLOC.{r} constraint off (twin, K=0)", f"cssl.{r}", 0, None, r))
        runs.append(ptloc_run(f"ptloc.{r}.twin", f"PTLOC.{r} of the twin chain (K=0)", f"cssl.{r}.twin", 0, None, r))
        runs.append(ptloc_run(f"ptloc.{r}", f"PTLOC.{r} K={k} α/β={chain_ratio:g}", f"cssl.{r}", k, chain_ratio, r,
                              twin=f"ptloc.{r}.off", against={
                                  "constraint": f"ptloc.{r}.off", "twin chain": f"ptloc.{r}.twin",
                                  "vs CSSL.1": "cssl.1", "vs CSSL.r": f"cssl.{r}"}))
        previous, previous_twin = f"ptloc.{r}", f"ptloc.{r}.twin"
    return runs


def learning_rates(schedule: Dict[str, float]) -> List[float]:
    """The learning rate of every update of a run, from fairseq's own scheduler classes."""
    from fairseq.optim.lr_scheduler.polynomial_decay_schedule import (PolynomialDecayLRSchedule,
                                                                      PolynomialDecayLRScheduleConfig)
    from fairseq.optim.lr_scheduler.tri_stage_lr_scheduler import TriStageLRSchedule, TriStageLRScheduleConfig

    import torch
    from fairseq.optim import FairseqOptimizer

    class LearningRateOnly(FairseqOptimizer):
        """An SGD over one number: what the scheduler steps, with nothing to train."""

        def __init__(self) -> None:
            super().__init__(None)
            self._optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)

    fields = {k: v for k, v in schedule.items() if k not in ("scheduler", "lr", "inner_lr")}
    if schedule["scheduler"] == "tri_stage":
        cfg = TriStageLRScheduleConfig(lr=[schedule["lr"]], phase_ratio=None, **fields)
        make = TriStageLRSchedule
    else:
        fields["total_num_update"] = fields.pop("max_update")
        cfg = PolynomialDecayLRScheduleConfig(lr=[schedule["lr"]], **fields)
        make = PolynomialDecayLRSchedule
    optimizer = LearningRateOnly()
    scheduler = make(cfg, optimizer)
    rates = []
    for update in range(int(schedule["max_update"])):  # fairseq steps the scheduler before each update
        rates.append(scheduler.step_update(update))
    return rates


def rounds(preset: str, settings: dict) -> int:
    """How many rounds this preset runs: ``rounds_by_preset.<preset>``, else ``rounds``."""
    return int((settings.get("rounds_by_preset") or {}).get(preset, settings["rounds"]))


def round1_ratios(settings: dict) -> List[float]:
    return [float(r) for r in settings["ptloc"]["ratios"]]


def choose_chain_ratio(settings: dict, round1: Sequence[Dict[str, dict]]) -> dict:
    """The pre-registered α rule (docs/results.md): from round 1's validation data only, the
    largest α/β whose PTLOC.1 validation loss at θ (eqssl-gap's loss before the inner step, mean
    over shards and seeds) is within ``chain.tolerance_bits`` of its twin's; the smallest ratio
    if none is. ``round1``: per seed, the stage records by run name."""
    tolerance = float((settings.get("chain") or {}).get("tolerance_bits", 0.1))
    evidence = {}
    for ratio in round1_ratios(settings):
        deltas = [mean(r[f"ptloc.1.r{ratio:g}"]["gap"][s]["loss_before"] - r["ptloc.1.off"]["gap"][s]["loss_before"]
                       for s in r["ptloc.1.off"]["gap"]) for r in round1]
        evidence[f"{ratio:g}"] = mean(deltas)
    eligible = [float(r) for r, d in evidence.items() if d <= tolerance]
    ratio = max(eligible) if eligible else min(round1_ratios(settings))
    return {"ratio": ratio, "tolerance_bits": tolerance, "seeds": len(round1),
            "loss_at_theta_minus_twin": evidence}


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


def phone_sets(preset: str, settings: dict) -> Dict[str, bool]:
    """The sets of ABX and the phone probe (``phones``; none without it): ``phones.sets.<preset>``,
    by default every labelled set of the preset (they cost little: docs/results.md)."""
    if not settings.get("phones"):
        return {}
    every = {spec.name: spec.seen for spec in preset_sets(preset, settings).finetune}
    chosen = (settings["phones"].get("sets") or {}).get(preset) or list(every)
    unknown = [s for s in chosen if s not in every]
    if unknown:
        raise ReproduceError(f"{settings['path']}: phones.sets.{preset}: unknown set(s) {unknown}; "
                             f"the preset has {', '.join(every)}")
    return {s: every[s] for s in chosen}


def measured_sets(preset: str, settings: dict) -> Dict[str, bool]:
    """Every set the experiment measures anything on: the fine-tuning sets and the phone sets."""
    return {**finetune_sets(preset, settings), **phone_sets(preset, settings)}


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
