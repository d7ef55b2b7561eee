"""How far a pre-training checkpoint (wav2vec 2.0, BEST-RQ or CPC) is from each shard's K-step optimum (the
equilibrium gap).

    eqssl-gap DATA CHECKPOINT [CHECKPOINT ...] --inner-steps 1 --inner-lr 1e-3

For every checkpoint (eqssl's, or a stock fairseq wav2vec2 one) and every shard of DATA (the
task's layout: one manifest folder per shard), on that shard's validation batches: the
pre-training loss at the checkpoint's weights, the loss after K plain SGD steps on the batch,
and their difference. Every checkpoint sees the same batches, masks and negatives, so rows
compare like for like. Losses are in bits per target, as in the training logs.
"""

import argparse
import json
import logging
import os
from collections import OrderedDict
from typing import Dict, List

import numpy as np

from ..checkpoints import CheckpointError
from ..data.manifests import DataError
from ..measures.gap import measure_gap
from ..tasks.equilibrium_pretraining import discover_shards

logger = logging.getLogger("eqssl.cli.gap")


def markdown_table(results: Dict[str, Dict[str, dict]], shards: List[str]) -> str:
    header = "| checkpoint | " + " | ".join(f"{s}: loss / gap" for s in shards) + " | mean loss | mean gap |"
    lines = [header, "|" + "---|" * (len(shards) + 3)]
    for name, per_shard in results.items():
        cells = [f"{per_shard[s]['loss_before']:.3f} / {per_shard[s]['gap']:+.3f}" for s in shards]
        mean_loss = np.mean([per_shard[s]["loss_before"] for s in shards])
        mean_gap = np.mean([per_shard[s]["gap"] for s in shards])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_loss:.3f} | {mean_gap:+.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="folder with one manifest sub-folder per shard")
    parser.add_argument("checkpoints", nargs="+", help="NAME=PATH or PATH (the row is named after the folder)")
    parser.add_argument("--shards", default="", help="comma-separated shard names (default: all)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--inner-steps", type=int, default=1, help="K")
    parser.add_argument("--inner-lr", type=float, default=1e-3, help="alpha: keep it equal across checkpoints")
    parser.add_argument("--max-tokens", type=int, default=64000)
    parser.add_argument("--max-sample-size", type=int, default=48000)
    parser.add_argument("--min-sample-size", type=int, default=0)
    parser.add_argument("--batches", type=int, default=20, help="at most this many batches per shard")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the results here (refuses to overwrite)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fairseq").setLevel(logging.WARNING)  # fairseq's import sets INFO/DEBUG
    if args.json and os.path.exists(args.json):
        parser.error(f"--json {args.json} exists; choose a new file")
    try:
        shards = discover_shards(args.data, args.shards, data_field="data ", shards_field="--shards")
    except DataError as error:
        parser.exit(2, f"eqssl-gap: {error}\n")
    results = OrderedDict()
    for item in args.checkpoints:
        name, sep, path = item.partition("=")
        if not sep:
            path, name = item, os.path.basename(os.path.dirname(os.path.abspath(item))) or item
        try:
            results[name] = measure_gap(path, args.data, shards, args)
        except (CheckpointError, DataError) as error:
            parser.exit(2, f"eqssl-gap: {error}\n")
    print(f"loss at the checkpoint / gap after K={args.inner_steps} SGD step(s) of alpha={args.inner_lr:g} "
          f"({args.split} batches, bits per target)")
    print(markdown_table(results, shards))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"inner_steps": args.inner_steps, "inner_lr": args.inner_lr, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
