"""Every (preset, seed) chain of the experiment, one after another or in a process pool, then the
tables."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import time
from typing import Dict

from .plan import ReproduceError
from .report import aggregate, markdown
from .stages import Chain, collect_chain, make_corpus, new_path, run_chain

def run_experiment(args: argparse.Namespace, settings: dict) -> int:
    """The corpora, every (preset, seed) chain (or, with --report, the finished ones), the tables."""
    start = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    chains = [Chain(p, s, args.out, settings, threads) for p in args.preset for s in range(1, args.seeds + 1)]
    results: Dict[str, Dict[int, dict]] = {p: {} for p in args.preset}
    if not args.report:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each corpus is one subprocess
            list(pool.map(lambda preset: make_corpus(args.out, preset, settings["corpus_size"],
                                                     settings["preset_files"].get(preset)), args.preset))
    try:
        if args.report:
            for chain in chains:
                found = collect_chain(chain)
                if found is None:
                    print(f"{chain.tag}: not finished, left out of the tables", flush=True)
                else:
                    results[chain.preset][chain.seed] = found
            empty = [p for p in args.preset if not results[p]]
            if empty:
                raise ReproduceError(f"no finished seed for {', '.join(empty)} under {args.out}")
        elif args.jobs == 1:
            for chain in chains:
                results[chain.preset][chain.seed] = run_chain(chain)
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
                futures = {pool.submit(run_chain, c): c for c in chains}
                for future in concurrent.futures.as_completed(futures):
                    chain = futures[future]
                    results[chain.preset][chain.seed] = future.result()
    except ReproduceError as error:
        raise SystemExit(f"eqssl-reproduce: {error}")
    summary = {"settings": settings, "wall_seconds": round(time.time() - start, 1),
               "presets": {p: aggregate(p, settings, results[p]) for p in args.preset}}
    text = "\n".join(markdown(p, summary["presets"][p]) for p in args.preset)
    md, js = new_path(os.path.join(args.out, "results.md")), new_path(os.path.join(args.out, "results.json"))
    with open(js, "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    with open(md, "w") as f:
        f.write(text)
    print("\n" + text + f"\n(written to {md} and {js}; {summary['wall_seconds']:.0f} s)")
    return 0
