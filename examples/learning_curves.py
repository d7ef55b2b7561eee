"""Learning curves of pre-training settings: does the model leave chance, after how many updates
and how many minutes?

    python examples/learning_curves.py runs/curves/multilingual \\
        --corpus runs/small/multilingual/corpus --settings examples/learning_curves.yaml \\
        [--only NAME ...] [--jobs 2] [--report] [--plot docs/learning_curves.png]

Each setting of the settings file (a recipe of recipes/pretrain plus hydra overrides) is one
fairseq-hydra-train run in OUT/NAME (log: OUT/NAME/train.log), one thread per run, ``--jobs`` at
a time; a rerun resumes an unfinished run from its checkpoint_last.pt and skips a finished one.
Then, from the logs, a table per setting: validation contrastive accuracy per shard against
updates and training wall time (fairseq's ``wall``, summed over resumes), the code perplexity
per codebook group, and chance (1 / (negatives + 1); for BEST-RQ the majority code's share, logged per shard); with --json the curves as data, with --plot
a figure (the lowest shard's accuracy over chance against updates and against minutes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import subprocess
import sys
from typing import Dict, List, Optional

import yaml

from eqssl.corpus.presets import RECIPES
from eqssl.experiment.fairseq_log import per_shard, training_stats, validation_stats

USER_DIR = os.path.join(os.path.dirname(RECIPES), "eqssl")


def load_settings(path: str) -> Dict[str, dict]:
    """NAME -> {recipe, overrides, why} from the settings file."""
    with open(path) as f:
        settings = yaml.safe_load(f)["settings"]
    for name, setting in settings.items():
        if "recipe" not in setting:
            raise SystemExit(f"{path}: settings.{name}: no recipe")
        setting.setdefault("overrides", [])
    return settings


def train(out: str, corpus: str, name: str, setting: dict) -> str:
    """One setting's run (resumed if interrupted); returns its log path."""
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    log_path = os.path.join(folder, "train.log")
    if os.path.exists(log_path) and "done training" in open(log_path).read():
        return log_path
    command = ["fairseq-hydra-train", "--config-dir", os.path.join(RECIPES, "pretrain"),
               "--config-name", setting["recipe"], f"++task.data={os.path.abspath(os.path.join(corpus, 'pretrain'))}",
               f"checkpoint.save_dir={os.path.abspath(folder)}", f"common.user_dir={USER_DIR}",
               *setting["overrides"]]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); log: {log_path}")
    return log_path


def curve(log_path: str) -> List[dict]:
    """Every validation of a run: updates, wall seconds, and accuracy / code perplexity per shard."""
    points, wall, offset, last = {}, 0.0, 0.0, 0.0
    with open(log_path) as f:
        for line in f:
            training = training_stats(line)
            if training is not None and "wall" in training:
                # fairseq's wall clock restarts at 0 when a run resumes: carry the time before it
                if training["wall"] < last:
                    offset += last
                last = training["wall"]
                wall = offset + last
                continue
            stats = validation_stats(line)
            if stats is None:
                continue
            updates = int(stats.get("num_updates", 0))
            points[updates] = {  # a resumed run may validate an update twice: keep the last
                "updates": updates, "wall_s": wall, "loss": stats.get("loss"),
                "accuracy": per_shard(stats, "accuracy"), "code_ppl": per_shard(stats, "code_ppl"),
                # BEST-RQ: the accuracy of always answering the most frequent code (its chance)
                "majority": per_shard(stats, "majority"),
            }
    return [points[u] for u in sorted(points)]


def chance_level(overrides: List[str], recipe: str) -> Optional[float]:
    """wav2vec 2.0 and CPC: 1 / (negatives + 1), negatives from the override, else the recipe's
    model file; BEST-RQ: None (its chance is the majority code's share, logged per validation)."""
    for override in overrides:
        if override.lstrip("+").startswith("model.num_negatives="):
            return 1.0 / (int(override.split("=", 1)[1]) + 1)
    with open(os.path.join(RECIPES, "pretrain", f"{recipe}.yaml")) as f:
        recipe_cfg = yaml.safe_load(f)
    model = next((d["model"] for d in recipe_cfg.get("defaults", []) if isinstance(d, dict) and "model" in d), None)
    with open(os.path.join(RECIPES, "pretrain", "model", f"{model}.yaml")) as f:
        model_cfg = yaml.safe_load(f)
    if model_cfg.get("_name") == "eq_bestrq":
        return None
    default = 12 if model_cfg.get("_name") == "eq_cpc" else 100  # the models' own num_negatives defaults
    return 1.0 / (int(model_cfg.get("num_negatives", default)) + 1)


