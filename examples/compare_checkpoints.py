"""Rank pre-trained checkpoints downstream: fine-tune and/or probe each on the same labelled sets.

    python examples/compare_checkpoints.py OUT \\
        --checkpoints CSSL.1=runs/demo/cssl.1/checkpoint_last.pt PTLOC.1=runs/demo/ptloc.1/checkpoint_last.pt \\
        --sets read=CORPUS/finetune/read meeting=CORPUS/finetune/meeting \\
        [--measures finetune probe] [--control] [--recipe ctc_tiny] [--test-split test] \\
        [--override optimization.max_update=150 ...] [--probe-head linear] [--probe-updates 600]

Measures, each with the same budget and seed for every checkpoint:

* ``finetune``: CTC fine-tuning with a recipes/finetune recipe (OUT/finetune/CHECKPOINT/SET; a
  finished run is resumed by fairseq and ends at once), the same runs as eqssl-reproduce's
  fine-tuning stage, then greedy-CTC decoding of the test split;
* ``probe``: the frozen-upstream probe (eqssl-probe: encoder frozen, weighted layer sum + CTC
  head; features cached under OUT/features per checkpoint SHA-256), plus an FBANK row.

``--control`` adds the no-pre-training row: the first checkpoint's architecture with fresh random
weights (OUT/control/random_init.pt), fine-tuned and probed like the others. Writes
OUT/comparison.json and OUT/comparison.md (rows: checkpoints, columns: sets, cells WER / CER %);
existing results files are never overwritten: a rerun writes comparison.N.md.
"""

import argparse
import json
import os
import subprocess
import sys

from eqssl.measures.evaluation import evaluate
from eqssl.models.eq_wav2vec2 import save_random_init
from eqssl.measures.ctc_probe import ProbeConfig, probe
from eqssl.measures.features import Upstream
from eqssl.experiment.stages import finetune_command, new_path


def named(items):
    pairs = [item.partition("=") for item in items]
    if any(not sep for _, sep, _ in pairs):
        raise SystemExit("expected NAME=PATH items")
    return {name: path for name, _, path in pairs}


def stage_finetune(out, checkpoints, sets, recipe, overrides, test_split):
    table = {}
    for ckpt_name, ckpt in checkpoints.items():
        table[ckpt_name] = {}
        for set_name, folder in sets.items():
            save = os.path.join(out, "finetune", ckpt_name, set_name)
            print(f"fine-tuning {ckpt_name} on {set_name} -> {save}", flush=True)
            subprocess.run(finetune_command(recipe, folder, ckpt, save, overrides), check=True,
                           stdout=subprocess.DEVNULL)
            report = evaluate(os.path.join(save, "checkpoint_best.pt"), [f"{set_name}={folder}:{test_split}"])
            table[ckpt_name][set_name] = report["sets"][set_name]
    return table


def stage_probe(out, checkpoints, sets, cfg):
    table = {}
    for ckpt_name, ckpt in {"FBANK": "fbank", **checkpoints}.items():
        table[ckpt_name] = {}
        upstream = Upstream(ckpt)  # one load of the encoder for all sets
        for set_name, folder in sets.items():
            print(f"probing {ckpt_name} on {set_name}", flush=True)
            result = probe(ckpt, folder, cfg, os.path.join(out, "features"), set_name, upstream=upstream)
            result.pop("head_state")
            table[ckpt_name][set_name] = result
    return table


def markdown(table, sets, title):
    lines = [f"{title}", "", "| checkpoint | " + " | ".join(f"{s}: WER / CER (%)" for s in sets) + " |",
             "|---|" + "---|" * len(sets)]
    for ckpt_name, row in table.items():
        cells = [f"{100 * row[s]['wer']:.1f} / {100 * row[s]['cer']:.1f}" for s in sets]
        lines.append(f"| {ckpt_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="NAME=PRETRAINED.pt ...")
    parser.add_argument("--sets", nargs="+", required=True, help="NAME=LABELLED_FOLDER ...")
    parser.add_argument("--measures", nargs="+", default=["finetune"], choices=["finetune", "probe"])
    parser.add_argument("--control", action="store_true", help="add the no-pre-training (random init) row")
    parser.add_argument("--seed", type=int, default=1, help="of the control's weights and the probe")
    parser.add_argument("--recipe", default="ctc_tiny", help="a recipe of recipes/finetune")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--override", action="append", default=[], dest="overrides",
                        help="a hydra override for every fine-tuning run (repeatable)")
    parser.add_argument("--probe-head", default=ProbeConfig.head, choices=["linear", "bilstm"])
    parser.add_argument("--probe-updates", type=int, default=ProbeConfig.updates)
    args = parser.parse_args()
    checkpoints, sets = named(args.checkpoints), named(args.sets)
    if args.control:
        control = os.path.join(args.out, "control", "random_init.pt")
        if not os.path.exists(control):
            os.makedirs(os.path.dirname(control), exist_ok=True)
            save_random_init(next(iter(checkpoints.values())), control, args.seed)
        checkpoints = {"no pre-training": control, **checkpoints}
    results, text = {}, ""
    if "probe" in args.measures:
        cfg = ProbeConfig(head=args.probe_head, updates=args.probe_updates, seed=args.seed,
                          test_split=args.test_split)
        results["probe"] = stage_probe(args.out, checkpoints, sets, cfg)
        text += markdown(results["probe"], list(sets), f"Frozen-upstream probe ({cfg.head}, {cfg.updates} updates)") + "\n"
    if "finetune" in args.measures:
        results["finetune"] = stage_finetune(args.out, checkpoints, sets, args.recipe, args.overrides, args.test_split)
        text += markdown(results["finetune"], list(sets), f"Fine-tuning ({args.recipe})")
    md, js = new_path(os.path.join(args.out, "comparison.md")), new_path(os.path.join(args.out, "comparison.json"))
    with open(md, "w") as f:
        f.write(text)
    with open(js, "w") as f:
        json.dump({"recipe": args.recipe, "overrides": args.overrides, "results": results}, f, indent=2,
                  ensure_ascii=False)
    print(text + f"(written to {md} and {js})")


if __name__ == "__main__":
    sys.exit(main())
