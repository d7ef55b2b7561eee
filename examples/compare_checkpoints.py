"""Fine-tune every pre-trained checkpoint on the same labelled sets, evaluate, and print one table.

    python examples/compare_checkpoints.py OUT \\
        --checkpoints CSSL.1=runs/demo/cssl.1/checkpoint_best.pt PTLOC.1=runs/demo/ptloc.1/checkpoint_best.pt \\
        --sets read=CORPUS/finetune/read meeting=CORPUS/finetune/meeting \\
        [--recipe ctc_tiny] [--test-split test] [--override optimization.max_update=150 ...]

Stage 1 fine-tunes each checkpoint on each set with the same recipe, label budget, updates and
seed (OUT/finetune/CHECKPOINT/SET; a finished run is resumed by fairseq and ends at once), the same
runs as eqssl-reproduce's fine-tuning stage but for any checkpoints (e.g. stock fairseq ones). Stage 2
decodes each set's test split with its fine-tuned model (greedy CTC) and writes
OUT/comparison.json and OUT/comparison.md: rows are checkpoints, columns sets, cells WER / CER
(%). Existing results files are never overwritten: a rerun writes comparison.N.md.
"""

import argparse
import json
import os
import subprocess
import sys

from eqssl.evaluate import evaluate
from eqssl.reproduce import finetune_command, new_path


def named(items):
    pairs = [item.partition("=") for item in items]
    if any(not sep for _, sep, _ in pairs):
        raise SystemExit("expected NAME=PATH items")
    return {name: path for name, _, path in pairs}


def stage_finetune(out, checkpoints, sets, recipe, overrides):
    for ckpt_name, ckpt in checkpoints.items():
        for set_name, folder in sets.items():
            save = os.path.join(out, "finetune", ckpt_name, set_name)
            print(f"fine-tuning {ckpt_name} on {set_name} -> {save}", flush=True)
            subprocess.run(finetune_command(recipe, folder, ckpt, save, overrides), check=True,
                           stdout=subprocess.DEVNULL)


def stage_evaluate(out, checkpoints, sets, test_split):
    table = {}
    for ckpt_name in checkpoints:
        table[ckpt_name] = {}
        for set_name, folder in sets.items():
            model = os.path.join(out, "finetune", ckpt_name, set_name, "checkpoint_best.pt")
            report = evaluate(model, [f"{set_name}={folder}:{test_split}"])
            table[ckpt_name][set_name] = report["sets"][set_name]
    return table


def markdown(table, sets):
    lines = ["| checkpoint | " + " | ".join(f"{s}: WER / CER (%)" for s in sets) + " |",
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
    parser.add_argument("--recipe", default="ctc_tiny", help="a recipe of recipes/finetune")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--override", action="append", default=[], dest="overrides",
                        help="a hydra override for every fine-tuning run (repeatable)")
    args = parser.parse_args()
    overrides = args.overrides
    checkpoints, sets = named(args.checkpoints), named(args.sets)
    stage_finetune(args.out, checkpoints, sets, args.recipe, overrides)
    table = stage_evaluate(args.out, checkpoints, sets, args.test_split)
    text = markdown(table, list(sets))
    md, js = new_path(os.path.join(args.out, "comparison.md")), new_path(os.path.join(args.out, "comparison.json"))
    with open(md, "w") as f:
        f.write(text)
    with open(js, "w") as f:
        json.dump({"recipe": args.recipe, "overrides": overrides, "results": table}, f, indent=2, ensure_ascii=False)
    print(text + f"(written to {md} and {js})")


if __name__ == "__main__":
    sys.exit(main())
