"""Figures of an eqssl-reproduce experiment, from its training logs and results.json.

    pip install -e ".[plots]" && python examples/plot_results.py runs/small docs [--seed 1]

Writes, per preset, into the figure folder:
- ``results_<preset>_gap.png``: per pre-training shard, the validation loss before and after the
  inner step(s) and their difference (the equilibrium gap), against forward/backward passes per
  shard, for CSSL.1 and the runs continued from it (one seed);
- ``results_<preset>_wer.png``: WER and CER per fine-tuning set for every checkpoint, one row per
  downstream measure (frozen-upstream probe, fine-tuning), with the standard deviation over seeds
  as error bars;
- ``results_<preset>_curves.png``: CSSL.1's validation accuracy per shard against updates, every
  seed, with chance (the majority code for BEST-RQ);
- ``results_<preset>_step_size.png``: PTLOC.1's trajectory divergence from its constraint-off twin
  and its downstream CER minus the twin's, against α/β.
Names start ``results_bestrq_`` for the BEST-RQ family.
Existing figures are replaced (they are generated files); nothing else is written.
"""

import argparse
import json
import os
import re
from typing import Dict, List

from eqssl.experiment.fairseq_log import read_validations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

def validation_curve(log_path: str) -> List[Dict[str, float]]:
    """Every validation line of a fairseq training log as {field: value}."""
    return read_validations(log_path, subset=None)


def latest_results(out: str) -> dict:
    names = [f for f in os.listdir(out) if re.fullmatch(r"results(\.\d+)?\.json", f)]
    if not names:
        raise SystemExit(f"{out}: no results.json; run eqssl-reproduce first")
    newest = max(names, key=lambda f: os.path.getmtime(os.path.join(out, f)))
    with open(os.path.join(out, newest)) as f:
        return json.load(f)


