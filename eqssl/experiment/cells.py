"""The experiment cut into cells that each finish inside one working session: a cell is one
(preset, seed) chain, or the part of it from one round to another; its wall time is estimated
from per-stage costs measured here (settings ``costs``), scaled by the machine's reference
benchmark figure, and scheduled as run_chain schedules it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .plan import ReproduceError, rounds, round1_ratios
from .stages import Step, chain_steps, duration

COST_FIELDS = {
    "reference_seconds": "the reference benchmark figure of the machine the costs were measured on",
    "pass_seconds": "one shard batch's forward and backward in a pre-training update",
    "run_seconds": "each pre-training run's fixed part: start, validations, checkpoints, its gap",
    "phones_seconds": "ABX and the phone probe of one checkpoint on one set",
    "probe_seconds": "the CTC probe of one checkpoint on one set",
    "finetune_seconds": "one fine-tuning run with its test evaluation",
    "control_seconds": "the random-init control (its weights and gap)",
    "corpus_minutes": "building the preset's corpus from nothing, per preset",
}
"""What a settings file's ``costs`` states (seconds on one thread with the other core busy)."""

IN_PROCESS_KINDS = ("finish", "control", "measure")
"""Steps that hold run_chain's IN_PROCESS lock: one of them at a time, beside the fairseq runs."""


def costs_of(settings: dict) -> dict:
    """The settings' ``costs``, checked (None when the settings state none)."""
    costs = settings.get("costs")
    if costs is None:
        return None
    missing = [k for k in COST_FIELDS if k not in costs]
    if missing:
        raise ReproduceError(f"{settings['path']}: costs: missing field(s) {', '.join(missing)} "
                             f"({'; '.join(f'{k}: {COST_FIELDS[k]}' for k in missing)})")
    return costs


def step_seconds(step: Step, costs: dict) -> float:
    """A step's estimated seconds at the costs' machine."""
    if step.kind == "train":
        return step.passes * costs["pass_seconds"] + costs["run_seconds"]
    if step.kind == "measure":
        return step.phone_sets * costs["phones_seconds"] + step.probe_sets * costs["probe_seconds"]
    if step.kind == "control":
        return costs["control_seconds"]
    if step.kind == "finetune":
        return costs["finetune_seconds"]
    return 0.0  # finish: its gap is in run_seconds


def simulate(steps: List[Step], seconds: Dict[str, float], lanes: int) -> float:
    """The wall time of the steps as run_stages runs them: a free lane takes the ready step with
    the most work ahead; the in-process steps one at a time."""
    from .stages import Stage, work_ahead

    ahead = work_ahead([Stage(s.name, lambda: None, s.after, seconds[s.name]) for s in steps])
    pending, finished, running, now = list(steps), set(), [], 0.0  # running: (end, step)
    while pending or running:
        busy = any(s.kind in IN_PROCESS_KINDS for _, s in running)
        ready = [s for s in pending if set(s.after) <= finished]
        ready.sort(key=lambda s: -ahead[s.name])
        for step in ready:
            if len(running) >= lanes:
                break
            if step.kind in IN_PROCESS_KINDS and busy:
                continue
            busy = busy or step.kind in IN_PROCESS_KINDS
            pending.remove(step)
            running.append((now + seconds[step.name], step))
        if not running:
            raise ReproduceError(f"steps wait for steps that do not exist: {', '.join(s.name for s in pending)}")
        running.sort(key=lambda x: x[0])
        now, step = running.pop(0)
        finished.add(step.name)
    return now


@dataclass
class Cell:
    preset: str
    seed: int
    first: int
    last: int
    seconds: float
    """Estimated wall time here, corpus included when it is not built yet."""
    longest: Tuple[str, float]
    """The cell's longest step and its estimated seconds."""
    steps: int
    recreated: List[str]

    @property
    def rounds(self) -> str:
        return f"{self.first}" if self.first == self.last else f"{self.first}-{self.last}"


def estimate(preset: str, settings: dict, seed: int, first: int, last: int, jobs: int, scale: float,
             corpus: bool = True) -> Cell:
    """One cell's estimated wall time on a machine ``scale`` times as slow as the costs' (its
    reference figure over theirs), with ``jobs`` lanes; ``corpus``: the corpus is built first."""
    costs = costs_of(settings)
    ratio = round1_ratios(settings)[0]  # the later rounds' runs do not depend on the ratio chosen
    _, _, steps = chain_steps(preset, settings, ratio, (first, last))
    seconds = {s.name: scale * step_seconds(s, costs) for s in steps}
    wall = simulate(steps, seconds, jobs)
    if corpus:
        wall += scale * 60 * float((costs["corpus_minutes"] or {}).get(preset, 0))
    longest = max(seconds.items(), key=lambda x: x[1])
    return Cell(preset, seed, first, last, wall, longest, len(steps),
                [s.run for s in steps if s.kind == "train" and s.recreated])


