"""wav2vec 2.0 through eqssl's task and criterion, end to end: a check of the fairseq path, not a result.

    python examples/wav2vec2_path.py OUT DATA [--cssl-updates 60] [--ptloc-updates 40]

DATA is a pre-training folder (one manifest sub-folder per shard). Two fairseq-hydra-train runs
with the shipped recipes: ``cssl_tiny`` (CSSL) from scratch, then ``ptloc_tiny`` (K=1, α/β = 10)
from its last checkpoint; then one line each: validation loss and contrastive accuracy against
chance, and for PTLOC the mean inner-step gap and outer-gradient change over its shards.

Why no tables: in minutes on a CPU, wav2vec 2.0 stays on its early plateau (the quantizer's codes
and the context network wait on each other). The levers measured for the main job's budget
(examples/learning_curves.yaml ``w2v_tiny_minutes*``: lr 2e-3 and 5e-3, full feature-encoder
gradient, fast Gumbel decay, 2 s crops) left it at 0.9-1.3x chance after 600 updates (6 min on
a thread); the ``small`` settings leave it after about 440 updates of a larger batch (15 min).
The main job's results come from BEST-RQ, the paper's model (README "The two commands").
Reruns skip a finished run (its checkpoint_last.pt at the full update count).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

from eqssl.experiment.fairseq_log import per_shard, read_validations, trainings
from eqssl.experiment.stages import RECIPES, PACKAGE, checkpoint_updates, run_fairseq


def train(out: str, name: str, recipe: str, data: str, updates: int, extra: List[str]) -> str:
    """One recipe run in OUT/NAME (skipped when finished); the path of its train.log."""
    folder = os.path.join(out, name)
    log = os.path.join(folder, "train.log")
    last = os.path.join(folder, "checkpoint_last.pt")
    if os.path.exists(last) and checkpoint_updates(last)[0] >= updates:
        return log
    os.makedirs(folder, exist_ok=True)
    run_fairseq(["fairseq-hydra-train", "--config-dir", os.path.join(RECIPES, "pretrain"), "--config-name", recipe,
                 f"task.data={os.path.abspath(data)}", f"checkpoint.save_dir={os.path.abspath(folder)}",
                 f"common.user_dir={PACKAGE}", f"optimization.max_update={updates}",
                 f"dataset.validate_interval_updates={updates}", f"checkpoint.save_interval_updates={updates}",
                 *extra], log, f"wav2vec 2.0 {name}", updates, threads=os.cpu_count() or 1)
    return log


def summary(name: str, log: str, chance: float) -> str:
    """One line: the run's last validation loss and lowest shard accuracy against chance, and for a
    PTLOC run the inner step's mean gap and outer-gradient change over its training lines."""
    valid = read_validations(log)[-1]
    accuracy: Dict[str, float] = per_shard(valid, "accuracy")
    lowest = min(accuracy.values())
    line = (f"{name}: {valid['num_updates']:.0f} updates, validation loss {valid['loss']:.3f}, contrastive accuracy "
            f"{lowest:.3f} on its lowest shard ({lowest / chance:.1f}x chance {chance:.3f})")
    with open(log) as f:
        lines = trainings(f)
    gaps = [v for t in lines for v in per_shard(t, "gap").values()]
    changes = [v for t in lines for v in per_shard(t, "grad_change").values()]
    if changes:
        line += (f"; inner step: gap {sum(gaps) / len(gaps):+.4f} bits, outer-gradient change "
                 f"{sum(changes) / len(changes):.3f} (means over shards and log lines)")
    return line


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="work folder (a rerun skips finished runs)")
    parser.add_argument("data", help="pre-training folder: one manifest sub-folder per shard")
    parser.add_argument("--cssl-updates", type=int, default=60)
    parser.add_argument("--ptloc-updates", type=int, default=40, help="at least 4 (tri_stage's decay)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        raise SystemExit(f"wav2vec2_path: data {args.data}: no such folder")
    cssl = train(args.out, "cssl", "cssl_tiny", args.data, args.cssl_updates, ["common.log_interval=10"])
    start = os.path.join(args.out, "cssl", "checkpoint_last.pt")
    ptloc = train(args.out, "ptloc", "ptloc_tiny", args.data, args.ptloc_updates,
                  [f"model.init_from={os.path.abspath(start)}", "common.log_interval=10"])
    chance = checkpoint_updates(start)[2]
    print("\nwav2vec 2.0 (the design card's model) through eqssl's task and criterion, a check of the fairseq "
          "path, not a result:")
    print("  " + summary("CSSL", cssl, chance))
    print("  " + summary("PTLOC K=1", ptloc, chance))
    print("  In minutes on a CPU wav2vec 2.0 stays at chance (its early plateau; docs/results.md \"Learning "
          "curves\"), so the main job shows BEST-RQ's tables only. wav2vec 2.0's experiment: eqssl-reproduce "
          "--preset multidomain --size small --seeds 3 --out runs/small (hours).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