def lowest_over_chance(point: dict, chance: Optional[float]) -> float:
    """The lowest shard's accuracy over its chance (the fixed chance, or its majority code)."""
    if chance is not None:
        return min(point["accuracy"].values()) / chance
    return min(a / point["majority"][s] for s, a in point["accuracy"].items() if point["majority"].get(s))


def table(name: str, points: List[dict], chance: Optional[float], every: int = 0) -> str:
    """Markdown table of a run's validations (with `every`, only those at multiples of it)."""
    points = [p for p in points if not every or p["updates"] % every == 0] or points[-1:]
    if not points:
        return f"{name}: no validation yet\n"
    shards = sorted(points[0]["accuracy"])
    title = f"chance {chance:.3f}" if chance is not None else "chance: the majority code's share, in brackets"
    lines = [f"{name} ({title})",
             "| updates | minutes | " + " | ".join(f"acc {s}" for s in shards) + " | min / chance | code ppl |",
             "|---:|---:|" + "---:|" * len(shards) + "---:|---:|"]
    for p in points:
        accuracy = [p["accuracy"].get(s, float("nan")) for s in shards]
        cells = [f"{a:.3f}" if chance is not None else f"{a:.3f} ({p['majority'].get(s, float('nan')):.3f})"
                 for s, a in zip(shards, accuracy)]
        # CPC has no codebook: no perplexity to show
        ppl = f"{sum(p['code_ppl'].values()) / len(p['code_ppl']):.1f}" if p["code_ppl"] else "–"
        lines.append(f"| {p['updates']} | {p['wall_s'] / 60:.1f} | " + " | ".join(cells)
                     + f" | {lowest_over_chance(p, chance):.1f}x | {ppl} |")
    return "\n".join(lines) + "\n"


def plot(curves: Dict[str, dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logging.getLogger("matplotlib").setLevel(logging.WARNING)

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for name, entry in curves.items():
        points = entry["points"]
        if not points:
            continue
        lowest = [lowest_over_chance(p, entry["chance"]) for p in points]
        line, = axes[0].plot([p["updates"] for p in points], lowest, marker=".", label=name)
        axes[1].plot([p["wall_s"] / 60 for p in points], lowest, marker=".", color=line.get_color())
    for axis, xlabel in zip(axes, ("updates", "training minutes (one thread)")):
        axis.axhline(1.0, color="grey", linestyle=":", label="chance" if axis is axes[0] else None)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy / chance, lowest shard")
    axes[0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print(f"figure: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--corpus", required=True, help="an eqssl-make-corpus folder (its pretrain/ is used)")
    parser.add_argument("--settings", default=os.path.join(os.path.dirname(__file__), "learning_curves.yaml"))
    parser.add_argument("--only", nargs="+", help="run only these settings")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each")
    parser.add_argument("--report", action="store_true", help="run nothing; tabulate the logs there are")
    parser.add_argument("--plot", help="write a figure of the curves to this PNG")
    parser.add_argument("--every", type=int, default=0,
                        help="tabulate only validations at multiples of this many updates (the figure has all)")
    parser.add_argument("--json", help="write the curves to this file (never overwritten)")
    args = parser.parse_args()
    for path in (args.plot, args.json):
        if path and os.path.exists(path):
            raise SystemExit(f"{path} exists; not overwritten")
    settings = load_settings(args.settings)
    chosen = args.only or list(settings)
    unknown = [n for n in chosen if n not in settings]
    if unknown:
        raise SystemExit(f"{args.settings}: no setting(s) {unknown}; it has {', '.join(settings)}")
    if not args.report:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each run is a subprocess
            list(pool.map(lambda n: train(args.out, args.corpus, n, settings[n]), chosen))
    curves = {}
    for name in chosen:
        log_path = os.path.join(args.out, name, "train.log")
        points = curve(log_path) if os.path.exists(log_path) else []
        chance = chance_level(settings[name]["overrides"], settings[name]["recipe"])
        curves[name] = {"recipe": settings[name]["recipe"], "overrides": settings[name]["overrides"],
                        "chance": chance, "points": points}
        print(table(name, points, chance, args.every))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(curves, f, indent=2)
        print(f"curves: {args.json}")
    if args.plot:
        plot(curves, args.plot, os.path.basename(os.path.normpath(args.corpus.rstrip("/").rsplit("/corpus", 1)[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
