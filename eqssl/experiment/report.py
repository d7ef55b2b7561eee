"""The experiment's tables: per preset, rows (checkpoints) by fine-tuning sets over seeds, the
comparisons paired by seed, the minimum detectable differences, the gap, the step-size table."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

from .plan import COMPARISONS, CONTROL, FBANK_LABEL, measured_sets, pretraining_kind
from .statistics import (mean, minimum_detectable_difference, paired_difference, seeds_needed, spearman,
                         summarise)

MEASURES = {"abx_within": "ABX within speaker", "abx_across": "ABX across speakers",
            "phone_probe": "phone probe", "probe": "frozen-upstream probe", "finetune": "full fine-tuning"}
"""Every measure of a checkpoint on a set, the primary ones first (docs/results.md "The measures")."""

METRIC = {"abx_within": "error", "abx_across": "error", "phone_probe": "error", "probe": "cer", "finetune": "cer"}
"""The score of each measure that the tables compare (a fraction; lower is better): ABX error,
frame phone error, and the letter measures' CER (their WER is tabulated beside it)."""

UNIT = {"error": "error", "cer": "CER"}


PAPER_GAINS = {"multi-domain": (0.045, 0.30), "multilingual": (0.008, 0.034)}
"""The paper's one-round relative gains of PTLOC over CSSL (../shared/METHOD.md), by pre-training kind."""


def comparison_pairs(table: dict) -> List[tuple]:
    """(a, b, kind) row pairs the tables compare as a − b, from each row's ``against`` (plan.COMPARISONS),
    in the order of COMPARISONS, then of the rows."""
    pairs = [(a, b, kind) for a, row in table.items() for kind, b in (row.get("against") or {}).items() if b in table]
    order = list(COMPARISONS)
    return sorted(pairs, key=lambda p: order.index(p[2]))


def pooled_kinds_pair(table: dict, a: str, kind: str) -> bool:
    """True for the pairs whose spread sets the paired MDD: round-1 PTLOC at the smallest α/β (the
    paper's 10, nearest CSSL) against its twin and its pass-matched CSSL. Larger steps keep their own
    spread: a step that breaks the model would inflate the pool."""
    ratios = [r["ratio"] for r in table.values() if r.get("round") == 1 and r.get("ratio") is not None]
    row = table[a]
    return (kind in ("constraint", "pass-matched") and row.get("round") == 1 and bool(ratios)
            and row.get("ratio") == min(ratios))


SENSITIVE, INSENSITIVE, UNDETERMINED = "sensitive", "insensitive", "undetermined"


def sensitivity(positive_control: Optional[dict], paired_mdd: float) -> str:
    """The verdict fixed before the run (docs/results.md): a set and measure is sensitive only if
    CSSL.1 beats its ½-budget run (a lower CER: the mean of CSSL.1 − ½ budget < 0) by more than
    the measure's paired MDD; undetermined without the positive control or without a spread."""
    if positive_control is None or not math.isfinite(paired_mdd):
        return UNDETERMINED
    return SENSITIVE if positive_control["mean"] < 0 and abs(positive_control["mean"]) > paired_mdd else INSENSITIVE


def mean_loss(record: dict) -> float:
    """A checkpoint's validation loss at θ (eqssl-gap's loss before the inner step), mean over shards."""
    return mean(shard["loss_before"] for shard in record["gap"].values())


def mean_gap(record: dict) -> float:
    """A pre-trained checkpoint's equilibrium gap averaged over its shards."""
    return mean(shard["gap"] for shard in record["gap"].values())


def stage_seconds(per_seed: Dict[int, dict]) -> Dict[str, float]:
    """Seconds the finished stages took (their records), summed over seeds, per kind of stage."""
    total = {"pretraining": 0.0, "phones": 0.0, "probe": 0.0, "finetune": 0.0}
    for results in per_seed.values():
        for row in results.values():
            if row["pretraining"]:
                total["pretraining"] += row["pretraining"].get("seconds") or 0.0
            for stage in ("phones", "probe", "finetune"):
                total[stage] += sum(r.get("seconds") or 0.0 for r in (row.get(stage) or {}).values())
    return total


