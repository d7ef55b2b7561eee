"""Every (preset, seed) chain of the experiment, one after another or in a process pool, then the
tables."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import time
from typing import Callable, Dict, List, Tuple

from .plan import ReproduceError, choose_chain_ratio
from .report import aggregate, markdown
from .stages import (CHAIN_RATIO, Chain, chain_ratio, collect_chain, make_corpus, needs_chain_ratio, new_path,
                     pretrain_round1, run_chain)


def _run_all(function: Callable[[Chain], dict], chains: List[Chain], jobs: int) -> Tuple[List[Tuple[Chain, dict]], List[str]]:
    """function(chain) for every chain, ``jobs`` at a time (each its own process when jobs > 1).
    A chain that raises does not end the others: it is reported (its stage and log, from the
    error, and the error's last line) and left out; a rerun resumes it from its last finished stage."""
    results: List[Tuple[Chain, dict]] = []
    failures: List[str] = []

    def failed(chain: Chain, error: BaseException) -> None:
        # A stage's error reads "<chain> <stage> failed (log: ...)" then the cause: keep both ends.
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        if not isinstance(error, ReproduceError) or not lines:
            lines = [f"{chain.tag}: {type(error).__name__}", *lines]
        message = lines[0] if len(lines) == 1 else f"{lines[0]}: {lines[-1]}"
        failures.append(message)
        print(f"FAILED {message}", flush=True)

    if jobs == 1:
        for chain in chains:
            try:
                results.append((chain, function(chain)))
            except Exception as error:  # noqa: BLE001 -- reported, the other chains go on
                failed(chain, error)
        return results, failures
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(function, c): c for c in chains}
        for future in concurrent.futures.as_completed(futures):
            try:
                results.append((futures[future], future.result()))
            except Exception as error:  # noqa: BLE001
                failed(futures[future], error)
    return results, failures


def choose_chain_ratios(out: str, settings: dict, round1: List[Tuple[Chain, dict]]) -> None:
    """For each preset whose later rounds wait for it, the α rule applied once to every seed's
    round 1 and recorded in OUT/PRESET/chain_ratio.json (kept on later runs: it was pre-registered)."""
    for preset in sorted({c.preset for c, _ in round1}):
        path = os.path.join(out, preset, CHAIN_RATIO)
        if not needs_chain_ratio(preset, settings) or os.path.exists(path):
            continue
        records = [done for chain, done in sorted(round1, key=lambda x: x[0].seed) if chain.preset == preset]
        choice = choose_chain_ratio(settings, records)
        with open(path + ".tmp", "w") as f:
            json.dump(choice, f, indent=2)
        os.replace(path + ".tmp", path)
        print(f"[{preset}] rounds >= 2 run PTLOC at alpha/beta = {choice['ratio']:g} (the alpha rule over "
              f"{choice['seeds']} seed(s): validation loss at theta minus the twin's, bits: "
              + ", ".join(f"{r}: {d:+.3f}" for r, d in choice["loss_at_theta_minus_twin"].items())
              + f"; tolerance {choice['tolerance_bits']:g}); written to {path}", flush=True)


def folder_bytes(folder: str) -> int:
    """The size of every file under a folder (0 if it does not exist)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def run_experiment(args: argparse.Namespace, settings: dict) -> int:
    """The corpora, every (preset, seed) chain (or, with --report, the finished ones), the tables.
    Exit status 1 when a chain failed (the others finish and are tabulated)."""
    start = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    seeds = sorted(args.seed) if getattr(args, "seed", None) else list(range(1, args.seeds + 1))
    count = len(args.preset) * len(seeds)
    # fewer chains than jobs: the jobs left over run a chain's independent stages side by side
    lanes = max(1, args.jobs // count)
    chains = [Chain(p, s, args.out, settings, threads, lanes) for p in args.preset for s in seeds]
    results: Dict[str, Dict[int, dict]] = {p: {} for p in args.preset}
    failures: List[str] = []
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
        else:
            waiting = [c for c in chains if needs_chain_ratio(c.preset, settings) and chain_ratio(c) is None]
            if waiting:  # the α of later rounds is chosen from every seed's round 1
                round1, failures = _run_all(pretrain_round1, waiting, min(args.jobs, len(waiting)))
                choose_chain_ratios(args.out, settings, round1)
                started = {c.tag for c, _ in round1}
                chains = [c for c in chains if c not in waiting or c.tag in started]
            finished, more = _run_all(run_chain, chains, max(1, min(args.jobs, len(chains))))
            failures += more
            for chain, found in finished:
                results[chain.preset][chain.seed] = found
        empty = [p for p in args.preset if not results[p]]
        if empty and not failures:
            raise ReproduceError(f"no finished seed for {', '.join(empty)} under {args.out}")
    except ReproduceError as error:
        raise SystemExit(f"eqssl-reproduce: {error}")
    presets = [p for p in args.preset if results[p]]
    if presets:
        summary = {"settings": settings, "wall_seconds": round(time.time() - start, 1), "failures": failures,
                   "presets": {p: aggregate(p, settings, results[p]) for p in presets}}
        for preset in presets:
            summary["presets"][preset]["feature_cache_bytes"] = folder_bytes(os.path.join(args.out, preset, "features"))
        text = "\n".join(markdown(p, summary["presets"][p]) for p in presets)
        md, js = new_path(os.path.join(args.out, "results.md")), new_path(os.path.join(args.out, "results.json"))
        with open(js, "w") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        with open(md, "w") as f:
            f.write(text)
        print("\n" + text + f"\n(written to {md} and {js}; {summary['wall_seconds']:.0f} s)")
    if failures:
        print(f"eqssl-reproduce: {len(failures)} chain(s) failed; the tables hold the others. Rerun the same "
              "command to resume them from their last finished stage:\n  " + "\n  ".join(failures), flush=True)
        return 1
    return 0
