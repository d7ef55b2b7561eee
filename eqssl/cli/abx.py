"""ABX phone discriminability of a pre-training checkpoint's layers, or of FBANK, on an item file
(libri-light's eval/eval_ABX.py definition; eqssl.measures.abx says how each rule is taken).

    eqssl-abx CHECKPOINT|fbank ITEM_FILE [--audio-root DIR] [--layer N|all] [--json OUT] [--cache DIR]

ITEM_FILE is a ZeroSpeech / libri-light item file (``#file onset offset #phone prev-phone
next-phone speaker``). eqssl-make-corpus writes one beside every manifest (``SPLIT.item`` beside
``SPLIT.tsv``), and then the manifest says where each clip is. For another corpus (LibriSpeech
dev-clean with libri-light's ``dev-clean.item``, say), ``--audio-root`` is the folder whose
.flac/.wav files are found by their names without extension, as libri-light finds them.

Prints within- and across-speaker ABX error (%) per layer; ``--json`` writes
``{"within": W, "across": A}`` for fbank and ``{"layers": {"<n>": {"within": W, "across": A}}}``
for a checkpoint (never overwriting a file). FBANK is the probe's: 80 Kaldi mel bins, dither 0,
mean and variance normalised per utterance: the floor a pre-trained layer should beat.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from ..checkpoints import CheckpointError
from ..data.manifests import DataError
from ..measures.abx import ItemFileError, abx_of_upstream
from ..measures.features import FBANK, Upstream


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqssl-abx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("upstream", help="a pre-training checkpoint (wav2vec 2.0, BEST-RQ, CPC), or 'fbank'")
    parser.add_argument("item_file", help="a ZeroSpeech / libri-light .item file")
    parser.add_argument("--audio-root", help="the folder holding the item file's audio (default: the manifest "
                        "SPLIT.tsv beside SPLIT.item)")
    parser.add_argument("--layer", default="all", help="the layer to score (0 = the first block's output), or 'all'")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "eqssl", "features"),
                        help="the frozen-feature cache shared with eqssl-probe")
    parser.add_argument("--json", help="write the result here (never overwritten)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json and os.path.exists(args.json):
        raise SystemExit(f"eqssl-abx: {args.json} exists; not overwritten")
    if args.upstream != FBANK and not os.path.isfile(args.upstream):
        raise SystemExit(f"eqssl-abx: upstream {args.upstream}: no such file (a checkpoint, or 'fbank')")
    if not os.path.isfile(args.item_file):
        raise SystemExit(f"eqssl-abx: item file {args.item_file}: no such file")
    if args.layer != "all" and not args.layer.isdigit():
        raise SystemExit(f"eqssl-abx: --layer {args.layer}: a layer number (0, 1, ...) or 'all'")
    layers = None if args.layer == "all" or args.upstream == FBANK else [int(args.layer)]
    try:
        upstream = Upstream(args.upstream)
        scores = abx_of_upstream(upstream, args.item_file, args.cache, layers, args.audio_root)
    except (ItemFileError, DataError, CheckpointError, ValueError) as error:
        raise SystemExit(f"eqssl-abx: {error}")
    print(f"{args.upstream} on {args.item_file} (frames every {1000 * upstream.frame_step:g} ms)")
    print("| layer | within (%) | across (%) | phone pairs within / across |\n|---|---|---|---|")
    for layer, score in scores.items():
        print(f"| {'fbank' if args.upstream == FBANK else layer} | {score['within']:.2f} | {score['across']:.2f} | "
              f"{score['within_pairs']} / {score['across_pairs']} |")
    if args.json:
        plain = {layer: {k: score[k] for k in ("within", "across")} for layer, score in scores.items()}
        result = plain[0] if args.upstream == FBANK else {"layers": {str(layer): v for layer, v in plain.items()}}
        with open(args.json, "x") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
