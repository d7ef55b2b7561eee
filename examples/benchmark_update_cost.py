"""Time and memory of one eqssl update through fairseq's Trainer, for several K (a benchmark, not a test).

    python examples/benchmark_update_cost.py --inner-steps 0 1 3 --arch eq_wav2vec2_tiny

Each K runs in a fresh process (so peak memory is its own) on a generated 3-shard corpus, does
a few warm-up updates, then times ``--updates`` updates. Printed per K: median seconds per
update, peak memory (process RSS on CPU, torch.cuda.max_memory_allocated on GPU), and the ratio
of the time to the ideal (K+1) x the K=0 time (the equilibrium update runs K+1 forward/backward
passes per shard).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SHARDS = 3


def measure(args) -> dict:
    import torch
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    import eqssl
    from eqssl.toy_corpus import make_corpus

    corpus = os.path.join(args.workdir, "corpus")
    if not os.path.exists(corpus):
        make_corpus(corpus, shards=SHARDS, train_clips=16, valid_clips=2, min_seconds=2.0, max_seconds=3.0)
    device = ["--cpu"] if not torch.cuda.is_available() else []
    argv = [
        corpus, "--user-dir", os.path.dirname(eqssl.__file__), "--task", "equilibrium_pretraining",
        "--criterion", "equilibrium_wav2vec", "--arch", args.arch, *device,
        "--inner-steps", str(args.k), "--max-tokens", str(args.max_tokens),
        "--max-sample-size", str(args.max_tokens // 2), "--min-sample-size", "8000",
        "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "1e-5",
        "--loss-weights", "[0.1, 10]", "--num-workers", "0", "--no-save", "--seed", "1",
    ]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    iterator = task.get_batch_iterator(task.dataset("train"), max_tokens=args.max_tokens, seed=1,
                                       required_batch_size_multiple=1).next_epoch_itr(shuffle=False)
    batch = next(iterator)
    times = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.updates):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step([batch])  # the same batch: shapes and work stay equal across K
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "k": args.k, "seconds": statistics.median(times), "min_seconds": min(times),
        "params": trainable, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["rss_before_mb"] = rss_before / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--arch", default="eq_wav2vec2_tiny")
    parser.add_argument("--max-tokens", type=int, default=64000, help="per-shard batch budget (samples)")
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.k is not None:
        print("RESULT " + json.dumps(measure(args)))
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="eqssl-bench-")
    rows = []
    for k in args.inner_steps:
        command = [sys.executable, __file__, "--k", str(k), "--arch", args.arch, "--max-tokens",
                   str(args.max_tokens), "--updates", str(args.updates), "--warmup", str(args.warmup),
                   "--workdir", workdir]
        out = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    base = next((r for r in rows if r["k"] == 0), None)
    print(f"{args.arch}: {rows[0]['params']:,} trainable parameters, {SHARDS} shards, "
          f"max_tokens {args.max_tokens} per shard, device {rows[0]['device']}, {rows[0]['threads']} threads, "
          f"median of {args.updates} updates")
    print("| K | s / update | x K=0 | ideal (K+1) | vs ideal | peak memory (MB) | + over K=0 (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["seconds"] / base["seconds"] if base else float("nan")
        extra = r["peak_mb"] - base["peak_mb"] if base else float("nan")
        print(f"| {r['k']} | {r['seconds']:.3f} | {ratio:.2f} | {r['k'] + 1} | {ratio / (r['k'] + 1):.2f} "
              f"| {r['peak_mb']:.0f} | {extra:+.1f} |")
    print(f"(one copy of the trainable parameters in fp32: {rows[0]['params'] * 4 / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
