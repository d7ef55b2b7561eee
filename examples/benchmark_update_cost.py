"""Time and memory of one eqssl update through fairseq's Trainer (a benchmark, not a test).

    python examples/benchmark_update_cost.py --arch eq_wav2vec2_tiny --shards 2 4 8 --inner-steps 0 1 3
    python examples/benchmark_update_cost.py --arch eq_wav2vec2_base --shards 2 --inner-steps 1 --profile 1
    python examples/benchmark_update_cost.py --arch eq_bestrq_tiny     (BEST-RQ: its criterion is chosen by the arch)
    python examples/benchmark_update_cost.py --arch eq_cpc_base --shards 3 --inner-steps 1 --precision fp16
    python examples/benchmark_update_cost.py --arch eq_bestrq_base --shards 3 --inner-steps 1 --precision bf16

Each (M shards, K) runs in a fresh process (so peak memory is its own) on a generated corpus
of M shards, does ``--warmup`` updates, then times ``--updates`` updates on the same batch.
Printed per row: median seconds per update, its ratio to the ideal (K+1) x the CSSL (K=0)
update with the same shards, and peak memory (process RSS on CPU, torch.cuda.max_memory_allocated
on GPU) with its difference to CSSL in copies of the trainable parameters. ``--precision fp16``
or ``bf16`` sets fairseq's ``common.fp16`` / ``common.bf16`` as fairseq-hydra-train does (fairseq-train's
``--bf16`` would imply ``--tpu``): fp16 goes through fairseq's dynamic loss scaler.

``--profile N`` instead profiles N updates of one (M, K) with torch.profiler and prints where the
time goes: the equilibrium update's own work (labelled ``eqssl.*`` in eqssl/bilevel.py) against
fairseq's forward/backward and optimizer.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


PRECISIONS = {"fp32": {}, "fp16": {"fp16": True}, "bf16": {"bf16": True}}
"""--precision -> fairseq ``common.*`` settings."""
CRITERIA = {"wav2vec2": "equilibrium_wav2vec", "bestrq": "equilibrium_bestrq", "cpc": "equilibrium_cpc"}
"""The criterion of each family, by its arch (eq_<family>_<size>; anything else: wav2vec 2.0's)."""


def make_shards(workdir: str, shards: int) -> str:
    """A corpus of ``shards`` manifest folders over the toy corpus's audio (4 domains, reused)."""
    from eqssl.corpus.toy import make_corpus

    base = os.path.join(workdir, "toy")
    if not os.path.exists(base):
        make_corpus(base, shards=4, train_clips=16, valid_clips=2, min_seconds=2.0, max_seconds=3.0)
    domains = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    corpus = os.path.join(workdir, f"shards{shards}")
    if not os.path.exists(corpus):
        for i in range(shards):
            os.makedirs(os.path.join(corpus, f"shard{i}"))
            for split in ("train.tsv", "valid.tsv"):
                shutil.copy(os.path.join(base, domains[i % len(domains)], split),
                            os.path.join(corpus, f"shard{i}", split))
    return corpus


def build_trainer(args):
    import torch
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer
    from omegaconf import open_dict

    import eqssl

    corpus = make_shards(args.workdir, args.m)
    device = ["--cpu"] if not torch.cuda.is_available() else []
    argv = [
        corpus, "--user-dir", os.path.dirname(eqssl.__file__), "--task", "equilibrium_pretraining",
        "--criterion", next((c for f, c in CRITERIA.items() if args.arch.startswith(f"eq_{f}_")),
                            "equilibrium_wav2vec"),
        "--arch", args.arch, *device,
        "--inner-steps", str(args.k), "--max-tokens", str(args.max_tokens),
        "--max-sample-size", str(args.max_tokens // 2), "--min-sample-size", "8000",
        "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "1e-5",
        *([] if args.arch.startswith(("eq_bestrq", "eq_cpc")) else ["--loss-weights", "[0.1, 10]"]),
        "--num-workers", "0", "--no-save", "--seed", "1",
        "--shard-batch-size", "equal", *args.fairseq_args,
    ]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    with open_dict(cfg):
        cfg.common.update(PRECISIONS[args.precision])
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    iterator = task.get_batch_iterator(task.dataset("train"), max_tokens=args.max_tokens, seed=1,
                                       required_batch_size_multiple=1).next_epoch_itr(shuffle=False)
    return trainer, model, next(iterator)


def measure(args) -> dict:
    import torch

    trainer, model, batch = build_trainer(args)
    cuda = torch.cuda.is_available()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.updates):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step([batch])  # the same batch: shapes and work stay equal across K
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "m": args.m, "k": args.k, "seconds": statistics.median(times), "min_seconds": min(times),
        "params": trainable, "param_mb": sum(p.numel() * p.element_size() for p in model.parameters()
                                             if p.requires_grad) / 2**20,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads(),
        "precision": args.precision,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def profile(args) -> None:
    """Where one update's time goes, from torch.profiler (CPU or CUDA time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    trainer, _, batch = build_trainer(args)
    for _ in range(args.warmup):
        trainer.train_step([batch])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(args.profile):
            trainer.train_step([batch])
    events = prof.key_averages()
    attr = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    labelled = sorted((e for e in events if e.key.startswith("eqssl.")), key=lambda e: -getattr(e, attr))
    update = next((getattr(e, attr) for e in events if e.key == "eqssl.update"), None)
    print(f"{args.arch}, M={args.m}, K={args.k}: {args.profile} update(s) profiled")
    print("| region (eqssl/bilevel.py) | calls | time per update (ms) | share of the update |")
    print("|---|---|---|---|")
    per = 1.0 / 1000.0 / args.profile  # profiler times are microseconds
    for e in labelled:
        share = getattr(e, attr) / update if update else float("nan")
        print(f"| {e.key} | {e.count // args.profile} | {getattr(e, attr) * per:.1f} | {100 * share:.1f} % |")
    print()
    print(events.table(sort_by="self_" + attr, row_limit=args.profile_rows))


def run_one(args, m: int, k: int) -> dict:
    command = [sys.executable, __file__, "--arch", args.arch, "--max-tokens", str(args.max_tokens),
               "--updates", str(args.updates), "--warmup", str(args.warmup), "--workdir", args.workdir,
               "--precision", args.precision, "--m", str(m), "--k", str(k)]
    command += [f"--fairseq-args={a}" for a in args.fairseq_args]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:  # the row's own error, not only its exit status
        raise SystemExit(f"M={m}, K={k} failed (exit {done.returncode}):\n" + "\n".join(done.stderr.splitlines()[-25:]))
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[0, 1, 3], help="K values (0 = CSSL)")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4, 8], help="M values")
    parser.add_argument("--arch", default="eq_wav2vec2_tiny")
    parser.add_argument("--max-tokens", type=int, default=64000, help="per-shard batch budget (samples)")
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                        help="fp32, or fairseq's fp16 (with its loss scaler) or bf16")
    parser.add_argument("--profile", type=int, default=0, help="profile this many updates of the first M and K")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--fairseq-args", action="append", default=[], help="extra fairseq-train flag (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of the table "
                        "(eqssl-reproduce reads the machine's reference figure this way)")
    parser.add_argument("--m", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="eqssl-bench-")
    if args.profile:
        args.m, args.k = args.m or args.shards[0], args.k if args.k is not None else args.inner_steps[0]
        profile(args)
        return
    if args.k is not None:
        print("RESULT " + json.dumps(measure(args)))
        return
    ks = sorted(set(args.inner_steps) | {0})  # CSSL is the reference of every ratio
    rows = {(m, k): run_one(args, m, k) for m in args.shards for k in ks}
    if args.json:
        print(json.dumps(list(rows.values())))
        return
    first = next(iter(rows.values()))
    print(f"{args.arch}: {first['params']:,} trainable parameters ({first['param_mb']:.1f} MB), max_tokens "
          f"{args.max_tokens} per shard, device {first['device']}, {first['threads']} threads, {args.precision}, median of "
          f"{args.updates} updates after {args.warmup} warm-up, each row a fresh process")
    print("| M | K | s / update | ideal (K+1) x CSSL | vs ideal | peak memory (MB) | over CSSL (MB) | in parameter copies |")
    print("|---|---|---|---|---|---|---|---|")
    for (m, k), r in rows.items():
        cssl = rows[(m, 0)]
        ideal = (k + 1) * cssl["seconds"]
        extra = r["peak_mb"] - cssl["peak_mb"]
        print(f"| {m} | {k} | {r['seconds']:.3f} | {ideal:.3f} | {r['seconds'] / ideal:.3f} | {r['peak_mb']:.0f} "
              f"| {extra:+.0f} | {extra / r['param_mb']:+.2f} |")


if __name__ == "__main__":
    main()
