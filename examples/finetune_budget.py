"""Which CTC fine-tuning budget lets pre-training show? BEST-RQ CSSL.1 against random init.

    python examples/finetune_budget.py OUT --preset multidomain --seeds 3 \\
        [--budgets today 10m 10m_frozen 1h_frozen] \\
        [--budget NAME OVERRIDE [OVERRIDE ...]] [--sets read accent_unseen] [--report]

For one preset, with the settings of ``eqssl-reproduce --size small --model bestrq``
(recipes/reproduce/small.yaml, section ``families.bestrq``):

1. builds the corpus, OUT/PRESET/corpus (``eqssl-make-corpus --size small --workers 1``);
2. pre-trains CSSL.1 for seeds 1..N with the experiment's own command (``plan_pretraining``,
   ``pretrain_command``), OUT/PRESET/seedS/cssl.1;
3. makes the no-pre-training control per seed (``save_random_init``: CSSL.1's architecture, fresh
   weights of torch seed S), OUT/PRESET/seedS/none/random_init.pt;
4. fine-tunes both on every fine-tuning set (or ``--sets``) under each budget, seed S fine-tuning
   seed S's checkpoints with ``common.seed=S``, OUT/PRESET/finetune/BUDGET/seedS/{cssl.1,none}/SET,
   and scores greedy CTC on the test split (result.json in each run folder);
5. prints (and writes to OUT/PRESET/budgets.md, never overwriting) a markdown table: per budget
   and set, CER of CSSL.1 and of random init (mean ± sd over seeds) and CSSL.1 − random init
   paired by seed (mean ± sd, Student-t 95 % interval; ``yes`` where it excludes 0).

A budget is a name and hydra overrides, applied after the experiment's fine-tuning ones
(``finetune`` of the settings: recipe ctc_bestrq_tiny, 1000 updates, one validation at the end,
plus the preset's ``preset_overrides``, e.g. multilingual's ``dataset.max_tokens=400000``). A budget
that sets ``optimization.max_update=N`` also gets its validation and save interval set to N.
Built-in budgets: BUDGETS below; ``--budget NAME OVERRIDE ...`` (repeatable) adds or replaces one.

Resumable: a finished corpus (OUT/PRESET/corpus.done), pre-training (its done.json) or fine-tuning
run (its result.json) is skipped; an interrupted fairseq run resumes from its checkpoint_last.pt.
Every process runs with one thread (OMP_NUM_THREADS=1), one at a time; fairseq's output goes to
train.log in each run folder. ``--report`` runs nothing and tabulates what has finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from scipy import stats  # noqa: E402

from eqssl.experiment.plan import (ReproduceError, finetune_sets, load_settings, override_value,  # noqa: E402
                                   plan_pretraining)
from eqssl.experiment.stages import finetune_command, new_path, pretrain_command, run_fairseq  # noqa: E402

INITS = {"cssl.1": "CSSL.1", "none": "random init"}
"""The two upstreams fine-tuned: folder name -> label."""

BUDGETS: Dict[str, List[str]] = {
    "today": [],  # the experiment's: train_1h, 1000 updates, freeze_finetune_updates 50 (the recipe's)
    "10m": ["dataset.train_subset=train_10m"],
    "10m_frozen": ["dataset.train_subset=train_10m", "model.freeze_finetune_updates=500"],
    "1h_frozen": ["model.freeze_finetune_updates=500"],
}
"""Budget name -> hydra overrides on top of the experiment's fine-tuning overrides."""


def log(message: str) -> None:
    """A time-stamped progress line on stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: str, record: dict) -> None:
    """Write record atomically (whole or absent)."""
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def build_corpus(out: str, preset: str, size: str) -> str:
    """The preset's corpus under OUT/PRESET/corpus (eqssl-make-corpus resumes); its folder."""
    folder = os.path.join(out, preset, "corpus")
    marker = os.path.join(out, preset, "corpus.done")
    if os.path.exists(marker):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    log(f"[{preset}] corpus -> {folder}")
    with open(os.path.join(out, preset, "corpus.log"), "a") as f:
        code = subprocess.call(["eqssl-make-corpus", folder, "--preset", preset, "--size", size, "--workers", "1"],
                               stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"eqssl-make-corpus failed (exit {code}); log: {os.path.join(out, preset, 'corpus.log')}")
    write_json(marker, {"size": size})
    return folder