def analyse(preset: str, settings: dict, per_seed: Dict[int, dict], table: dict) -> dict:
    """Differences paired by seed (CER, gap), the gap against downstream CER, and the step-size sweep."""
    seeds = sorted(per_seed)
    sets = measured_sets(preset, settings)
    comparisons = {measure: [] for measure in MEASURES}
    gap_differences = []
    for a, b, kind in comparison_pairs(table):
        for measure in MEASURES:
            cells = {}
            metric = METRIC[measure]
            for s in sets:
                if s in table[a][measure] and s in table[b][measure]:
                    cells[s] = paired_difference([per_seed[n][a][measure][s][metric] for n in seeds],
                                                 [per_seed[n][b][measure][s][metric] for n in seeds])
            if cells:
                comparisons[measure].append({"a": a, "b": b, "kind": kind, metric: cells})
        if kind in ("constraint", "pass-matched", "twin chain"):
            records = {name: [per_seed[n][name]["pretraining"] for n in seeds] for name in (a, b)}
            shards = {shard: paired_difference([r["gap"][shard]["gap"] for r in records[a]],
                                               [r["gap"][shard]["gap"] for r in records[b]])
                      for shard in records[a][0]["gap"]}
            shards["mean"] = paired_difference([mean_gap(r) for r in records[a]], [mean_gap(r) for r in records[b]])
            loss = paired_difference([mean_loss(r) for r in records[a]], [mean_loss(r) for r in records[b]])
            gap_differences.append({"a": a, "b": b, "kind": kind, "gap": shards, "loss_at_theta": loss})
    # Does a lower gap go with better downstream scores? Every pre-trained row (not random weights).
    gap_vs_cer = {}
    for measure in MEASURES:
        pretrained = {name: row for name, row in table.items() if name != CONTROL and row["gap"]}
        common = [s for s in sets if pretrained and all(s in row[measure] for row in pretrained.values())]
        points = [(name, mean(mean_gap(per_seed[n][name]["pretraining"]) for n in seeds),
                   mean(row[measure][s][METRIC[measure]]["mean"] for s in common))
                  for name, row in pretrained.items() if common]
        gap_vs_cer[measure] = {"rows": [{"name": n, "gap": g, "cer": c} for n, g, c in points],
                               "spearman": spearman([p[1] for p in points], [p[2] for p in points])}
    # The inner step: every round-1 PTLOC ratio against the same twin.
    sweep = []
    for name, row in table.items():
        if row.get("round") != 1 or row.get("ratio") is None:
            continue
        twin = next((d for d in gap_differences if d["a"] == name and d["kind"] == "constraint"), None)
        entry = {"name": name, "ratio": row["ratio"], "inner_lr": row["schedule"].get("inner_lr"),
                 "divergence": row["divergence"], "gradient_change": row["gradient_change"],
                 "gap": mean(mean_gap(per_seed[n][name]["pretraining"]) for n in seeds)}
        if twin:
            entry.update(against=twin["b"], gap_difference=twin["gap"]["mean"]["mean"],
                         loss_difference=twin["loss_at_theta"]["mean"])
            for measure in MEASURES:
                cells = next((c[METRIC[measure]] for c in comparisons[measure]
                              if c["a"] == name and c["kind"] == "constraint"), {})
                if cells:
                    entry[measure] = {"cer_difference": mean(c["mean"] for c in cells.values()), "sets": len(cells)}
        sweep.append(entry)
    sweep.sort(key=lambda e: e["ratio"])
    return {"comparisons": comparisons, "gap_differences": gap_differences, "gap_vs_cer": gap_vs_cer,
            "step_size": sweep, "seconds": stage_seconds(per_seed),
            "kind": pretraining_kind(preset, settings)}