PLANNING_MARGIN = 0.15
"""--plan fills a cell to (1 − this) of its limit: the estimate's own error (docs/results.md
"Cells and records") must not push a cell past the session; a run is refused only past the limit."""


def cells(preset: str, settings: dict, seed: int, jobs: int, scale: float, limit_minutes: float) -> List[Cell]:
    """A chain cut at round boundaries into cells of at most ``limit_minutes`` each less the
    planning margin, as few as possible (each as many rounds as fit, from round 1 on); a round that
    fits in no cell is refused, with its longest step named."""
    limit_minutes *= 1 - PLANNING_MARGIN
    last_round, found, first = rounds(preset, settings), [], 1
    while first <= last_round:
        best: Optional[Cell] = None
        for last in range(first, last_round + 1):
            cell = estimate(preset, settings, seed, first, last, jobs, scale)
            if cell.seconds > 60 * limit_minutes:
                if best is None:
                    name, seconds = cell.longest
                    raise ReproduceError(
                        f"{settings['path']}: {preset} round {first} alone needs about {duration(cell.seconds)}, "
                        f"beyond a cell's {limit_minutes:g} minutes (the limit less the planning margin); its longest step is {name} "
                        f"(about {duration(seconds)}) with --jobs {jobs}: more jobs, a shorter stage or cheaper measuring")
                break
            best = cell
        found.append(best)
        first = best.last + 1
    return found


def cell_table(presets: List[str], settings: dict, seeds: List[int], jobs: int, reference: float,
               limit_minutes: float, command: str) -> str:
    """eqssl-reproduce --plan's cells: each with its estimated wall time and the command that runs it."""
    costs = costs_of(settings)
    if costs is None:
        return f"(no cells: {settings['path']} states no costs)"
    scale = reference / float(costs["reference_seconds"])
    lines = [f"### The cells ({settings['path']}), --jobs {jobs}, at most {limit_minutes:g} min each (planned to "
             f"{(1 - PLANNING_MARGIN) * limit_minutes:g})", "",
             f"Estimated from the costs measured at a reference figure of {costs['reference_seconds']} s, scaled by "
             f"this machine's {reference} s (x{scale:.2f}); each cell builds its corpus (a fresh clone's disk).", "",
             "| cell | preset | seed | rounds | steps | recreated first | longest step | estimate | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    found = [c for preset in presets for seed in seeds for c in cells(preset, settings, seed, jobs, scale, limit_minutes)]
    # every seed's round 1 before any later round: the α rule of rounds >= 2 reads all of them
    for n, cell in enumerate(sorted(found, key=lambda c: (presets.index(c.preset), c.first, c.seed)), 1):
        lines.append(f"| {n} | {cell.preset} | {cell.seed} | {cell.rounds} | {cell.steps} | "
                     f"{', '.join(cell.recreated) or '–'} | {cell.longest[0]} ({duration(cell.longest[1])}) | "
                     f"{minutes(cell.seconds)} | `{command} --preset {cell.preset} --seed {cell.seed} "
                     f"--rounds {cell.rounds}` |")
    return "\n".join(lines + [""])


def check_fits(preset: str, settings: dict, seed: int, first: int, last: int, jobs: int, reference: float,
               limit_minutes: float, corpus: bool) -> Optional[Cell]:
    """The cell's estimate, or a refusal naming its longest step when it does not fit (None: no costs)."""
    costs = costs_of(settings)
    if costs is None:
        return None
    cell = estimate(preset, settings, seed, first, last, jobs, reference / float(costs["reference_seconds"]), corpus)
    if cell.seconds > 60 * limit_minutes:
        name, seconds = cell.longest
        raise ReproduceError(f"{preset} seed {seed} rounds {cell.rounds}: about {duration(cell.seconds)}, beyond a "
                             f"cell's {limit_minutes:g} minutes; its longest step is {name} (about "
                             f"{duration(seconds)}); run fewer rounds (--rounds) or see --plan")
    return cell


def minutes(seconds: float) -> str:
    return "–" if not math.isfinite(seconds) else f"{seconds / 60:.0f} min"
