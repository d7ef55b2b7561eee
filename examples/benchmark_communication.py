"""What one update all-reduces, per worker: eqssl's conventional update (CSSL, K=0, which is
fairseq's wav2vec 2.0 update over the shards) against PTLOC with K inner steps, with fairseq's
legacy_ddp and c10d backends (a benchmark, not a test).

    python examples/benchmark_communication.py --arch eq_wav2vec2_tiny eq_wav2vec2_base

Each row is one job of ``--workers`` CPU processes (gloo) of examples/fairseq_train_counting.py,
which records every all-reduce of each update, running ``--updates`` updates on a generated
corpus of ``--shards`` shards. Printed per row, per worker and update: the gradient's
all-reduce calls and payload, the payload over the trainable parameters' bytes, what else was
all-reduced (the logging statistics), and peak RSS. A ring all-reduce of P bytes sends and
receives 2 (W-1)/W x P bytes per worker.

fairseq's own wav2vec criterion cannot run on several CPU workers: its logging outputs are
gathered through a CUDA buffer (all_gather_list). Its gradient all-reduce is the same DDP
wrapper over the same parameters as the K=0 row.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchmark_update_cost import make_shards  # noqa: E402

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_job(args, corpus: str, arch: str, backend: str, inner_steps: int, out: str) -> list:
    """One job of args.workers processes; each rank's per-update records."""
    import eqssl

    flags = [
        corpus, "--user-dir", os.path.dirname(eqssl.__file__),
        "--task", "equilibrium_pretraining", "--criterion", "equilibrium_wav2vec", "--arch", arch, "--cpu",
        "--seed", "1", "--max-tokens", str(args.max_tokens), "--max-sample-size", str(args.max_tokens // 2),
        "--min-sample-size", "8000", "--required-batch-size-multiple", "1", "--optimizer", "adam",
        "--lr", "1e-5", "--loss-weights", "[0.1, 10]", "--num-workers", "0", "--no-save",
        "--disable-validation", "--max-update", str(args.updates), "--ddp-backend", backend,
        "--log-format", "simple", "--distributed-world-size", str(args.workers),
        "--distributed-init-method", f"tcp://localhost:{free_port()}", "--distributed-no-spawn",
        "--distributed-backend", "gloo", "--inner-steps", str(inner_steps), "--shard-batch-size", "equal",
    ]
    if backend == "c10d":
        flags += ["--find-unused-parameters"]  # as wav2vec 2.0 needs with LayerDrop
    env = dict(os.environ, EQSSL_COMM_LOG=out, OMP_NUM_THREADS=str(args.threads))
    processes = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "fairseq_train_counting.py"), *flags,
                          "--distributed-rank", str(rank)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(args.workers)
    ]
    outputs = [p.communicate()[0] for p in processes]
    for rank, (p, output) in enumerate(zip(processes, outputs)):
        if p.returncode != 0:
            sys.exit(f"{arch} {backend} K={inner_steps}: rank {rank} failed:\n{output[-3000:]}")
    return [[json.loads(line) for line in open(f"{out}.rank{rank}")] for rank in range(args.workers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["eq_wav2vec2_tiny"])
    parser.add_argument("--backends", nargs="+", default=["legacy_ddp", "c10d"])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32000, help="per shard batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "eqssl_bench"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    corpus = make_shards(args.workdir, args.shards)

    print(f"{args.workers} CPU workers (gloo), {args.shards} shards, {args.updates} updates; per worker and update:")
    print("| model | K | backend | grad all-reduce calls | grad payload (MB) | / trainable parameter bytes "
          "| other all-reduce (KB) | peak RSS per worker (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.arch:
        for backend in args.backends:
            for inner_steps in args.inner_steps:
                with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                    ranks = run_job(args, corpus, arch, backend, inner_steps, os.path.join(tmp, "comm.jsonl"))
                records = [r for rank in ranks for r in rank]
                parameter_bytes = records[0]["parameter_bytes"]
                calls = sorted({r["grad_calls"] for r in records})
                payload = sorted({r["grad_bytes"] for r in records})
                other = max(r["other_bytes"] for r in records)
                rss = max(r["peak_rss_mb"] for r in records)
                ratio = "/".join(f"{b / parameter_bytes:.3f}" for b in payload)
                print(f"| {arch} | {inner_steps} | {backend} | {'/'.join(map(str, calls))} "
                      f"| {'/'.join(f'{b / 2**20:.2f}' for b in payload)} | {ratio} | {other / 1024:.1f} "
                      f"| {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()
