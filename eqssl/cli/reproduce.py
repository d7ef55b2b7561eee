"""eqssl-reproduce: the paper's experiment in miniature (eqssl.experiment), from the command line.

    eqssl-reproduce --preset multidomain multilingual --size small --seeds 3 --out runs/small --jobs 2
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .. import experiment
from ..corpus.presets import CorpusError, preset_name
from ..experiment.plan import (CONTROL, FAMILIES, ReproduceError, finetune_sets, load_settings, plan_pretraining,
                               resolve_presets, round1_ratios, rounds)
from ..experiment.records import REFERENCE_BENCHMARK, reference_seconds
from ..experiment.report import plan_table
from ..experiment.runner import run_experiment, seeds_of
from ..locking import FolderLockedError, folder_lock


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eqssl-reproduce", description=experiment.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["multidomain"],
                        help="built-in corpus presets (recipes/corpus/NAME.yaml: multidomain, multilingual, ...) "
                        "or preset .yaml files (docs/corpus.md); each runs in OUT/<its name>")
    parser.add_argument("--size", default="tiny", help="tiny, small, full, or a settings .yaml file")
    parser.add_argument("--model", default="wav2vec2", choices=sorted(FAMILIES),
                        help="model family: wav2vec2 (eq_wav2vec2), bestrq (eq_bestrq, the paper's "
                        "multi-domain model) or cpc (eq_cpc, the paper's multilingual model); the recipes are "
                        "recipes/pretrain/{cssl,ptloc}_[bestrq_|cpc_]<size's model>.yaml")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 1..N (training and fine-tuning)")
    parser.add_argument("--seed", type=int, nargs="+",
                        help="the seeds named instead of 1..N, e.g. --seed 4 5 to add two seeds to an "
                        "experiment in another session or on another machine (with rounds >= 2, the α rule "
                        "reads the round 1 of the seeds named, unless OUT/PRESET/chain_ratio.json exists)")
    parser.add_argument("--out", help="experiment folder (reruns continue it); not needed for --report --records")
    parser.add_argument("--records", metavar="DIR",
                        help="a folder tracked in git (e.g. results/): each finished stage's record is copied to "
                        "DIR/<family>-<settings>/<preset>/seed<S>/<stage>.json with its weights' hash, its parent's, "
                        "the commit, the settings' hash and the machine's reference benchmark figure; with --report, "
                        "the tables are made from DIR alone (no run folder, no checkpoint) (docs/results.md \"Cells "
                        "and records\")")
    parser.add_argument("--rounds", metavar="A[-B]",
                        help="a cell: run and measure rounds A to B of each chain only (e.g. 1, or 2-3); the earlier "
                        "rounds' checkpoints they start from are recreated if not in OUT and checked against their "
                        "records' weights hashes. --plan prints the cells and their commands")
    parser.add_argument("--reference-seconds", type=float, metavar="S",
                        help="this machine's reference benchmark figure, if measured already (else measured: about "
                        "20 s; --jobs copies of examples/benchmark_update_cost.py " + " ".join(REFERENCE_BENCHMARK)
                        + " side by side, one thread each, their median)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fairseq runs at once, each with cores/jobs threads: (preset, seed) chains side "
                             "by side and, with fewer chains than jobs, a chain's independent stages side by "
                             "side (CSSL.1's runs beside CSSL.1 at half budget, probes beside PTLOC)")
    parser.add_argument("--plan", action="store_true",
                        help="run nothing: print every pre-training run of a seed (start, updates, learning rates "
                        "and their sum), the protocol's proportions beside the paper's, and the cells that fit a "
                        "working session (cells.minutes) with their estimated wall time on this machine")
    parser.add_argument("--controls-only", action="store_true",
                        help="round 1's positive-control part alone: CSSL.1, its budget fractions "
                        "(positive_control), random init and FBANK, measured by ABX and the phone probe only "
                        "(the CTC probe and fine-tuning, secondary and dearest, are left to the full run): "
                        "does each measure see a known difference (docs/results.md)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: tabulate the seeds whose every stage has finished")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        raise SystemExit("eqssl-reproduce: --seeds and --jobs must be at least 1")
    if args.seed is not None and (min(args.seed) < 1 or len(set(args.seed)) != len(args.seed)):
        raise SystemExit(f"eqssl-reproduce: --seed {' '.join(map(str, args.seed))}: distinct seeds >= 1")
    if args.out is None and not (args.report and args.records) and not args.plan:
        raise SystemExit("eqssl-reproduce: --out is required (except for --plan and --report --records)")
    if args.rounds is not None:
        try:
            first, _, last = args.rounds.partition("-")
            args.rounds = (int(first), int(last or first))
            if not 1 <= args.rounds[0] <= args.rounds[1]:
                raise ValueError
        except ValueError:
            raise SystemExit(f"eqssl-reproduce: --rounds {args.rounds}: a round or a range of rounds, e.g. 1 or 2-3")
    try:
        settings = load_settings(args.size, args.model)
        settings["preset_files"] = resolve_presets(args.preset, settings)
        args.preset = list(dict.fromkeys(preset_name(p) for p in args.preset))
        names = {CONTROL}
        # finetune.checkpoints may name runs of rounds that only some presets run (rounds_by_preset):
        # a name is unknown when no round count these settings allow has it
        deepest = dict(settings, rounds_by_preset={},
                       rounds=max([settings["rounds"], *(settings.get("rounds_by_preset") or {}).values()]))
        for preset in args.preset:
            finetune_sets(preset, settings)  # fail on a bad set or run name before any work
            ratio = round1_ratios(settings)[0]  # later rounds' names do not depend on the ratio chosen
            names.update(r.name for r in plan_pretraining(preset, deepest, ratio))
        for section in ("finetune", "probe"):
            unknown = [n for n in (settings.get(section) or {}).get("checkpoints") or [] if n not in names]
            if unknown:
                raise ReproduceError(f"{settings['path']}: {section}.checkpoints: unknown run(s) {unknown}; "
                                     f"the runs are {', '.join(sorted(names))}")
        if args.controls_only:  # after the checks of the whole plan: the settings file is the full run's
            if not settings.get("phones") or not settings.get("positive_control"):
                raise ReproduceError(f"{settings['path']}: --controls-only needs the phones and positive_control "
                                     "fields (the measures and the known worse models)")
            settings.update(controls_only=True, rounds=1, rounds_by_preset={}, probe=None)
    except (ReproduceError, CorpusError) as error:
        raise SystemExit(f"eqssl-reproduce: {error}")
    if args.rounds is not None:
        deepest = max(rounds(p, settings) for p in args.preset)
        if args.rounds[1] > deepest:
            raise SystemExit(f"eqssl-reproduce: --rounds {args.rounds[0]}-{args.rounds[1]}: {settings['path']} runs "
                             f"{deepest} round(s)")
    if args.plan:  # runs nothing
        print("\n".join(plan_table(preset, settings) for preset in args.preset))
        if settings.get("costs") and not args.controls_only:
            from ..experiment.cells import cell_table

            reference = args.reference_seconds or reference_seconds(args.jobs)
            command = f"eqssl-reproduce --model {args.model} --size {args.size} --jobs {args.jobs} --out OUT --records DIR"
            try:
                print(cell_table(args.preset, settings, seeds_of(args), args.jobs, reference,
                                 float((settings.get("cells") or {}).get("minutes", 100)), command))
            except ReproduceError as error:  # the plan is still printed; a run of such a cell is refused
                print(f"No cells fit: {error}")
        return 0
    if args.report:  # reads finished records only, and never overwrites a results file
        return run_experiment(args, settings)
    if args.records:
        os.makedirs(args.records, exist_ok=True)
    try:
        with folder_lock(args.out, "eqssl-reproduce"):
            return run_experiment(args, settings)
    except FolderLockedError as error:
        raise SystemExit(f"eqssl-reproduce: {error}")


if __name__ == "__main__":
    sys.exit(main())
