"""Every (preset, seed) chain of the experiment, one after another or in a process pool, then the
tables."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

from .plan import ReproduceError, choose_chain_ratio, plan_pretraining
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


def choose_chain_ratios(out: str, settings: dict, round1: List[Tuple[Chain, dict]], records_dir: Optional[str] = None,
                        identity: Optional[dict] = None) -> None:
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
        if identity:
            from .records import keep_choice

            keep_choice(records_dir, identity, preset, choice)
        print(f"[{preset}] rounds >= 2 run PTLOC at alpha/beta = {choice['ratio']:g} (the alpha rule over "
              f"{choice['seeds']} seed(s): validation loss at theta minus the twin's, bits: "
              + ", ".join(f"{r}: {d:+.3f}" for r, d in choice["loss_at_theta_minus_twin"].items())
              + f"; tolerance {choice['tolerance_bits']:g}); written to {path}", flush=True)


def folder_bytes(folder: str) -> int:
    """The size of every file under a folder (0 if it does not exist)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def seeds_of(args: argparse.Namespace) -> List[int]:
    """The seeds named (--seed), else 1..--seeds."""
    return sorted(args.seed) if getattr(args, "seed", None) else list(range(1, args.seeds + 1))


def identity_of(args: argparse.Namespace, settings: dict) -> Optional[dict]:
    """What every record of this invocation carries (None without --records)."""
    if not getattr(args, "records", None):
        return None
    from .records import code_commit, experiment_name, reference_seconds

    reference = args.reference_seconds if args.reference_seconds else reference_seconds(args.jobs)
    return {"experiment": experiment_name(settings), "settings_sha256": settings["sha256"], "commit": code_commit(),
            "reference_seconds": reference}


def ratio_from_records(args: argparse.Namespace, settings: dict, identity: dict, seeds: List[int]) -> None:
    """For a preset whose later rounds wait for the α rule: the committed choice, copied into the
    run folder; or, if every seed named has its round 1 in the records, the rule applied to them
    (and recorded) -- so that a cell of rounds >= 2 needs no round-1 run folder."""
    from .records import RecordSet, keep_choice

    found = RecordSet(args.records, settings)
    for preset in args.preset:
        path = os.path.join(args.out, preset, CHAIN_RATIO)
        if not needs_chain_ratio(preset, settings) or os.path.exists(path):
            continue
        ratio = found.choice(preset)
        if ratio is None:
            round1 = [{r.name: found.stage(preset, seed, r.name) for r in plan_pretraining(preset, settings)
                       if r.round == 1} for seed in seeds]
            if not round1 or any(None in r.values() for r in round1):
                continue  # chosen after this run's round 1, as without records
            choice = choose_chain_ratio(settings, round1)
            keep_choice(args.records, identity, preset, choice)
            found.choice(preset)
        found.check_settings()
        content = found.read[os.path.join(args.records, found.experiment, preset, CHAIN_RATIO)]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(content["choice"], f, indent=2)
        print(f"[{preset}] rounds >= 2 run PTLOC at alpha/beta = {content['choice']['ratio']:g}, the α rule's choice "
              f"recorded in {args.records}", flush=True)


def collect_from_records(chains: List[Chain], args: argparse.Namespace, settings: dict) -> Dict[str, Dict[int, dict]]:
    """Every finished chain's results from the records folder alone (no run folder, no checkpoint),
    after the checks that the records belong together."""
    from .records import RecordSet, stage_path

    found = RecordSet(args.records, settings)
    results: Dict[str, Dict[int, dict]] = {p: {} for p in args.preset}
    for chain in chains:
        missing: List[str] = []

        def lookup(path: str, _sha256: Optional[str], chain: Chain = chain) -> Optional[dict]:
            record = found.stage(chain.preset, chain.seed, path)
            if record is None:
                missing.append(stage_path(args.records, found.experiment, chain.preset, chain.seed, path))
            return record

        ratio = found.choice(chain.preset) if needs_chain_ratio(chain.preset, settings) else None
        row = collect_chain(chain, lookup, ratio) if ratio is not None or not needs_chain_ratio(chain.preset, settings) else None
        if row is None:
            why = f"no record {missing[0]}" if missing else "no α choice recorded for rounds >= 2"
            print(f"{chain.tag}: not finished in the records ({why}), left out of the tables", flush=True)
        else:
            results[chain.preset][chain.seed] = row
    found.check_settings()
    for line in found.broken_links():
        print(f"NOTE: {line}", flush=True)
    for chain in chains:  # each cell's wall time beside its estimate (cell.*.json, written by the cell)
        folder = os.path.join(args.records, found.experiment, chain.preset, f"seed{chain.seed}")
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.startswith("cell.") and name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    cell = json.load(f)
                estimate = cell.get("estimate_seconds")
                print(f"{chain.tag} cell {name}: {cell['real_seconds'] / 60:.1f} min, estimated "
                      + (f"{estimate / 60:.1f} min" if estimate else "– (no costs)")
                      + f" (reference figure {cell.get('reference_seconds')} s, --jobs {cell.get('jobs')})", flush=True)
    return results


def keep_cell(args: argparse.Namespace, identity: dict, chain: Chain, estimate, seconds: float) -> None:
    """A cell's estimated and real wall time, beside its seed's records."""
    from .records import _write

    what = f"rounds {chain.rounds[0]}-{chain.rounds[1]}" if chain.rounds else "the whole chain"
    path = os.path.join(args.records, identity["experiment"], chain.preset, f"seed{chain.seed}",
                        "cell.rounds{}-{}.json".format(*chain.rounds) if chain.rounds else "cell.json")
    path = new_path(path)
    _write(path, {"preset": chain.preset, "seed": chain.seed, "rounds": list(chain.rounds) if chain.rounds else None,
                  "jobs": args.jobs, "estimate_seconds": round(estimate.seconds, 1) if estimate else None,
                  "real_seconds": round(seconds, 1), "reference_seconds": identity["reference_seconds"],
                  "commit": identity["commit"], "settings_sha256": identity["settings_sha256"]})
    print(f"{chain.tag} cell of {what}: {seconds / 60:.1f} min"
          + (f" against an estimate of {estimate.seconds / 60:.1f} min" if estimate else "") + f" (recorded in {path})",
          flush=True)


