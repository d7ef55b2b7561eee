"""Plot a run's per-shard TensorBoard scalars, read back from fairseq's event files.

    python examples/plot_tensorboard.py RUN/tensorboard OUT.png [--keys accuracy gap loss_before]

RUN/tensorboard is a run's ``common.tensorboard_logdir`` (``eqssl-reproduce`` gives every run
one); fairseq writes one sub-folder per log kind (``train_inner``, ``valid``, ...). One panel per
key, one line per shard, training updates faint and validations marked. Needs ``tensorboard``
(its event reader) and matplotlib: ``pip install tensorboard matplotlib``.
"""

import argparse
import os
from typing import Dict, List, Tuple

Series = List[Tuple[int, float]]


def read_scalars(logdir: str) -> Dict[str, Dict[str, Series]]:
    """{log kind: {tag: [(update, value), ...]}} for every sub-folder of ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for kind in sorted(os.listdir(logdir)):
        if not os.path.isdir(os.path.join(logdir, kind)):
            continue
        events = EventAccumulator(os.path.join(logdir, kind), size_guidance={"scalars": 0})
        events.Reload()
        scalars[kind] = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    if not scalars:
        raise SystemExit(f"{logdir}: no TensorBoard event folders (train_inner/, valid/, ...) in it")
    return scalars


def shards_of(tags, key: str) -> List[str]:
    """The shard names that have a ``{key}_{shard}`` scalar."""
    prefix = f"{key}_"
    return sorted(tag[len(prefix):] for tag in tags if tag.startswith(prefix))


def plot(scalars: Dict[str, Dict[str, Series]], keys: List[str], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = scalars.get("train_inner", {}), scalars.get("valid", {})
    keys = [k for k in keys if shards_of(train, k) or shards_of(valid, k)]
    if not keys:
        raise SystemExit("none of the keys has per-shard scalars in these event files")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes[0], keys):
        for i, shard in enumerate(sorted(set(shards_of(train, key)) | set(shards_of(valid, key)))):
            colour = colours[i % len(colours)]
            if f"{key}_{shard}" in train:
                steps, values = zip(*train[f"{key}_{shard}"])
                ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
            if f"{key}_{shard}" in valid:
                steps, values = zip(*valid[f"{key}_{shard}"])
                ax.plot(steps, values, "o-", color=colour, markersize=3, label=shard)
        if key == "accuracy" and shards_of(valid, "majority"):
            first = shards_of(valid, "majority")[0]
            steps, values = zip(*valid[f"majority_{first}"])
            ax.plot(steps, values, ":", color="grey", label=f"majority code ({first})")
        ax.set_title(key)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="a run's TensorBoard folder (common.tensorboard_logdir)")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--keys", nargs="+", default=["accuracy", "loss_before", "gap"],
                        help="per-shard scalars to plot (the part before _<shard>)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    if os.path.exists(args.out):
        raise SystemExit(f"{args.out} exists; not overwriting it")
    plot(read_scalars(args.logdir), args.keys, args.out,
         args.title or f"{args.logdir}: faint = every update (train_inner), dots = validations")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