def aggregate(preset: str, settings: dict, per_seed: Dict[int, dict]) -> dict:
    """One preset's results: per row (checkpoint, FBANK), per measure and set, WER and CER over
    seeds with the minimum detectable difference; gaps, validation accuracy, passes."""
    sets = measured_sets(preset, settings)
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    table = {}
    for name in first:
        pretraining = [per_seed[s][name]["pretraining"] for s in seeds]
        label = pretraining[0]["label"] if pretraining[0] else FBANK_LABEL
        record = pretraining[0] or {}
        row = {"label": label, "round": record.get("round"), "ratio": record.get("ratio"),
               "against": dict(record.get("against") or {}), "init_from": record.get("init_from"),
               "schedule": record.get("schedule") or {}, **{measure: {} for measure in MEASURES}, "gap": {},
               "valid_accuracy": {}, "chance": None, "passes": {}, "num_updates": {},
               "divergence": None, "gradient_change": None, "warnings": []}
        if name == "cssl.1" and CONTROL not in first:
            row["against"].pop("pre-training", None)
        for measure in MEASURES:
            for set_name in sets:
                cells = [per_seed[s][name][measure].get(set_name) for s in seeds]
                if all(c is not None for c in cells):
                    row[measure][set_name] = {metric: summarise([c[metric] for c in cells])
                                              for metric in ("wer", METRIC[measure]) if metric in cells[0]}
                    if "pairs" in cells[0]:  # ABX: the fewest phone pairs a seed's score averages over
                        row[measure][set_name]["pairs"] = min(c["pairs"] for c in cells)
        if pretraining[0]:
            for shard in pretraining[0]["gap"]:
                row["gap"][shard] = {key: summarise([r["gap"][shard][key] for r in pretraining])
                                     for key in ("loss_before", "loss_after", "gap")}
            for shard in pretraining[0].get("valid_accuracy") or {}:
                row["valid_accuracy"][shard] = summarise([r["valid_accuracy"][shard] for r in pretraining])
            row["chance"] = pretraining[0].get("chance")
            row["passes"] = {str(s): r["passes"] for s, r in zip(seeds, pretraining)}
            row["num_updates"] = {str(s): r["num_updates"] for s, r in zip(seeds, pretraining)}
            if all(r.get("divergence") for r in pretraining):
                row["divergence"] = summarise([r["divergence"]["value"] for r in pretraining])
            changes = [mean(r["gradient_change"].values()) for r in pretraining if r.get("gradient_change")]
            if changes:  # mean over shards and updates, then over seeds
                row["gradient_change"] = summarise(changes)
            row["warnings"] = [f"seed {s}: {w}" for s, r in zip(seeds, pretraining) for w in r.get("warnings") or []]
        table[name] = row
    detectable = {}
    for measure in MEASURES:
        detectable[measure] = {}
        for set_name in sets:
            detectable[measure][set_name] = {}
            for metric in ("wer", METRIC[measure]):
                sds = [row[measure][set_name][metric]["sd"] for row in table.values()
                       if metric in row[measure].get(set_name, {})]
                if not sds:
                    continue
                pooled = math.sqrt(mean(sd ** 2 for sd in sds))
                reference = table.get("cssl.1", {}).get(measure, {}).get(set_name, {}).get(metric, {}).get("mean")
                mdd = minimum_detectable_difference(pooled, len(seeds))
                detectable[measure][set_name][metric] = {
                    "pooled_sd": pooled, "mdd": mdd, "cssl1_mean": reference,
                    "mdd_relative": mdd / reference if reference else math.nan,
                    "seeds_for_5_percent_relative": seeds_needed(pooled, 0.05 * reference)
                    if reference and pooled > 0 else None}
    analysis = analyse(preset, settings, per_seed, table)
    for measure in MEASURES:
        for set_name in sets:
            metric = METRIC[measure]
            found = detectable[measure][set_name].get(metric)
            # PTLOC and its matched CSSL share their seed's CSSL.1 and probe or fine-tuning seed:
            # the spread of their paired differences, not of each row, limits what can be seen.
            # The sweep's pairs stay out: a step size that breaks the model would inflate the spread.
            sds = [c[metric][set_name]["sd"] for c in analysis["comparisons"][measure]
                   if pooled_kinds_pair(table, c["a"], c["kind"]) and set_name in c[metric]]
            control = next((c[metric].get(set_name) for c in analysis["comparisons"][measure]
                            if c["kind"] == "½ budget"), None)
            if found:
                found["positive_control"] = control
                found["sensitivity"] = sensitivity(control, math.nan)
            own = False
            if found and not sds and control is not None and math.isfinite(control["sd"]):
                # no PTLOC pair ran (--controls-only): the positive control's own paired spread
                sds, own = [control["sd"]], True
            if not found or not sds:
                continue
            pooled = math.sqrt(mean(sd ** 2 for sd in sds))
            mdd = minimum_detectable_difference(pooled, len(seeds), paired=True)
            reference = found["cssl1_mean"]
            found.update(paired_sd=pooled, paired_mdd=mdd, paired_mdd_relative=mdd / reference if reference else math.nan,
                         paired_seeds_for_5_percent_relative=seeds_needed(pooled, 0.05 * reference, paired=True)
                         if reference and pooled > 0 else None, sensitivity=sensitivity(control, mdd),
                         paired_mdd_from="the positive control's own pair" if own else
                         "PTLOC.1 − twin and − pass-matched, smallest α/β")
    return {"sets": sets, "seeds": seeds, "checkpoints": table, "detectable": detectable,
            "family": settings.get("family", "wav2vec2"), **analysis}


LEARNED = 2.0
"""CSSL.1 has left chance when its lowest shard's validation accuracy is this many times chance."""


def learning_verdict(cssl1: dict, chance: float, family: str = "wav2vec2") -> str:
    """One plain sentence: did CSSL.1 leave chance (wav2vec 2.0's early plateau), and what that means."""
    lowest = min(stat["mean"] for stat in cssl1["valid_accuracy"].values())
    if family == "bestrq" and lowest < LEARNED * chance:
        return (f"**CSSL.1 is still near chance** (masked-code accuracy {lowest:.3f} on its lowest shard, "
                f"majority code {chance:.3f}): this budget is too short for BEST-RQ to learn, so no row below "
                "can show whether pre-training or PTLOC helps; run the `small` settings.")
    if family == "cpc" and lowest < LEARNED * chance:
        return (f"**CSSL.1 is still near chance** (contrastive accuracy {lowest:.3f} on its lowest shard, chance "
                f"{chance:.3f}): this budget is too short for CPC to learn, so no row below can show whether "
                "pre-training or PTLOC helps; run the `small` settings.")
    if lowest >= LEARNED * chance:
        return (f"CSSL.1 learned: validation accuracy {lowest:.3f} on its lowest shard, {lowest / chance:.1f}x "
                "chance; the downstream rows below compare models that learned.")
    return (f"**CSSL.1 is still at chance** (validation accuracy {lowest:.3f} on its lowest shard, chance "
            f"{chance:.3f}): this budget ends inside wav2vec 2.0's early plateau, so no row below can show "
            "whether pre-training or PTLOC helps. The `small` settings leave the plateau (README \"Learning "
            "curves\"): eqssl-reproduce --preset multidomain multilingual --size small --seeds 3 --jobs 2 --out runs/small")


