"""eqssl-reproduce: the paper's experiment in miniature, with compute-matched baselines and seeds.

    eqssl-reproduce --preset multidomain multilingual --size small --seeds 3 --out runs/small --jobs 2

For each preset: the built-in corpus; then for each seed, stage by stage:

1. ``cssl.1``: CSSL from scratch until the validation loss stops improving (fairseq's
   ``checkpoint.patience``), capped at ``cssl1.max_update``; its best checkpoint starts the rest;
2. from CSSL.1, for every K in ``inner_steps``: ``ptloc.1.kK`` (PTLOC, ``ptloc.max_update``
   updates) and ``cssl.1+Nx``, CSSL continued for N = K+1 times as many updates at the same lr
   and schedule shape, i.e. as many forward/backward passes per shard as PTLOC spent;
   multilingual only: ``cssl.1-temp``, CSSL from scratch with XLS-R-style language sampling;
3. the alternating rounds ``cssl.r`` -> ``ptloc.r`` (r >= 2), each from the previous one;
4. ``eqssl-gap`` on every pre-trained checkpoint;
5. CTC fine-tuning of every checkpoint on every fine-tuning set (same recipe, budget, updates and
   seed), then greedy-CTC WER / CER on its test split.

Then ``results.json`` and ``results.md`` under OUT: rows are checkpoints, columns the
fine-tuning sets (seen / unseen in pre-training), cells mean ± standard deviation over seeds.
A stage that finished leaves ``eqssl_stage.json`` (its checkpoint's SHA-256) and is skipped on
a rerun if that still verifies; an interrupted fairseq run is resumed from its checkpoint_last.pt.
The settings of each size are YAML files in ``recipes/reproduce``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
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

from .corpus.presets import PRESETS

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
MARKER = "eqssl_stage.json"


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
    """Which of the run's checkpoints is its result: the best one for patience-stopped runs."""
    matched_to: Optional[str] = None
    """For a compute-matched baseline: the PTLOC run whose passes it matches."""


def load_settings(size_or_path: str) -> dict:
    """The experiment settings: recipes/reproduce/<size>.yaml, or a YAML file path."""
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
    settings["path"] = os.path.abspath(path)
    return settings


