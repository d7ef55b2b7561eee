"""Frozen-upstream probes: how much of a labelled set a pre-trained encoder's features already
spell, with the encoder frozen (SUPERB's ASR protocol; the paper's "one linear layer + CTC"), or,
with ``--phones``, how linearly its frames separate phones (deterministic: no seed).

    eqssl-probe CHECKPOINT|fbank FOLDER [--train-split train_1h] [--test-split test]
        [--head linear|bilstm] [--updates 1500] [--seed 1] [--cache DIR] [--json OUT.json]
    eqssl-probe CHECKPOINT|fbank FOLDER --phones [--layer N|all] [--train-split train_1h] [--test-split test]

``--phones``: the phone probe of eqssl.measures.phone_probe, a closed-form ridge classifier of each
frame's phone from one layer, fitted on the train split's ``SPLIT.phn`` labels (eqssl-make-corpus
writes them from eSpeak NG's phoneme events) and scored as the frame phone error (%) on the test
split, every layer or the one named by ``--layer``.

The upstream is a pre-training checkpoint (wav2vec 2.0, eqssl's or stock fairseq's; BEST-RQ; CPC),
or ``fbank``: 80 log-mel filterbanks per 10 ms, normalised per utterance (SUPERB's FBANK floor).
Its features (every transformer or Conformer block's output, in eval mode, no masking) are
computed once per checkpoint, set and split and cached as
``CACHE/<checkpoint SHA-256>/<set folder hash>/<split>.pt``: a probe of the same checkpoint reuses
them, and a changed checkpoint has another SHA-256, so its stale features are never read. The
encoder itself is never trained or written.

The probe: a learnable softmax-weighted sum of the layers, then a CTC head (``linear``: one linear
layer, as the paper; ``bilstm``: SUPERB's ASR downstream in small, a 2-layer BiLSTM then a linear
layer) over the set's letter dictionary (``dict.ltr.txt``; CTC blank = fairseq's ``<s>``),
trained with Adam for a fixed number of updates on the train split, then greedy-CTC WER / CER on
the test split, scored exactly as ``eqssl-evaluate`` scores fine-tuned models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import List, Optional

from ..measures.ctc_probe import ProbeConfig, probe
from ..measures.features import FBANK, Upstream
from ..measures.phone_probe import phone_probe


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="eqssl-probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("upstream", help="a pre-training checkpoint (wav2vec 2.0, BEST-RQ, CPC), or 'fbank'")
    parser.add_argument("folder", help="a labelled set: SPLIT.tsv, SPLIT.wrd/.ltr, dict.ltr.txt")
    defaults = ProbeConfig()
    for key, value in asdict(defaults).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "eqssl", "features"))
    parser.add_argument("--json", help="write the result here (never overwritten)")
    parser.add_argument("--phones", action="store_true",
                        help="the deterministic phone probe (frame phone error per layer) instead of the CTC probe")
    parser.add_argument("--layer", default="all", help="--phones: the layer to score, or 'all'")
    args = parser.parse_args(argv)
    cfg = ProbeConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    if cfg.head not in ("linear", "bilstm"):
        raise SystemExit(f"eqssl-probe: --head {cfg.head}: expected linear or bilstm")
    if cfg.repeats < 1 or cfg.updates < 1:
        raise SystemExit(f"eqssl-probe: --repeats and --updates must be at least 1 (got {cfg.repeats}, {cfg.updates})")
    if args.json and os.path.exists(args.json):
        raise SystemExit(f"eqssl-probe: {args.json} exists; not overwritten")
    if args.upstream != FBANK and not os.path.isfile(args.upstream):
        raise SystemExit(f"eqssl-probe: upstream {args.upstream}: no such file (a checkpoint, or 'fbank')")
    from ..checkpoints import CheckpointError
    from ..measures.evaluation import EvaluationError

    if args.phones:
        return phones_main(args)
    try:
        result = probe(args.upstream, args.folder, cfg, args.cache)
    except (EvaluationError, CheckpointError) as error:
        raise SystemExit(f"eqssl-probe: {error}")
    result.pop("head_state")
    print(f"{args.upstream} on {args.folder}:{cfg.test_split}: WER {100 * result['wer']:.1f} "
          f"CER {100 * result['cer']:.1f} (probe: {cfg.head}, {cfg.updates} updates"
          + (f", mean of {cfg.repeats} heads" if cfg.repeats > 1 else "") + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)
    return 0


def phones_main(args: argparse.Namespace) -> int:
    """eqssl-probe --phones: print (and --json) the frame phone error per layer."""
    from ..checkpoints import CheckpointError
    from ..data.manifests import DataError

    if args.layer != "all" and not args.layer.isdigit():
        raise SystemExit(f"eqssl-probe: --layer {args.layer}: a layer number (0, 1, ...) or 'all'")
    layers = None if args.layer == "all" or args.upstream == FBANK else [int(args.layer)]
    try:
        upstream = Upstream(args.upstream)
        result = phone_probe(upstream, args.folder, args.cache, args.train_split, args.test_split, layers)
    except (DataError, CheckpointError, ValueError) as error:
        raise SystemExit(f"eqssl-probe: {error}")
    print(f"{args.upstream} on {args.folder}: phone probe fitted on {args.train_split}, frame phone error on "
          f"{args.test_split} (frames every {1000 * upstream.frame_step:g} ms)")
    print("| layer | frame phone error (%) | frames scored | phones |\n|---|---|---|---|")
    for layer, r in result.items():
        print(f"| {'fbank' if args.upstream == FBANK else layer} | {r['error']:.2f} | {r['frames']} | {r['phones']} |")
    if args.json:
        with open(args.json, "x") as f:
            json.dump({"layers": {str(k): v for k, v in result.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