KNOWN_NOISE = {"abx_within": 0.0, "abx_across": 0.0, "phone_probe": 0.0, "probe": 0.015, "finetune": 0.007}
"""What a measure moves by on its own with one seed (fraction): none for ABX and the phone probe
(deterministic: the same checkpoint gives the same number); for the CTC probe the smallest spread
of FBANK's CER over probe seeds (1.5 points), for fine-tuning its smallest paired sd over seeds
(0.7 points; docs/results.md). Within it, or within the printed rounding, two rows tie."""


def floors_line(result: dict, measure: str) -> str:
    """One sentence: on which sets CSSL.1 beats both floors of ``measure`` (FBANK features and
    random weights), on which it ties one (a difference within the printed rounding or, with one
    seed, the measure's known noise), and by how much it misses where it does neither."""
    rows = result["checkpoints"]
    mine = (rows.get("cssl.1") or {}).get(measure) or {}
    floors = {("FBANK" if row["label"] == FBANK_LABEL else "random init"): row[measure]
              for name, row in rows.items() if (name == CONTROL or row["label"] == FBANK_LABEL) and row[measure]}
    if not mine or not floors:
        return ""
    seeds = len(result["seeds"])
    noise = KNOWN_NOISE.get(measure, 0.0) if seeds == 1 else 0.0
    beats, ties, misses = [], [], []
    for set_name in result["sets"]:
        if set_name not in mine or not all(set_name in f for f in floors.values()):
            continue
        metric = METRIC[measure]
        cer = 100 * mine[set_name][metric]["mean"]
        others = {label: 100 * f[set_name][metric]["mean"] for label, f in floors.items()}
        text = f"{set_name} ({cer:.1f} against " + ", ".join(f"{label} {v:.1f}" for label, v in others.items()) + ")"
        tied = [f"{v:.1f}" == f"{cer:.1f}" or abs(v - cer) <= 100 * noise for v in others.values()]
        if any(tied):
            ties.append(text)
        else:
            (beats if all(cer < v for v in others.values()) else misses).append(text)
    line = (f"Against the floors ({MEASURES[measure]}, {UNIT[METRIC[measure]]} %): CSSL.1 beats "
            + " and ".join(floors) + " on ")
    line += ", ".join(beats) if beats else "no set"
    if ties:
        line += ("; ties on " + ", ".join(ties) + " (within the printed rounding"
                 + (f" or the measure's own noise with one seed, {100 * noise:.1f} points" if noise else "") + ")")
    deterministic = seeds == 1 and KNOWN_NOISE.get(measure, 0.0) == 0.0
    if misses:
        line += "; not on " + ", ".join(misses) + (
            ": with one pre-training seed nothing says whether that is the seed or a worse model (run --seeds 3)"
            if deterministic else
            ": with one seed nothing says whether that is the measure's noise or a worse model (run --seeds 3)"
            if seeds == 1 else ": see the differences below for whether the miss is beyond the seeds' spread")
    if deterministic:
        line += (". The measure is deterministic (no noise of its own), but one pre-training seed is not: "
                 "another seed's CSSL.1 would score differently")
    return line + "."


FEW_PAIRS = 30
"""An ABX score averaged over fewer (phone A, phone B) pairs than this says little: its cell says
how many (the tiny corpus's splits have a handful of triphone cells)."""


def _pairs_note(cell: dict) -> str:
    pairs = cell.get("pairs")
    return f" ({pairs} phone pairs)" if pairs is not None and pairs < FEW_PAIRS else ""


def _cell(stat: dict) -> str:
    if stat["seeds"] > 1:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['sd']:.1f}"
    return f"{100 * stat['mean']:.1f}"


SHORT = {"pre-training": "random init", "½ budget": "½ budget", "¼ budget": "¼ budget", "constraint": "twin",
         "pass-matched": "pass-matched CSSL", "twin chain": "twin chain", "vs CSSL.1": "CSSL.1",
         "vs CSSL.r": "CSSL.r"}
PTLOC_KINDS = ("constraint", "pass-matched", "twin chain", "vs CSSL.1", "vs CSSL.r")
"""The comparisons that say something about PTLOC: drawn only where the measure is sensitive."""


def _pair_mdd(result: dict, measure: str, pair: dict, set_name: str) -> float:
    """The MDD a pair's difference is judged by: the rows' pooled one against random init, the
    pooled paired one for the pooled pairs and the positive control, the pair's own otherwise."""
    d = pair[METRIC[measure]][set_name]
    found = result["detectable"][measure][set_name][METRIC[measure]]
    if pair["kind"] == "pre-training":
        return found["mdd"]
    if pair["kind"] in ("½ budget", "¼ budget") or pooled_kinds_pair(result["checkpoints"], pair["a"], pair["kind"]):
        return found.get("paired_mdd", math.nan)
    return minimum_detectable_difference(d["sd"], d["seeds"], paired=True)