def plan_pretraining(preset: str, settings: dict) -> List[PretrainRun]:
    """Every pre-training run of one seed, in an order where each run's start exists before it."""
    model, ptloc, gap = settings["model"], settings["ptloc"], settings["gap"]
    interval = settings["validate_interval_updates"]
    common = [f"++task.validation_gap_steps={gap['inner_steps']}", f"++task.validation_gap_lr={gap['inner_lr']}",
              f"dataset.validate_interval_updates={interval}", f"checkpoint.save_interval_updates={interval}",
              "common.log_interval=10", *settings.get("pretrain_overrides", [])]
    first = settings["inner_steps"][0]

    def ptloc_run(name: str, label: str, k: int, init: str) -> PretrainRun:
        return PretrainRun(name, label, f"ptloc_{model}", common + [
            f"++task.inner_steps={k}", f"++task.inner_lr={ptloc['inner_lr']}", f"optimization.lr=[{ptloc['lr']}]",
            f"optimization.max_update={ptloc['max_update']}", f"lr_scheduler.warmup_updates={ptloc['warmup_updates']}",
        ], init_from=init)

    cssl1 = settings["cssl1"]
    patience = [f"checkpoint.patience={cssl1['patience']}",
                f"dataset.validate_interval_updates={cssl1['validate_interval_updates']}",
                f"checkpoint.save_interval_updates={cssl1['validate_interval_updates']}"]
    runs = [PretrainRun("cssl.1", "CSSL.1", f"cssl_{model}", common + patience + [
        f"optimization.max_update={cssl1['max_update']}"], checkpoint="checkpoint_best.pt")]
    for k in settings["inner_steps"]:
        runs.append(ptloc_run(f"ptloc.1.k{k}", f"PTLOC.1 K={k}", k, "cssl.1"))
        runs.append(PretrainRun(
            f"cssl.1+{k + 1}x", f"CSSL.1 +{k + 1}x updates (matched to PTLOC.1 K={k})", f"cssl_{model}", common + [
                f"optimization.lr=[{ptloc['lr']}]", f"optimization.max_update={ptloc['max_update'] * (k + 1)}",
                f"lr_scheduler.warmup_updates={ptloc['warmup_updates'] * (k + 1)}",
            ], init_from="cssl.1", matched_to=f"ptloc.1.k{k}"))
    if preset == "multilingual":
        temp = settings["temperature_baseline"]
        shards = len(PRESETS[preset].pretrain)
        per = temp["shards_per_update"]
        # As many shard passes as CSSL.1's budget: 1/per-th of the shards per update.
        scale = max(1, shards // per)
        runs.append(PretrainRun(
            "cssl.1-temp", f"CSSL.1 temperature sampling (T={temp['temperature']}, {per} language/update)",
            f"cssl_{model}", common + patience[:1] + [
                "++task.shard_sampling=temperature", f"++task.sampling_temperature={temp['temperature']}",
                f"++task.shards_per_update={per}", f"optimization.max_update={cssl1['max_update'] * scale}",
                f"dataset.validate_interval_updates={cssl1['validate_interval_updates'] * scale}",
                f"checkpoint.save_interval_updates={cssl1['validate_interval_updates'] * scale}",
            ], checkpoint="checkpoint_best.pt"))
    previous = f"ptloc.1.k{first}"
    for r in range(2, settings["rounds"] + 1):
        runs.append(PretrainRun(f"cssl.{r}", f"CSSL.{r}", f"cssl_{model}", common + [
            f"optimization.max_update={settings['cssl_round']['max_update']}"], init_from=previous))
        runs.append(ptloc_run(f"ptloc.{r}", f"PTLOC.{r} K={first}", first, f"cssl.{r}"))
        previous = f"ptloc.{r}"
    return runs


def finetune_sets(preset: str, settings: dict) -> Dict[str, bool]:
    """The fine-tuning sets of the experiment, each with whether it is seen in pre-training."""
    sets = {spec.name: spec.seen for spec in PRESETS[preset].finetune}
    chosen = (settings["finetune"].get("sets") or {}).get(preset)
    if chosen:
        unknown = [s for s in chosen if s not in sets]
        if unknown:
            raise ReproduceError(f"{settings['path']}: finetune.sets.{preset}: unknown set(s) {unknown}; "
                                 f"the preset has {', '.join(sets)}")
        sets = {s: sets[s] for s in chosen}
    return sets


# ------------------------------------------------------------------ stage bookkeeping
def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    if (os.path.exists(checkpoint) and sha256(checkpoint) == record["sha256"]
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
    record = {"checkpoint": checkpoint, "sha256": sha256(os.path.join(folder, checkpoint)), **extra}
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
    """(num_updates, task config) of a fairseq checkpoint."""
    from .models.eq_wav2vec2 import load_pretraining_checkpoint

    state = load_pretraining_checkpoint(path)
    return int(state["optimizer_history"][-1]["num_updates"]), state["cfg"]["task"]


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
            f"common.seed={seed}", f"common.user_dir={os.path.dirname(os.path.abspath(__file__))}", *run.overrides,
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
    updates, task_cfg = checkpoint_updates(os.path.join(folder, "checkpoint_last.pt"))
    gap = measure(chain, os.path.join(folder, run.checkpoint))
    record = mark_finished(
        folder, run.checkpoint, input_sha256=source["sha256"] if source else None, name=run.name, label=run.label,
        init_from=run.init_from, matched_to=run.matched_to, num_updates=updates,
        inner_steps=int(task_cfg["inner_steps"]), passes=passes(updates, task_cfg),
        gap=gap, seconds=round(time.time() - start, 1),
    )
    print(f"{chain.tag} {run.name}: finished, {updates} updates, mean gap {mean(g['gap'] for g in gap.values()):+.4f}"
          f" bits ({record['seconds']:.0f} s)", flush=True)
    return record


def measure(chain: Chain, checkpoint: str) -> Dict[str, dict]:
    """eqssl-gap of one checkpoint on the validation batches of every pre-training shard."""
    from .gap import measure_gap
    from .tasks.equilibrium_pretraining import discover_shards

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
            f"checkpoint.save_dir={os.path.abspath(save_dir)}",
            f"common.user_dir={os.path.dirname(os.path.abspath(__file__))}", *overrides]


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


def run_chain(chain: Chain) -> dict:
    """All stages of one (preset, seed): pre-training runs with their gaps, then fine-tuning."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(chain.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fairseq").setLevel(logging.WARNING)  # in-process gap and evaluation: progress lines only
    warnings.filterwarnings("ignore")
    done: Dict[str, dict] = {}
    for run in plan_pretraining(chain.preset, chain.settings):
        done[run.name] = pretrain(chain, run, done)
    results = {}
    for name, record in done.items():
        pretrained = os.path.join(chain.folder, name, record["checkpoint"])
        results[name] = {"pretraining": record, "finetune": {
            s: finetune(chain, name, pretrained, record["sha256"], s) for s in finetune_sets(chain.preset, chain.settings)}}
    return results


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
    results = {}
    for name, record in done.items():
        sets = {s: finished(os.path.join(chain.folder, "finetune", name, s), record["sha256"], False)
                for s in finetune_sets(chain.preset, chain.settings)}
        if any(r is None for r in sets.values()):
            return None
        results[name] = {"pretraining": record, "finetune": sets}
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


def aggregate(preset: str, settings: dict, per_seed: Dict[int, dict]) -> dict:
    """One preset's results: per checkpoint, per set, WER and CER over seeds; gaps; passes."""
    sets = finetune_sets(preset, settings)
    runs = plan_pretraining(preset, settings)
    table = {}
    for run in runs:
        row = {"label": run.label, "matched_to": run.matched_to, "sets": {}, "gap": {}, "passes": {}, "num_updates": {}}
        for set_name in sets:
            cells = [per_seed[s][run.name]["finetune"][set_name] for s in sorted(per_seed)]
            row["sets"][set_name] = {"wer": summarise([c["wer"] for c in cells]),
                                     "cer": summarise([c["cer"] for c in cells])}
        records = [per_seed[s][run.name]["pretraining"] for s in sorted(per_seed)]
        for shard in records[0]["gap"]:
            row["gap"][shard] = {key: summarise([r["gap"][shard][key] for r in records])
                                 for key in ("loss_before", "loss_after", "gap")}
        row["passes"] = {str(s): per_seed[s][run.name]["pretraining"]["passes"] for s in sorted(per_seed)}
        row["num_updates"] = {str(s): per_seed[s][run.name]["pretraining"]["num_updates"] for s in sorted(per_seed)}
        table[run.name] = row
    return {"sets": sets, "seeds": sorted(per_seed), "checkpoints": table}


def _cell(stat: dict) -> str:
    if stat["seeds"] > 1:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['sd']:.1f}"
    return f"{100 * stat['mean']:.1f}"