def plot_gap(out: str, preset: str, result: dict, seed: int, path: str) -> None:
    rows = result["checkpoints"]
    folder = os.path.join(out, preset, f"seed{seed}")
    curves = {}
    for name, row in rows.items():
        log = os.path.join(folder, name, "train.log")
        if os.path.exists(log) and (name == "cssl.1" or name.startswith(("ptloc.1", "cssl.1+", "cssl.1.x"))):
            curves[name] = validation_curve(log)
    shards = [k[len("gap_"):] for k in (curves.get("cssl.1") or [{}])[0] if k.startswith("gap_")]
    if not shards:
        raise SystemExit(f"{folder}/cssl.1/train.log: no per-shard validation gaps (task.validation_gap_steps=0?)")
    fig, axes = plt.subplots(2, len(shards), figsize=(3.2 * len(shards), 5.2), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, (name, curve) in enumerate(curves.items()):
        row = rows[name]
        per_update = row["passes"][str(seed)] / max(row["num_updates"][str(seed)], 1) / len(shards)
        offset = 0 if name == "cssl.1" else rows["cssl.1"]["passes"][str(seed)] / len(shards)
        x = np.array([offset + v["num_updates"] * per_update for v in curve])
        for j, shard in enumerate(shards):
            before = np.array([v.get(f"loss_before_{shard}", np.nan) for v in curve])
            after = np.array([v.get(f"loss_after_{shard}", np.nan) for v in curve])
            colour = "0.4" if name == "cssl.1" else colours[c % len(colours)]
            axes[0, j].plot(x, before, color=colour, marker=".", markersize=3, label=row["label"] if j == 0 else None)
            axes[0, j].plot(x, after, color=colour, linestyle=":")
            # The logged gap (4 decimals) is finer than before - after from the 3-decimal losses.
            gap = np.array([v.get(f"gap_{shard}", np.nan) for v in curve])
            axes[1, j].plot(x, gap, color=colour)
            axes[0, j].set_title(shard)
            axes[1, j].set_xlabel("passes per shard")
    axes[0, 0].set_ylabel("valid loss (bits/target)\nsolid: at θ, dotted: after K")
    axes[1, 0].set_ylabel("equilibrium gap (bits)")
    fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{preset}: validation loss before/after the inner step and the gap (seed {seed})", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    fig.savefig(path, dpi=80)
    plt.close(fig)


MEASURES = {"probe": "frozen-upstream probe", "finetune": "fine-tuning"}


def plot_wer(preset: str, result: dict, path: str) -> None:
    rows, sets = result["checkpoints"], result["sets"]
    measures = [m for m in MEASURES if any(row.get(m) for row in rows.values())]
    fig, axes = plt.subplots(len(measures), 2, figsize=(11, 3.4 * len(measures)), squeeze=False)
    for r, measure in enumerate(measures):
        shown = [row for row in rows.values() if row.get(measure)]
        width = 0.8 / len(shown)
        for m, metric in enumerate(("wer", "cer")):
            axis = axes[r, m]
            for i, row in enumerate(shown):
                means = [100 * row[measure][s][metric]["mean"] for s in sets]
                sds = [100 * row[measure][s][metric]["sd"] for s in sets]
                axis.bar(np.arange(len(sets)) + i * width, means, width, yerr=sds, capsize=2,
                         label=row["label"] if (m, r) == (0, 0) else None, color=f"C{list(rows.values()).index(row)}")
            axis.set_xticks(np.arange(len(sets)) + 0.4 - width / 2)
            axis.set_xticklabels([f"{s}\n({'seen' if seen else 'unseen'})" for s, seen in sets.items()], fontsize=8)
            axis.set_ylabel(f"{MEASURES[measure]}\n{metric.upper()} (%)")
    fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{preset}: test WER / CER per downstream measure, mean ± sd over {len(result['seeds'])} seed(s)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(out: str, preset: str, result: dict, path: str) -> None:
    """CSSL.1's validation accuracy per shard against updates, one line per seed."""
    row = result["checkpoints"]["cssl.1"]
    shards = list(row["valid_accuracy"])
    fig, axes = plt.subplots(1, len(shards), figsize=(3.2 * len(shards), 3.0), sharey=True, squeeze=False)
    for seed in result["seeds"]:
        curve = validation_curve(os.path.join(out, preset, f"seed{seed}", "cssl.1", "train.log"))
        x = [v["num_updates"] for v in curve]
        for j, shard in enumerate(shards):
            axes[0, j].plot(x, [v.get(f"accuracy_{shard}", np.nan) for v in curve], marker=".", markersize=3,
                            label=f"seed {seed}" if j == 0 else None)
            majority = [v.get(f"majority_{shard}") for v in curve]
            if all(m is not None for m in majority):  # BEST-RQ: the majority code's share
                axes[0, j].plot(x, majority, color="0.5", linestyle="--", linewidth=0.8)
    for j, shard in enumerate(shards):
        if row.get("chance") and result.get("family") != "bestrq":
            axes[0, j].axhline(row["chance"], color="0.5", linestyle="--", linewidth=0.8)
        axes[0, j].set_title(shard)
        axes[0, j].set_xlabel("updates")
    axes[0, 0].set_ylabel("validation accuracy\n(dashed: chance)")
    fig.legend(loc="lower center", ncol=len(result["seeds"]), fontsize=7, frameon=False)
    fig.suptitle(f"{preset}: CSSL.1 learning curves", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.94))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_step_size(preset: str, result: dict, path: str) -> None:
    """PTLOC.1's trajectory divergence from its twin and its downstream CER minus the twin's, against alpha/beta."""
    sweep = [e for e in result["step_size"] if e.get("divergence")]
    ratios = [e["ratio"] for e in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(ratios, [e["divergence"]["mean"] for e in sweep], marker="o")
    axes[0].set_ylabel("‖θ − θ_twin‖ / ‖θ_twin − θ_start‖")
    for measure, title in MEASURES.items():
        points = [(e["ratio"], 100 * e[measure]["cer_difference"]) for e in sweep if measure in e]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=title)
    axes[1].set_ylabel("CER: PTLOC − its twin (points)")
    axes[1].legend(fontsize=7)
    for axis in axes:
        axis.set_xscale("log")
        axis.axhline(0, color="0.5", linewidth=0.8)
        axis.set_xlabel("α/β (inner over outer step size)")
    fig.suptitle(f"{preset}: PTLOC.1 against its inner step size, mean over {len(result['seeds'])} seed(s)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the eqssl-reproduce --out folder")
    parser.add_argument("figures", help="folder for the PNG files")
    parser.add_argument("--seed", type=int, default=1, help="seed whose curves are drawn")
    args = parser.parse_args()
    summary = latest_results(args.out)
    os.makedirs(args.figures, exist_ok=True)
    for preset, result in summary["presets"].items():
        family = result.get("family", "wav2vec2")
        stem = os.path.join(args.figures, "results_" + ("" if family == "wav2vec2" else f"{family}_") + preset)
        plot_gap(args.out, preset, result, args.seed, f"{stem}_gap.png")
        plot_wer(preset, result, f"{stem}_wer.png")
        written = [f"{stem}_gap.png", f"{stem}_wer.png"]
        if "cssl.1" in result["checkpoints"] and result["checkpoints"]["cssl.1"]["valid_accuracy"]:
            plot_curves(args.out, preset, result, f"{stem}_curves.png")
            written.append(f"{stem}_curves.png")
        if result.get("step_size"):
            plot_step_size(preset, result, f"{stem}_step_size.png")
            written.append(f"{stem}_step_size.png")
        print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