def _difference_cell(result: dict, measure: str, pair: dict, set_name: str, relative: bool = True) -> str:
    """One paired CER difference in points, * where |Δ| exceeds its MDD (_pair_mdd), with the
    change relative to b and the 95 % interval; a PTLOC comparison on a set the measure is not
    sensitive on is marked so and never starred."""
    metric = METRIC[measure]
    d = pair[metric].get(set_name)
    if d is None:
        return "–"
    mdd = _pair_mdd(result, measure, pair, set_name)
    verdict = result["detectable"][measure][set_name][metric].get("sensitivity", UNDETERMINED)
    judged = pair["kind"] not in PTLOC_KINDS or verdict == SENSITIVE
    star = "*" if judged and math.isfinite(mdd) and abs(d["mean"]) > mdd else ""
    cell = f"{100 * d['mean']:+.1f}{star}"
    base = result["checkpoints"][pair["b"]][measure][set_name][metric]["mean"]
    if relative and base:  # an error of 0 (ABX on a handful of phone pairs) has no relative change
        cell += f" ({100 * d['mean'] / base:+.0f} %)"
    if math.isfinite(d["low"]):
        cell += f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    if pair["kind"] in PTLOC_KINDS and verdict == INSENSITIVE:
        cell += " (insensitive)"
    return cell


