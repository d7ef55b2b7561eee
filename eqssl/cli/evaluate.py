"""Greedy CTC evaluation of a fine-tuned checkpoint (wav2vec_ctc around wav2vec 2.0, BEST-RQ or CPC) on
labelled test sets.

    python -m eqssl.cli.evaluate CHECKPOINT NAME=FOLDER:SPLIT [NAME=FOLDER:SPLIT ...]
        [--json OUT.json] [--markdown OUT.md] [--batch-size N] [--device cpu|cuda]

The checkpoint is loaded by fairseq itself (``checkpoint_utils.load_model_ensemble_and_task``):
it must be a fine-tuned CTC model (``wav2vec_ctc``, task ``audio_finetuning``), which carries its
letter dictionary and the pre-trained encoder's configuration, so the pre-training checkpoint is
not needed. Each set is ``FOLDER/SPLIT.tsv`` (a fairseq audio manifest) with its references in
``FOLDER/SPLIT.wrd`` (or ``FOLDER/SPLIT.ltr`` when there is no ``.wrd``).

Decoding is greedy CTC: the arg-max letter per frame, repeats collapsed, blanks dropped (fairseq's
CTC blank is the dictionary's ``<s>``, index 0), then fairseq's ``post_process(..., "letter")``.
Scores come from jiwer: corpus-level WER over words and CER over characters (spaces between words
count as characters, as in jiwer), each with substitution/deletion/insertion counts.

Every input is checked before anything is decoded; bad input is an error that names the file (and
line), never a silently wrong score:

* a reference with characters outside the checkpoint's dictionary (file:line and the characters);
* a label file whose line count differs from its manifest's (both files and counts);
* ``FOLDER/dict.ltr.txt`` that differs from the checkpoint's dictionary;
* a checkpoint that is not a fine-tuned CTC model (e.g. a pre-training checkpoint);
* a missing manifest, label or audio file, or audio at another sample rate;
* an existing ``--json`` / ``--markdown`` file (never overwritten).

The one documented exception: a clip whose reference transcript is empty cannot be scored, so it
is skipped and counted (``skipped_empty_references`` in the JSON, and printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence

from ..measures.evaluation import EvaluationError, evaluate

# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

def markdown_table(results: Dict[str, dict]) -> str:
    """One row per set: WER, CER (percent), word S/D/I and reference words."""
    lines = ["| set | WER (%) | CER (%) | S/D/I | words |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['wer']:.2f} | {100 * r['cer']:.2f} | "
                     f"{r['substitutions']}/{r['deletions']}/{r['insertions']} | {r['words']} |")
    return "\n".join(lines) + "\n"


def check_outputs_free(paths: Sequence[Optional[str]]) -> None:
    """Error naming the first output file that already exists (nothing is overwritten)."""
    for path in paths:
        if path and os.path.exists(path):
            raise EvaluationError(f"{path}: already exists; not overwriting it (choose another name)")


def write_new(path: str, text: str) -> None:
    """Write a file that must not exist yet (mode 'x')."""
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError as error:
        raise EvaluationError(f"{path}: already exists; not overwriting it") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eqssl-evaluate",
        description="Greedy CTC WER/CER of a fine-tuned checkpoint (wav2vec 2.0, BEST-RQ or CPC) on labelled sets.")
    parser.add_argument("checkpoint", help="fine-tuned CTC checkpoint (fairseq .pt)")
    parser.add_argument("sets", nargs="+", metavar="NAME=FOLDER:SPLIT",
                        help="test set: FOLDER/SPLIT.tsv with FOLDER/SPLIT.wrd (or .ltr)")
    parser.add_argument("--json", help="write the full report here (must not exist)")
    parser.add_argument("--markdown", help="write the Markdown table here (must not exist)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per forward pass (8)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; bad input exits with status 2 and one 'error:' line."""
    args = build_parser().parse_args(argv)
    try:
        check_outputs_free([args.json, args.markdown])
        report = evaluate(args.checkpoint, args.sets, args.batch_size, args.device)
        table = markdown_table(report["sets"])
        if args.json:
            write_new(args.json, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        if args.markdown:
            write_new(args.markdown, table)
    except EvaluationError as error:
        print(f"eqssl-evaluate: error: {error}", file=sys.stderr)
        return 2
    print(table, end="")
    for name, result in report["sets"].items():
        if result["skipped_empty_references"]:
            print(f"{name}: skipped {result['skipped_empty_references']} clip(s) with an empty "
                  f"reference ({result['references']} lines "
                  f"{', '.join(map(str, result['skipped_lines']))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