def run_experiment(args: argparse.Namespace, settings: dict) -> int:
    """The corpora, every (preset, seed) chain (or, with --report, the finished ones), the tables.
    Exit status 1 when a chain failed (the others finish and are tabulated)."""
    from .cells import check_fits

    start = time.time()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    seeds = seeds_of(args)
    count = len(args.preset) * len(seeds)
    # fewer chains than jobs: the jobs left over run a chain's independent stages side by side
    lanes = max(1, args.jobs // count)
    records = getattr(args, "records", None)
    identity = identity_of(args, settings) if records and not args.report else None
    cell = getattr(args, "rounds", None)
    chains = [Chain(p, s, args.out, settings, threads, lanes, cell, records if identity else None, identity)
              for p in args.preset for s in seeds]
    results: Dict[str, Dict[int, dict]] = {p: {} for p in args.preset}
    failures: List[str] = []
    estimate = None
    if cell and not args.report and len(chains) == 1:  # before any work: a cell (one chain) that cannot fit is refused
        chain = chains[0]
        # without --records no figure is measured: the costs' own machine is assumed
        reference = identity["reference_seconds"] if identity else float((settings.get("costs") or {}).get(
            "reference_seconds", 1))
        try:
            estimate = check_fits(chain.preset, settings, chain.seed, *cell, args.jobs, reference,
                                  float((settings.get("cells") or {}).get("minutes", 100)),
                                  not os.path.exists(os.path.join(chain.corpus, "corpus.json")))
        except ReproduceError as error:
            raise SystemExit(f"eqssl-reproduce: {error}")
    if not args.report:
        if identity:
            from .records import describe

            print(describe(records, identity), flush=True)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each corpus is one subprocess
            list(pool.map(lambda preset: make_corpus(args.out, preset, settings["corpus_size"],
                                                     settings["preset_files"].get(preset)), args.preset))
    try:
        if args.report and records:
            results = collect_from_records(chains, args, settings)
        elif args.report:
            for chain in chains:
                found = collect_chain(chain)
                if found is None:
                    print(f"{chain.tag}: not finished, left out of the tables", flush=True)
                else:
                    results[chain.preset][chain.seed] = found
        else:
            if identity:
                ratio_from_records(args, settings, identity, seeds)
            waiting = [c for c in chains if needs_chain_ratio(c.preset, settings) and chain_ratio(c) is None
                       and (cell is None or cell[1] >= 2)]
            if waiting:  # the α of later rounds is chosen from every seed's round 1
                round1, failures = _run_all(pretrain_round1, waiting, min(args.jobs, len(waiting)))
                choose_chain_ratios(args.out, settings, round1, records, identity)
                started = {c.tag for c, _ in round1}
                chains = [c for c in chains if c not in waiting or c.tag in started]
            finished, more = _run_all(run_chain, chains, max(1, min(args.jobs, len(chains))))
            failures += more
            if identity:
                for chain, _ in finished:
                    keep_cell(args, identity, chain, estimate, time.time() - start)
            if cell is None:
                for chain, found in finished:
                    results[chain.preset][chain.seed] = found
            else:  # a cell: the tables of every chain the records (or the run folder) now complete
                results = collect_from_records(chains, args, settings) if identity else {
                    p: {c.seed: r for c in chains if c.preset == p for r in [collect_chain(c)] if r is not None}
                    for p in args.preset}
        empty = [p for p in args.preset if not results[p]]
        if empty and not failures and not cell:
            where = records if args.report and records else args.out
            raise ReproduceError(f"no finished seed for {', '.join(empty)} under {where}")
    except ReproduceError as error:
        raise SystemExit(f"eqssl-reproduce: {error}")
    presets = [p for p in args.preset if results[p]]
    if presets:
        summary = {"settings": settings, "wall_seconds": round(time.time() - start, 1), "failures": failures,
                   "presets": {p: aggregate(p, settings, results[p]) for p in presets}}
        text = "\n".join(markdown(p, summary["presets"][p]) for p in presets)
        if args.out is None:  # a report from the records alone: printed, nothing written
            print("\n" + text + f"\n(from the records under {records}; nothing written)")
        else:
            for preset in presets:
                cache = folder_bytes(os.path.join(args.out, preset, "features"))
                summary["presets"][preset]["feature_cache_bytes"] = cache
            md, js = new_path(os.path.join(args.out, "results.md")), new_path(os.path.join(args.out, "results.json"))
            with open(js, "w") as f:
                json.dump(summary, f, indent=2, ensure_ascii=False)
            with open(md, "w") as f:
                f.write(text)
            cache = "; ".join(f"{p} {summary['presets'][p]['feature_cache_bytes'] / 1e6:.0f} MB" for p in presets)
            print("\n" + text + f"\n(written to {md} and {js}; {summary['wall_seconds']:.0f} s; probe feature cache: "
                  f"{cache}, each checkpoint's features deleted once its measures have finished)")
    if failures:
        print(f"eqssl-reproduce: {len(failures)} chain(s) failed; the tables hold the others. Rerun the same "
              "command to resume them from their last finished stage:\n  " + "\n  ".join(failures), flush=True)
        return 1
    return 0