def _difference_lines(result: dict, measure: str, heads: List[str]) -> List[str]:
    """Rows of `a minus b` CER differences paired by seed, in points, with the relative change
    against b and the 95 % interval; * where |Δ| exceeds its minimum detectable difference."""
    rows, sets = result["checkpoints"], result["sets"]
    lines = ["| comparison | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)]
    for pair in result["comparisons"][measure]:
        cells = [_difference_cell(result, measure, pair, s) for s in sets]
        lines.append(f"| {rows[pair['a']]['label']} − {rows[pair['b']]['label']} | " + " | ".join(cells) + " |")
    return lines


def _sensitivity_line(result: dict, measure: str, title: str) -> str:
    cells = []
    for s in result["sets"]:
        found = result["detectable"][measure][s].get(METRIC[measure]) or {}
        cells.append(found.get("sensitivity", UNDETERMINED) if found.get("positive_control") else "– (no ½-budget run)")
    return f"| {title}: sensitive? (CSSL.1 beats ½ budget beyond the paired MDD) | " + " | ".join(cells) + " |"


def _mdd_source(result: dict, measure: str) -> str:
    """Which pairs' spread gives a measure's paired MDD (the PTLOC pairs, or without them the
    positive control's own pair)."""
    for s in result["sets"]:
        found = result["detectable"][measure][s].get(METRIC[measure]) or {}
        if found.get("paired_mdd_from"):
            return found["paired_mdd_from"]
    return "PTLOC.1 − twin and − pass-matched, smallest α/β"


def _summary_lines(preset: str, result: dict, heads: List[str]) -> List[str]:
    """The answer in one table, per measure: pre-training against none, the positive control and
    the verdict it gives per set, every PTLOC against its twin, its pass-matched CSSL, the twin
    chain and the paper's references, the paired MDD and the paper's gains in points; then the
    gap of each PTLOC against its twin."""
    rows, sets = result["checkpoints"], result["sets"]
    lines = []
    for measure, title in MEASURES.items():
        pairs = result["comparisons"][measure]
        if not pairs:
            continue
        for pair in pairs:
            if pair["kind"] == "¼ budget":
                continue
            name = f"{rows[pair['a']]['label']} − {SHORT[pair['kind']]}"
            lines.append(f"| {title}: {name} | " + " | ".join(_difference_cell(result, measure, pair, s, relative=False)
                                                           for s in sets) + " |")
            if pair["kind"] == "½ budget":
                lines.append(_sensitivity_line(result, measure, title))
        cells = []
        for s in sets:
            found = result["detectable"][measure][s].get(METRIC[measure]) or {}
            mdd = found.get("paired_mdd", math.nan)
            cells.append(f"{100 * mdd:.1f} ({100 * found['paired_mdd_relative']:.0f} %)" if math.isfinite(mdd) else "n/a")
        lines.append(f"| {title}: paired MDD ({_mdd_source(result, measure)}) | " + " | ".join(cells) + " |")
        lines.append(_paper_gain_line(result, measure, prefix=f"{title}: "))
    if not lines:
        return []
    seeds = len(result["seeds"])
    lines = [f"### {preset}: summary, differences a − b in points of each measure's error rate (ABX error, frame "
             f"phone error, CER; paired over {seeds} seed(s); 95 % interval; "
             "* = beyond the minimum detectable difference, MDD; negative: a is better; a PTLOC comparison is "
             "judged only on the sets where the positive control shows the measure sensitive)", "",
             "| comparison | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)] + lines
    gaps = [d for d in result.get("gap_differences") or [] if d["kind"] == "constraint"]
    if gaps:
        parts = []
        for d in gaps:
            g = d["gap"]["mean"]
            interval = f" [{g['low']:+.4f}, {g['high']:+.4f}]" if math.isfinite(g["low"]) else ""
            parts.append(f"{rows[d['a']]['label']} {g['mean']:+.4f}{interval}")
        lines += ["", "Equilibrium gap, PTLOC − its twin (same learning-rate sum), mean over shards (bits; "
                  "negative: nearer equilibrium): " + "; ".join(parts) + "."]
    return lines + [""]


def _gap_lines(preset: str, result: dict) -> List[str]:
    """The gap of each PTLOC run minus its twin's (and its pass-matched CSSL's), and the gap against
    downstream CER."""
    rows, lines = result["checkpoints"], []
    differences = result.get("gap_differences") or []
    if differences:
        shards = list(differences[0]["gap"])
        lines += [f"### {preset}: equilibrium gap, PTLOC minus its controls (bits; paired over seeds, "
                  "95 % interval; negative: PTLOC is nearer equilibrium)", "",
                  "| comparison | " + " | ".join(shards) + " |", "|---|" + "---|" * len(shards)]
        for d in differences:
            cells = [f"{g['mean']:+.4f}" + (f" [{g['low']:+.4f}, {g['high']:+.4f}]" if math.isfinite(g["low"]) else "")
                     for g in d["gap"].values()]
            lines.append(f"| {rows[d['a']]['label']} − {rows[d['b']]['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    for measure, title in MEASURES.items():
        found = (result.get("gap_vs_cer") or {}).get(measure)
        if found and len(found["rows"]) >= 3:
            rho = found["spearman"]
            lines.append(f"Gap against {title} {UNIT[METRIC[measure]]}: Spearman ρ = {rho:+.2f} over {len(found['rows'])} pre-trained "
                         "checkpoints (mean gap over shards and seeds against mean CER over sets and seeds; "
                         "ρ > 0: a lower gap goes with a lower CER).")
    return lines + [""] if lines else []


def _stat(stat: Optional[dict], digits: int = 3) -> str:
    if not stat:
        return "–"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['sd']:.{digits}f}" if stat["seeds"] > 1 else "")


def _step_size_lines(preset: str, result: dict) -> List[str]:
    """The inner step of PTLOC.1: per α/β, how far it took the trajectory from its twin, how much
    it changed the outer gradient, and its validation loss, gap and downstream CER minus the twin's."""
    sweep = result.get("step_size") or []
    if not sweep:
        return []
    lines = [f"### {preset}: the inner step of PTLOC.1 (α = ratio × β; each against the same twin, mean over "
             "seeds and sets)", "",
             "| α/β | α | trajectory divergence ‖θ − θ_twin‖ / ‖θ_twin − θ_start‖ | outer-gradient change "
             "‖∇g(φ) − ∇g(θ)‖ / ‖∇g(θ)‖ | validation loss at θ − twin's (bits) | gap − twin's "
             "| " + " | ".join(f"{title} {UNIT[METRIC[m]]} − twin (points)" for m, title in MEASURES.items()) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(MEASURES)]
    for e in sweep:
        cells = [f"{e['ratio']:g}", f"{e['inner_lr']:g}" if e.get("inner_lr") else "–",
                 _stat(e["divergence"]), _stat(e["gradient_change"], 4),
                 f"{e['loss_difference']:+.3f}" if "loss_difference" in e else "–",
                 f"{e['gap_difference']:+.4f}" if "gap_difference" in e else "–"]
        cells += [f"{100 * e[m]['cer_difference']:+.1f}" if m in e else "–" for m in MEASURES]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _rounds_lines(preset: str, result: dict) -> List[str]:
    """How far each run moved the model: its validation loss at θ beside that of the run it started from."""
    rows = {n: r for n, r in result["checkpoints"].items() if r["gap"]}
    if not any(r.get("round") for r in rows.values()):
        return []
    lines = [f"### {preset}: validation loss per run (eqssl-gap's loss at θ, mean over shards and seeds, bits)", "",
             "| run | round | start | updates | loss at θ | its start's | moved |", "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        loss = mean(g["loss_before"]["mean"] for g in row["gap"].values())
        start = rows.get(row.get("init_from") or "")
        before = mean(g["loss_before"]["mean"] for g in start["gap"].values()) if start else math.nan
        known = math.isfinite(before)
        lines.append(f"| {row['label']} | {row.get('round') or '–'} | {row.get('init_from') or 'scratch'} | "
                     f"{next(iter(row['num_updates'].values()), 0)} | {loss:.3f} | "
                     f"{f'{before:.3f}' if known else '–'} | {f'{loss - before:+.3f}' if known else '–'} |")
    return lines + [""]


def _warning_lines(preset: str, result: dict) -> List[str]:
    found = [f"- {row['label']}, {w}" for row in result["checkpoints"].values() for w in row.get("warnings") or []]
    return [f"### {preset}: runs that look diverging", "", *found, ""] if found else []


def _paper_gain_line(result: dict, measure: str, prefix: str = "") -> str:
    """The table row of the paper's one-round relative gains for this kind of pre-training, per set
    in CER points of CSSL.1; `prefix` leads its label (the summary names the measure)."""
    kind = result.get("kind", "multi-domain")
    low, high = PAPER_GAINS[kind]
    cells = []
    for s in result["sets"]:
        reference = result["detectable"][measure][s].get(METRIC[measure], {}).get("cssl1_mean")
        cells.append(f"{100 * low * reference:.1f}–{100 * high * reference:.1f}" if reference else "–")
    return (f"| {prefix}the paper's {kind} gains ({100 * low:g}–{100 * high:g} % rel.) on CSSL.1's "
            f"{UNIT[METRIC[measure]]} | ") + " | ".join(cells) + " |"


def _cost_line(preset: str, result: dict) -> str:
    seconds = result.get("seconds")
    if not seconds:
        return ""
    names = {"pretraining": "pre-training", "phones": "ABX and phone probe", "probe": "CTC probe",
             "finetune": "fine-tuning"}
    parts = ", ".join(f"{names.get(name, name)} {value / 60:.1f}" for name, value in seconds.items())
    measuring = sum(v for k, v in seconds.items() if k != "pretraining")
    share = (f"; measuring is {measuring / seconds['pretraining']:.2f} of pre-training "
             f"(ABX and phone probe alone {seconds.get('phones', 0.0) / seconds['pretraining']:.2f})"
             if seconds.get("pretraining") else "")
    return (f"Compute of {preset} ({len(result['seeds'])} seed(s)), the stages' own times summed: {parts} minutes"
            f"{share}; {sum(seconds.values()) / 3600:.1f} process-hours in all.\n")


def markdown(preset: str, result: dict) -> str:
    """Per preset: pre-training accuracy, both downstream measures with their minimum detectable
    differences and comparisons, and the gap table."""
    sets, rows = result["sets"], result["checkpoints"]
    seeds = len(result["seeds"])
    heads = [f"{s} ({'seen' if seen else 'unseen'})" for s, seen in sets.items()]
    pretrained = {n: r for n, r in rows.items() if r["valid_accuracy"]}
    lines = _summary_lines(preset, result, heads)
    if pretrained:
        shards = list(next(iter(pretrained.values()))["valid_accuracy"])
        chance = next(iter(pretrained.values()))["chance"]
        family = result.get("family", "wav2vec2")
        what = ("masked-code accuracy" if family == "bestrq" else "contrastive accuracy")
        chance_is = ("chance: the largest majority-code share" if family == "bestrq" else "chance")
        lines += [f"### {preset}: did pre-training learn? Validation {what} per shard at the end "
                  f"of each run ({chance_is} {chance:.3f})", "",
                  "| checkpoint | " + " | ".join(shards) + " | lowest / chance | updates per seed |",
                  "|---|" + "---|" * (len(shards) + 2)]
        for row in pretrained.values():
            lowest = min(row["valid_accuracy"][s]["mean"] for s in shards)
            lines.append(f"| {row['label']} | " + " | ".join(f"{row['valid_accuracy'][s]['mean']:.3f}" for s in shards)
                         + f" | {lowest / chance:.1f}x | {next(iter(row['num_updates'].values()))} |")
        if "cssl.1" in pretrained:
            lines += ["", learning_verdict(pretrained["cssl.1"], chance, family)]
        lines.append("")
    for measure, title in MEASURES.items():
        shown = {n: r for n, r in rows.items() if r[measure]}
        if not shown:
            continue
        metric, unit = METRIC[measure], UNIT[METRIC[measure]]
        what = "WER / CER" if metric == "cer" else f"{unit}"
        lines += [f"### {preset}: {title}, {what} (%) on the test sets, mean ± sd over {seeds} seed(s)", "",
                  "| checkpoint | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)]
        for row in shown.values():
            cells = [(f"{_cell(row[measure][s]['wer'])} / " if "wer" in row[measure][s] else "")
                     + _cell(row[measure][s][metric]) + _pairs_note(row[measure][s]) if s in row[measure] else "–"
                     for s in sets]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        detectable = result["detectable"][measure]
        cells = []
        for s in sets:
            d = detectable[s].get(metric)
            if not d or not math.isfinite(d["mdd"]):
                cells.append("n/a (one seed)")
            else:
                need = f"; {d['seeds_for_5_percent_relative']} seeds for 5 % rel." if d["seeds_for_5_percent_relative"] else ""
                cells.append(f"{100 * d['mdd']:.1f} ({100 * d['mdd_relative']:.0f} % rel.){need}")
        lines.append(f"| minimum detectable {unit} difference | " + " | ".join(cells) + " |")
        if any("paired_mdd" in detectable[s].get(metric, {}) for s in sets):
            cells = []
            for s in sets:
                d = detectable[s].get(metric) or {}
                if not math.isfinite(d.get("paired_mdd", math.nan)):
                    cells.append("n/a (one seed)" if seeds == 1 else "–")
                    continue
                need = d["paired_seeds_for_5_percent_relative"]
                cells.append(f"{100 * d['paired_mdd']:.1f} ({100 * d['paired_mdd_relative']:.0f} % rel.)"
                             + (f"; {need} seeds for 5 % rel." if need else ""))
            source = _mdd_source(result, measure)
            lines.append(f"| … paired ({source.replace(', smallest α/β', '')}) | " + " | ".join(cells) + " |")
        lines += [_paper_gain_line(result, measure), ""]
        floors = floors_line(result, measure)
        if floors:
            lines += [floors, ""]
        if result["comparisons"][measure]:
            lines += [f"{title}: {unit} differences a − b (points, paired over seeds; relative to b; 95 % interval; "
                      "* = beyond the minimum detectable difference: the pooled paired one for PTLOC.1 at the "
                      "smallest α/β against its twin and pass-matched CSSL and for the positive control, the pair's "
                      "own otherwise)", ""]
            lines += _difference_lines(result, measure, heads) + [""]
    gapped = {n: r for n, r in rows.items() if r["gap"]}
    shards = list(next(iter(gapped.values()))["gap"])
    lines += [f"### {preset}: validation loss / equilibrium gap per pre-training shard (bits per target)", "",
              "| checkpoint | " + " | ".join(shards) + " | passes per seed |", "|---|" + "---|" * (len(shards) + 1)]
    for row in gapped.values():
        cells = [f"{row['gap'][s]['loss_before']['mean']:.3f} / {row['gap'][s]['gap']['mean']:+.4f}" for s in shards]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {next(iter(row['passes'].values()))} |")
    lines += [""] + _rounds_lines(preset, result) + _gap_lines(preset, result) + _step_size_lines(preset, result)
    lines += _warning_lines(preset, result)
    return "\n".join(lines) + "\n" + _cost_line(preset, result)


PAPER_PROTOCOL = {"multi-domain": {"ptloc_length": 0.75, "ptloc_lr": 0.05, "lr_sum": 0.034},
                  "multilingual": {"ptloc_length": 0.80, "ptloc_lr": 0.10, "lr_sum": 0.075}}
"""The paper's proportions (../shared/METHOD.md "The protocol in proportions")."""


def plan_table(preset: str, settings: dict) -> str:
    """eqssl-reproduce --plan: every pre-training run of one seed with its start, length and
    learning rates (their sum from fairseq's own schedulers), then the protocol beside the paper's."""
    from .plan import learning_rates, plan_pretraining, rounds, round1_ratios

    runs = plan_pretraining(preset, settings, round1_ratios(settings)[0])
    sums = {r.name: sum(learning_rates(r.schedule)) for r in runs}
    lines = [f"### {preset}: the runs of one seed ({settings['path']}; rounds >= 2 shown at α/β = "
             f"{round1_ratios(settings)[0]:g}, the α rule picks theirs)", "",
             "| run | round | from | recipe | updates | peak lr | α | Σ lr | Σ lr / CSSL.1's |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        alpha = r.schedule.get("inner_lr")
        lines.append(f"| {r.name} | {r.round} | {r.init_from or 'scratch'} | {r.recipe} | {r.schedule['max_update']} | "
                     f"{r.schedule['lr']:g} | {f'{alpha:g}' if alpha else '–'} | {sums[r.name]:.4g} | "
                     f"{100 * sums[r.name] / sums['cssl.1']:.1f} % |")
    if settings.get("controls_only"):  # no PTLOC run: no protocol to compare
        return "\n".join(lines + [""])
    kind = pretraining_kind(preset, settings)
    paper = PAPER_PROTOCOL[kind]
    by = {r.name: r for r in runs}
    ptloc = by[f"ptloc.1.r{round1_ratios(settings)[0]:g}"]
    cssl = by["cssl.1"]
    lines += ["", f"### {preset}: the protocol in proportions ({kind}), paper vs eqssl", "",
              "| per round | paper | eqssl |", "|---|---|---|",
              f"| PTLOC.r length / CSSL.r length | {paper['ptloc_length']:g} | "
              f"{ptloc.schedule['max_update']} / {cssl.schedule['max_update']} updates = "
              f"{ptloc.schedule['max_update'] / cssl.schedule['max_update']:.2f} |",
              f"| β / CSSL peak lr | {paper['ptloc_lr']:g} | {ptloc.schedule['lr']:g} / {cssl.schedule['lr']:g} = "
              f"{ptloc.schedule['lr'] / cssl.schedule['lr']:.3g} |",
              f"| α / β | 10 | {', '.join(f'{x:g}' for x in round1_ratios(settings))} (round 1; rounds >= 2: the α rule) |",
              f"| Σ lr over PTLOC.r / over CSSL.r | {100 * paper['lr_sum']:.1f} % | "
              f"{100 * sums[ptloc.name] / sums['cssl.1']:.1f} % |",
              "| schedule, CSSL.r | constant, then decayed over the last 1/4 (1/5) | "
              f"warm-up {cssl.schedule.get('warmup_updates', 0)} updates, then linear decay to 0 (the recipe's) |",
              "| schedule, PTLOC.r | constant, then α and β decayed over the last 1/3 (1/4) | "
              f"warm-up {ptloc.schedule['warmup_steps']}, constant {ptloc.schedule['hold_steps']}, decay "
              f"{ptloc.schedule['decay_steps']} to {ptloc.schedule['final_lr_scale']:g} β (α follows) |",
              f"| CSSL.r (r >= 2) length / CSSL.1's | 1 | "
              f"{by['cssl.2'].schedule['max_update'] / cssl.schedule['max_update']:.2f} |" if "cssl.2" in by else
              "| CSSL.r (r >= 2) length / CSSL.1's | 1 | – (one round) |",
              f"| rounds | 3 | {rounds(preset, settings)} |", ""]
    return "\n".join(lines)