def markdown(preset: str, result: dict) -> str:
    """WER / CER table, gap table and the PTLOC-vs-matched-CSSL differences of one preset."""
    sets, rows = result["sets"], result["checkpoints"]
    seeds = len(result["seeds"])
    heads = [f"{s} ({'seen' if seen else 'unseen'})" for s, seen in sets.items()]
    lines = [f"### {preset}: WER / CER (%) on the test sets, mean ± sd over {seeds} seed(s)", "",
             "| checkpoint | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)]
    for row in rows.values():
        cells = [f"{_cell(row['sets'][s]['wer'])} / {_cell(row['sets'][s]['cer'])}" for s in sets]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    shards = list(next(iter(rows.values()))["gap"])
    lines += ["", f"### {preset}: validation loss / equilibrium gap per pre-training shard (bits per target)", "",
              "| checkpoint | " + " | ".join(shards) + " | passes per seed |", "|---|" + "---|" * (len(shards) + 1)]
    for row in rows.values():
        cells = [f"{row['gap'][s]['loss_before']['mean']:.3f} / {row['gap'][s]['gap']['mean']:+.4f}" for s in shards]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {next(iter(row['passes'].values()))} |")
    pairs = [(name, row["matched_to"]) for name, row in rows.items() if row["matched_to"] in rows]
    if pairs:
        lines += ["", f"### {preset}: PTLOC minus its compute-matched CSSL (WER points; * = beyond the spread, "
                  "|Δ| > sd₁ + sd₂)", "", "| PTLOC run | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)]
        for cssl, ptloc in pairs:
            cells = []
            for s in sets:
                a, b = rows[ptloc]["sets"][s]["wer"], rows[cssl]["sets"][s]["wer"]
                delta = 100 * (a["mean"] - b["mean"])
                beyond = seeds > 1 and abs(delta) > 100 * (a["sd"] + b["sd"])
                cells.append(f"{delta:+.1f}{'*' if beyond else ''}")
            lines.append(f"| {rows[ptloc]['label']} vs {rows[cssl]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def new_path(path: str) -> str:
    """path, or path with .1, .2 … before the extension if it exists: results are never overwritten."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(path):
        path, n = f"{stem}.{n}{ext}", n + 1
    return path


# ------------------------------------------------------------------ command line
def make_corpus(out: str, preset: str, size: str) -> None:
    """Stage: the preset's built-in corpus (eqssl-make-corpus resumes and verifies on a rerun)."""
    folder = os.path.join(out, preset, "corpus")
    print(f"[{preset}] corpus: eqssl-make-corpus {folder} --preset {preset} --size {size}", flush=True)
    subprocess.run(["eqssl-make-corpus", folder, "--preset", preset, "--size", size], check=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqssl-reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["multidomain"], choices=sorted(PRESETS))
    parser.add_argument("--size", default="tiny", help="tiny, small, full, or a settings .yaml file")
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
        settings = load_settings(args.size)
        for preset in args.preset:
            finetune_sets(preset, settings)  # fail on a bad set name before any work
    except ReproduceError as error:
        raise SystemExit(f"eqssl-reproduce: {error}")
    start = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    chains = [Chain(p, s, args.out, settings, threads) for p in args.preset for s in range(1, args.seeds + 1)]
    results: Dict[str, Dict[int, dict]] = {p: {} for p in args.preset}
    if not args.report:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each corpus is one subprocess
            list(pool.map(lambda preset: make_corpus(args.out, preset, settings["corpus_size"]), args.preset))
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