def pretrain_cssl1(out: str, preset: str, settings: dict, corpus: str, seed: int) -> str:
    """CSSL.1 of one seed, the experiment's command; the path of its checkpoint."""
    run = plan_pretraining(preset, settings)[0]
    assert run.name == "cssl.1" and run.init_from is None, run
    folder = os.path.join(out, preset, f"seed{seed}", run.name)
    checkpoint = os.path.join(folder, run.checkpoint)
    marker = os.path.join(folder, "done.json")
    if os.path.exists(marker):
        return checkpoint
    os.makedirs(folder, exist_ok=True)
    max_update = int(override_value(run.overrides, "optimization.max_update") or 0)
    command = pretrain_command(run, os.path.join(corpus, "pretrain"), folder, seed, None)
    log(f"[{preset} seed {seed}] pre-training CSSL.1 ({max_update} updates) -> {folder}")
    start = time.time()
    run_fairseq(command, os.path.join(folder, "train.log"), f"[{preset} seed {seed}] cssl.1", max_update, 1)
    write_json(marker, {"command": command, "seconds": round(time.time() - start, 1)})
    log(f"[{preset} seed {seed}] CSSL.1 done ({time.time() - start:.0f} s)")
    return checkpoint


def random_init(out: str, preset: str, cssl1: str, seed: int) -> str:
    """The no-pre-training control of one seed (CSSL.1's architecture, random weights)."""
    from eqssl.models.eq_wav2vec2 import save_random_init

    path = os.path.join(out, preset, f"seed{seed}", "none", "random_init.pt")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_random_init(cssl1, path, seed)
    return path


def budget_overrides(settings: dict, preset: str, budget: Sequence[str], seed: int) -> List[str]:
    """The hydra overrides of one fine-tuning run: the experiment's, the preset's, then the budget's."""
    ft = settings["finetune"]
    overrides = [f"common.seed={seed}", f"optimization.max_update={ft['max_update']}", *ft.get("overrides", []),
                 *(ft.get("preset_overrides") or {}).get(preset, []), *budget]
    max_update = override_value(list(budget), "optimization.max_update")
    if max_update is not None:
        for key in ("dataset.validate_interval_updates", "checkpoint.save_interval_updates"):
            if override_value(list(budget), key) is None:
                overrides.append(f"{key}={max_update}")
    return overrides


def finetune_one(folder: str, recipe: str, set_folder: str, set_name: str, pretrained: str,
                 overrides: List[str], tag: str) -> dict:
    """One fine-tuning run and its test WER / CER; skipped when its result.json exists."""
    from eqssl.measures.evaluation import evaluate

    result_path = os.path.join(folder, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    command = finetune_command(recipe, set_folder, pretrained, folder, overrides)
    start = time.time()
    run_fairseq(command, os.path.join(folder, "train.log"), tag, None, 1)
    train_seconds = time.time() - start
    scores = evaluate(os.path.join(folder, "checkpoint_best.pt"), [f"{set_name}={set_folder}:test"],
                      progress=False)["sets"][set_name]
    record = {"wer": scores["wer"], "cer": scores["cer"], "train_seconds": round(train_seconds, 1),
              "seconds": round(time.time() - start, 1), "pretrained": pretrained, "command": command}
    write_json(result_path, record)
    last = os.path.join(folder, "checkpoint_last.pt")
    if os.path.exists(last):  # the same weights as checkpoint_best (one validation, at the end)
        os.remove(last)
    log(f"{tag}: WER {100 * record['wer']:.1f} CER {100 * record['cer']:.1f} ({record['seconds']:.0f} s)")
    return record


def run_folder(out: str, preset: str, budget: str, seed: int, init: str, set_name: str) -> str:
    return os.path.join(out, preset, "finetune", budget, f"seed{seed}", init, set_name)


def mean_sd(values: Sequence[float]) -> tuple:
    """(mean, sample sd; nan for one value)."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return m, sd


def paired_interval(differences: Sequence[float], level: float = 0.95) -> tuple:
    """(mean, sd, low, high) of paired differences, the Student-t interval."""
    m, sd = mean_sd(differences)
    n = len(differences)
    if n < 2:
        return m, sd, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return m, sd, m - half, m + half


def load_result(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def table(out: str, preset: str, budgets: Dict[str, List[str]], sets: Sequence[str], seeds: int) -> str:
    """The markdown table of every (budget, set) with finished seeds (both upstreams), CER in %."""
    lines = [f"### {preset}: CTC fine-tuning CER (%), CSSL.1 vs random init (seeds paired)", "",
             "| budget | overrides | set | seeds | CSSL.1 | random init | CSSL.1 − random (paired) | 95 % t-interval "
             "| excludes 0 | s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, overrides in budgets.items():
        for set_name in sets:
            pairs, seconds = [], []
            for seed in range(1, seeds + 1):
                runs = [load_result(os.path.join(run_folder(out, preset, name, seed, init, set_name), "result.json"))
                        for init in INITS]
                if all(runs):
                    pairs.append((100 * runs[0]["cer"], 100 * runs[1]["cer"]))
                    seconds += [r["seconds"] for r in runs]
            if not pairs:
                continue
            a, b = mean_sd([p[0] for p in pairs]), mean_sd([p[1] for p in pairs])
            d, sd, low, high = paired_interval([p[0] - p[1] for p in pairs])
            excludes = "—" if math.isnan(low) else ("**yes**" if low > 0 or high < 0 else "no")
            lines.append(f"| {name} | {' '.join(overrides) or '(experiment)'} | {set_name} | {len(pairs)} | "
                         f"{a[0]:.1f} ± {a[1]:.1f} | {b[0]:.1f} ± {b[1]:.1f} | {d:+.1f} ± {sd:.1f} | "
                         f"[{low:+.1f}, {high:+.1f}] | {excludes} | {sum(seconds) / len(seconds):.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="work folder (reruns continue it)")
    parser.add_argument("--preset", default="multidomain")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    parser.add_argument("--settings", default="small", help="eqssl-reproduce settings (size or .yaml)")
    parser.add_argument("--budgets", nargs="+", help="which named budgets to run, in order (default: all)")
    parser.add_argument("--budget", nargs="+", action="append", default=[], metavar="NAME OVERRIDE",
                        help="a budget: a name, then hydra overrides (repeatable)")
    parser.add_argument("--sets", nargs="+", help="fine-tuning sets (default: all of the preset's)")
    parser.add_argument("--report", action="store_true", help="run nothing: tabulate finished runs")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.settings, "bestrq")
    budgets = dict(BUDGETS)
    for name, *overrides in args.budget:
        budgets[name] = overrides
    if args.budgets:
        unknown = [b for b in args.budgets if b not in budgets]
        if unknown:
            raise SystemExit(f"unknown budget(s) {unknown}; known: {', '.join(budgets)}")
        budgets = {b: budgets[b] for b in args.budgets}
    sets = args.sets or list(finetune_sets(args.preset, settings))
    failed: List[str] = []
    if not args.report:
        corpus = build_corpus(args.out, args.preset, settings["corpus_size"])
        upstreams = {}
        for seed in range(1, args.seeds + 1):
            cssl1 = pretrain_cssl1(args.out, args.preset, settings, corpus, seed)
            upstreams[seed] = {"cssl.1": cssl1, "none": random_init(args.out, args.preset, cssl1, seed)}
        recipe = settings["finetune"]["recipe"]
        for name, overrides in budgets.items():
            for set_name in sets:
                for seed in range(1, args.seeds + 1):
                    for init in INITS:
                        folder = run_folder(args.out, args.preset, name, seed, init, set_name)
                        tag = f"[{args.preset} {name} seed {seed}] {init}/{set_name}"
                        try:
                            finetune_one(folder, recipe, os.path.join(corpus, "finetune", set_name), set_name,
                                         upstreams[seed][init],
                                         budget_overrides(settings, args.preset, overrides, seed), tag)
                        except ReproduceError as error:
                            log(f"FAILED {error}")
                            failed.append(tag)
    text = table(args.out, args.preset, budgets, sets, args.seeds)
    if not args.report:
        path = new_path(os.path.join(args.out, args.preset, "budgets.md"))
        with open(path, "w") as f:
            f.write(text)
        text += f"\n(written to {path})\n"
    print(text)
    if failed:
        print("failed: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
