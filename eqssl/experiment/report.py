"""The experiment's tables: per preset, rows (checkpoints) by fine-tuning sets over seeds, the
comparisons paired by seed, the minimum detectable differences, the gap, the step-size table."""

from __future__ import annotations

import math
import re
from typing import Dict, List

from .plan import CONTROL, FBANK_LABEL, finetune_sets, pretraining_kind
from .statistics import (mean, minimum_detectable_difference, paired_difference, seeds_needed, spearman,
                         summarise)

MEASURES = {"probe": "frozen-upstream probe", "finetune": "full fine-tuning"}


PAPER_GAINS = {"multi-domain": (0.045, 0.30), "multilingual": (0.008, 0.034)}
"""The paper's one-round relative gains of PTLOC over CSSL (../shared/METHOD.md), by pre-training kind."""


def comparison_pairs(table: dict) -> List[tuple]:
    """(a, b) row pairs the tables compare as a − b: CSSL.1 − no pre-training, every PTLOC − its
    compute-matched CSSL, and every run of the step-size sweep − the matched CSSL it names."""
    pairs = [("cssl.1", CONTROL)] if "cssl.1" in table and CONTROL in table else []
    pairs += [(r["matched_to"], n) for n, r in table.items() if r["matched_to"] in table]
    pairs += [(n, r["compared_with"]) for n, r in table.items() if r.get("compared_with") in table]
    return pairs


def is_matched_pair(table: dict, a: str, b: str) -> bool:
    """True where b is the CSSL compute-matched to a: the pairs the experiment is about, not the
    step-size sweep's (which reuse a matched CSSL) nor CSSL.1 against random init."""
    return b in table and table[b]["matched_to"] == a


def mean_gap(record: dict) -> float:
    """A pre-trained checkpoint's equilibrium gap averaged over its shards."""
    return mean(shard["gap"] for shard in record["gap"].values())


def stage_seconds(per_seed: Dict[int, dict]) -> Dict[str, float]:
    """Seconds the finished stages took (their records), summed over seeds, per kind of stage."""
    total = {"pretraining": 0.0, "probe": 0.0, "finetune": 0.0}
    for results in per_seed.values():
        for row in results.values():
            if row["pretraining"]:
                total["pretraining"] += row["pretraining"].get("seconds") or 0.0
            for measure in ("probe", "finetune"):
                total[measure] += sum(r.get("seconds") or 0.0 for r in row[measure].values())
    return total


def analyse(preset: str, settings: dict, per_seed: Dict[int, dict], table: dict) -> dict:
    """Differences paired by seed (CER, gap), the gap against downstream CER, and the step-size sweep."""
    seeds = sorted(per_seed)
    sets = finetune_sets(preset, settings)
    comparisons = {measure: [] for measure in MEASURES}
    gap_differences = []
    for a, b in comparison_pairs(table):
        for measure in MEASURES:
            cells = {}
            for s in sets:
                if s in table[a][measure] and s in table[b][measure]:
                    cells[s] = paired_difference([per_seed[n][a][measure][s]["cer"] for n in seeds],
                                                 [per_seed[n][b][measure][s]["cer"] for n in seeds])
            if cells:
                comparisons[measure].append({"a": a, "b": b, "cer": cells})
        if b != CONTROL:
            records = {name: [per_seed[n][name]["pretraining"] for n in seeds] for name in (a, b)}
            shards = {shard: paired_difference([r["gap"][shard]["gap"] for r in records[a]],
                                               [r["gap"][shard]["gap"] for r in records[b]])
                      for shard in records[a][0]["gap"]}
            shards["mean"] = paired_difference([mean_gap(r) for r in records[a]], [mean_gap(r) for r in records[b]])
            gap_differences.append({"a": a, "b": b, "gap": shards})
    # Does a lower gap go with better downstream scores? Every pre-trained row (not random weights).
    gap_vs_cer = {}
    for measure in MEASURES:
        points = [(name, mean(mean_gap(per_seed[n][name]["pretraining"]) for n in seeds),
                   mean(row[measure][s]["cer"]["mean"] for s in sets))
                  for name, row in table.items()
                  if name != CONTROL and row["gap"] and all(s in row[measure] for s in sets)]
        gap_vs_cer[measure] = {"rows": [{"name": n, "gap": g, "cer": c} for n, g, c in points],
                               "spearman": spearman([p[1] for p in points], [p[2] for p in points])}
    sweep = []
    ptloc = settings["ptloc"]
    base = float(ptloc["inner_lr"]) / float(ptloc["lr"])
    first = settings["inner_steps"][0]
    for name, row in table.items():
        match = re.fullmatch(rf"ptloc\.1\.k{first}(?:\.r([\d.e+-]+))?", name)
        if not match or not row["gap"]:
            continue
        ratio = float(match.group(1)) if match.group(1) else base
        gap = next((d for d in gap_differences if d["a"] == name), None)  # PTLOC is always a
        entry = {"name": name, "ratio": ratio, "inner_lr": ratio * float(ptloc["lr"]),
                 "against": gap["b"] if gap else None,
                 "gap": mean(mean_gap(per_seed[n][name]["pretraining"]) for n in seeds)}
        if gap:
            entry["gap_difference"] = gap["gap"]["mean"]["mean"]
            for measure in MEASURES:
                cells = next((c["cer"] for c in comparisons[measure] if c["a"] == name), {})
                if cells:
                    entry[measure] = {"cer_difference": mean(c["mean"] for c in cells.values()), "sets": len(cells)}
        sweep.append(entry)
    sweep.sort(key=lambda e: e["ratio"])
    return {"comparisons": comparisons, "gap_differences": gap_differences, "gap_vs_cer": gap_vs_cer,
            "step_size": sweep if len(sweep) > 1 else [], "seconds": stage_seconds(per_seed),
            "kind": pretraining_kind(preset, settings)}


def aggregate(preset: str, settings: dict, per_seed: Dict[int, dict]) -> dict:
    """One preset's results: per row (checkpoint, FBANK), per measure and set, WER and CER over
    seeds with the minimum detectable difference; gaps, validation accuracy, passes."""
    sets = finetune_sets(preset, settings)
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    table = {}
    for name in first:
        pretraining = [per_seed[s][name]["pretraining"] for s in seeds]
        label = pretraining[0]["label"] if pretraining[0] else FBANK_LABEL
        row = {"label": label, "matched_to": pretraining[0]["matched_to"] if pretraining[0] else None,
               "compared_with": pretraining[0].get("compared_with") if pretraining[0] else None,
               "probe": {}, "finetune": {}, "gap": {}, "valid_accuracy": {}, "chance": None, "passes": {},
               "num_updates": {}}
        for measure in MEASURES:
            for set_name in sets:
                cells = [per_seed[s][name][measure].get(set_name) for s in seeds]
                if all(c is not None for c in cells):
                    row[measure][set_name] = {"wer": summarise([c["wer"] for c in cells]),
                                              "cer": summarise([c["cer"] for c in cells])}
        if pretraining[0]:
            for shard in pretraining[0]["gap"]:
                row["gap"][shard] = {key: summarise([r["gap"][shard][key] for r in pretraining])
                                     for key in ("loss_before", "loss_after", "gap")}
            for shard in pretraining[0].get("valid_accuracy") or {}:
                row["valid_accuracy"][shard] = summarise([r["valid_accuracy"][shard] for r in pretraining])
            row["chance"] = pretraining[0].get("chance")
            row["passes"] = {str(s): r["passes"] for s, r in zip(seeds, pretraining)}
            row["num_updates"] = {str(s): r["num_updates"] for s, r in zip(seeds, pretraining)}
        table[name] = row
    detectable = {}
    for measure in MEASURES:
        detectable[measure] = {}
        for set_name in sets:
            detectable[measure][set_name] = {}
            for metric in ("wer", "cer"):
                sds = [row[measure][set_name][metric]["sd"] for row in table.values() if set_name in row[measure]]
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
            found = detectable[measure][set_name].get("cer")
            # PTLOC and its matched CSSL share their seed's CSSL.1 and probe or fine-tuning seed:
            # the spread of their paired differences, not of each row, limits what can be seen.
            # The sweep's pairs stay out: a step size that breaks the model would inflate the spread.
            sds = [c["cer"][set_name]["sd"] for c in analysis["comparisons"][measure]
                   if is_matched_pair(table, c["a"], c["b"]) and set_name in c["cer"]]
            if not found or not sds:
                continue
            pooled = math.sqrt(mean(sd ** 2 for sd in sds))
            mdd = minimum_detectable_difference(pooled, len(seeds), paired=True)
            reference = found["cssl1_mean"]
            found.update(paired_sd=pooled, paired_mdd=mdd, paired_mdd_relative=mdd / reference if reference else math.nan,
                         paired_seeds_for_5_percent_relative=seeds_needed(pooled, 0.05 * reference, paired=True)
                         if reference and pooled > 0 else None)
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
    if lowest >= LEARNED * chance:
        return (f"CSSL.1 learned: validation accuracy {lowest:.3f} on its lowest shard, {lowest / chance:.1f}x "
                "chance; the downstream rows below compare models that learned.")
    return (f"**CSSL.1 is still at chance** (validation accuracy {lowest:.3f} on its lowest shard, chance "
            f"{chance:.3f}): this budget ends inside wav2vec 2.0's early plateau, so no row below can show "
            "whether pre-training or PTLOC helps. The `small` settings leave the plateau (README \"Learning "
            "curves\"): eqssl-reproduce --preset multidomain multilingual --size small --seeds 3 --jobs 2 --out runs/small")


def _cell(stat: dict) -> str:
    if stat["seeds"] > 1:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['sd']:.1f}"
    return f"{100 * stat['mean']:.1f}"


def _difference_cell(result: dict, measure: str, pair: dict, set_name: str, relative: bool = True) -> str:
    """One paired CER difference in points, * where |Δ| exceeds the minimum detectable difference
    (the rows' pooled one against random init, the pooled paired one against a matched CSSL, the
    pair's own otherwise), with the change relative to b and the 95 % interval."""
    d = pair["cer"].get(set_name)
    if d is None:
        return "–"
    found = result["detectable"][measure][set_name]["cer"]
    if pair["b"] == CONTROL:
        mdd = found["mdd"]
    elif is_matched_pair(result["checkpoints"], pair["a"], pair["b"]):
        mdd = found.get("paired_mdd", math.nan)
    else:  # the step-size sweep: its spread is its own (a step size can break a model), not the pool's
        mdd = minimum_detectable_difference(d["sd"], d["seeds"], paired=True)
    star = "*" if math.isfinite(mdd) and abs(d["mean"]) > mdd else ""
    cell = f"{100 * d['mean']:+.1f}{star}"
    if relative:
        cell += f" ({100 * d['mean'] / result['checkpoints'][pair['b']][measure][set_name]['cer']['mean']:+.0f} %)"
    if math.isfinite(d["low"]):
        cell += f" [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    return cell


def _difference_lines(result: dict, measure: str, heads: List[str]) -> List[str]:
    """Rows of `a minus b` CER differences paired by seed, in points, with the relative change
    against b and the 95 % interval; * where |Δ| exceeds the minimum detectable difference."""
    rows, sets = result["checkpoints"], result["sets"]
    lines = ["| comparison | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)]
    for pair in result["comparisons"][measure]:
        cells = [_difference_cell(result, measure, pair, s) for s in sets]
        lines.append(f"| {rows[pair['a']]['label']} − {rows[pair['b']]['label']} | " + " | ".join(cells) + " |")
    return lines


def _summary_lines(preset: str, result: dict, heads: List[str]) -> List[str]:
    """The answer in one table: per measure, CSSL.1 against random init and each PTLOC.1 against its
    compute-matched CSSL (CER points, paired over seeds), beside the paired minimum detectable
    difference and the paper's gains in points; then the gap of each PTLOC against its matched CSSL."""
    rows, sets = result["checkpoints"], result["sets"]
    short = {CONTROL: "random init"}
    lines = []
    for measure, title in MEASURES.items():
        pairs = [p for p in result["comparisons"][measure]
                 if p["b"] == CONTROL or is_matched_pair(rows, p["a"], p["b"])]
        if not pairs:
            continue
        for pair in pairs:
            name = f"{rows[pair['a']]['label']} − {short.get(pair['b'], 'matched CSSL')}"
            lines.append(f"| {title}: {name} | " + " | ".join(_difference_cell(result, measure, pair, s, relative=False)
                                                           for s in sets) + " |")
        cells = []
        for s in sets:
            found = result["detectable"][measure][s].get("cer") or {}
            mdd = found.get("paired_mdd", math.nan)
            cells.append(f"{100 * mdd:.1f} ({100 * found['paired_mdd_relative']:.0f} %)" if math.isfinite(mdd) else "n/a")
        lines.append(f"| {title}: paired MDD, PTLOC − matched CSSL | " + " | ".join(cells) + " |")
        lines.append(_paper_gain_line(result, measure, prefix=f"{title}: "))
    if not lines:
        return []
    seeds = len(result["seeds"])
    lines = [f"### {preset}: summary, CER differences a − b in points (paired over {seeds} seed(s); 95 % interval; "
             "* = beyond the minimum detectable difference, MDD; negative: a is better)", "",
             "| comparison | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)] + lines
    gaps = [d for d in result.get("gap_differences") or [] if is_matched_pair(rows, d["a"], d["b"])]
    if gaps:
        parts = []
        for d in gaps:
            g = d["gap"]["mean"]
            interval = f" [{g['low']:+.4f}, {g['high']:+.4f}]" if math.isfinite(g["low"]) else ""
            parts.append(f"{rows[d['a']]['label']} {g['mean']:+.4f}{interval}")
        lines += ["", "Equilibrium gap, PTLOC − matched CSSL, mean over shards (bits; negative: nearer "
                  "equilibrium): " + "; ".join(parts) + "."]
    return lines + [""]


def _gap_lines(preset: str, result: dict) -> List[str]:
    """The gap of each PTLOC run minus its matched CSSL's, and the gap against downstream CER."""
    rows, lines = result["checkpoints"], []
    differences = result.get("gap_differences") or []
    if differences:
        shards = list(differences[0]["gap"])
        lines += [f"### {preset}: equilibrium gap, PTLOC minus its compute-matched CSSL (bits; paired over seeds, "
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
            lines.append(f"Gap against {title} CER: Spearman ρ = {rho:+.2f} over {len(found['rows'])} pre-trained "
                         "checkpoints (mean gap over shards and seeds against mean CER over sets and seeds; "
                         "ρ > 0: a lower gap goes with a lower CER).")
    return lines + [""] if lines else []


def _step_size_lines(preset: str, result: dict) -> List[str]:
    """The inner step-size sweep: per α/β, PTLOC.1's gap and its downstream CER minus the matched CSSL's."""
    sweep = result.get("step_size") or []
    if not sweep:
        return []
    rows = result["checkpoints"]
    lines = [f"### {preset}: the inner step size of PTLOC.1 (α = ratio × β; each against the same compute-matched "
             "CSSL, mean over seeds and sets)", "",
             "| α/β | α | mean gap (bits) | gap − matched CSSL's | probe CER − matched (points) "
             "| fine-tuning CER − matched (points) |", "|---|---|---|---|---|---|"]
    for e in sweep:
        diff = e.get("gap_difference")
        cells = [f"{e['ratio']:g}", f"{e['inner_lr']:g}", f"{e['gap']:.4f}", f"{diff:+.4f}" if diff is not None else "–"]
        cells += [f"{100 * e[m]['cer_difference']:+.1f}" if m in e else "–" for m in MEASURES]
        lines.append("| " + " | ".join(cells) + " |")
    against = {e["against"] for e in sweep if e.get("against")}
    if against:
        lines += ["", "Matched CSSL: " + ", ".join(rows[a]["label"] for a in sorted(against)) + "."]
    return lines + [""]


def _paper_gain_line(result: dict, measure: str, prefix: str = "") -> str:
    """The table row of the paper's one-round relative gains for this kind of pre-training, per set
    in CER points of CSSL.1; `prefix` leads its label (the summary names the measure)."""
    kind = result.get("kind", "multi-domain")
    low, high = PAPER_GAINS[kind]
    cells = []
    for s in result["sets"]:
        reference = result["detectable"][measure][s].get("cer", {}).get("cssl1_mean")
        cells.append(f"{100 * low * reference:.1f}–{100 * high * reference:.1f}" if reference else "–")
    return f"| {prefix}the paper's {kind} gains ({100 * low:g}–{100 * high:g} % rel.) on CSSL.1's CER | " + " | ".join(cells) + " |"


def _cost_line(preset: str, result: dict) -> str:
    seconds = result.get("seconds")
    if not seconds:
        return ""
    parts = ", ".join(f"{name} {value / 60:.0f}" for name, value in seconds.items())
    return (f"Compute of {preset} ({len(result['seeds'])} seed(s)), the stages' own times summed: {parts} minutes; "
            f"{sum(seconds.values()) / 3600:.1f} process-hours in all.\n")


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
        lines += [f"### {preset}: {title}, WER / CER (%) on the test sets, mean ± sd over {seeds} seed(s)", "",
                  "| checkpoint | " + " | ".join(heads) + " |", "|---|" + "---|" * len(sets)]
        for row in shown.values():
            cells = [f"{_cell(row[measure][s]['wer'])} / {_cell(row[measure][s]['cer'])}" if s in row[measure] else "–"
                     for s in sets]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        detectable = result["detectable"][measure]
        cells = []
        for s in sets:
            d = detectable[s].get("cer")
            if not d or not math.isfinite(d["mdd"]):
                cells.append("n/a (one seed)")
            else:
                need = f"; {d['seeds_for_5_percent_relative']} seeds for 5 % rel." if d["seeds_for_5_percent_relative"] else ""
                cells.append(f"{100 * d['mdd']:.1f} ({100 * d['mdd_relative']:.0f} % rel.){need}")
        lines.append("| minimum detectable CER difference | " + " | ".join(cells) + " |")
        if any("paired_mdd" in detectable[s].get("cer", {}) for s in sets):
            cells = []
            for s in sets:
                d = detectable[s].get("cer") or {}
                if not math.isfinite(d.get("paired_mdd", math.nan)):
                    cells.append("n/a (one seed)" if seeds == 1 else "–")
                    continue
                need = d["paired_seeds_for_5_percent_relative"]
                cells.append(f"{100 * d['paired_mdd']:.1f} ({100 * d['paired_mdd_relative']:.0f} % rel.)"
                             + (f"; {need} seeds for 5 % rel." if need else ""))
            lines.append("| … paired, PTLOC − matched CSSL | " + " | ".join(cells) + " |")
        lines += [_paper_gain_line(result, measure), ""]
        if result["comparisons"][measure]:
            lines += [f"{title}: CER differences a − b (points, paired over seeds; relative to b; 95 % interval; "
                      "* = beyond the minimum detectable difference: the pooled paired one against a matched CSSL, "
                      "the pair's own for the step-size sweep)", ""]
            lines += _difference_lines(result, measure, heads) + [""]
    gapped = {n: r for n, r in rows.items() if r["gap"]}
    shards = list(next(iter(gapped.values()))["gap"])
    lines += [f"### {preset}: validation loss / equilibrium gap per pre-training shard (bits per target)", "",
              "| checkpoint | " + " | ".join(shards) + " | passes per seed |", "|---|" + "---|" * (len(shards) + 1)]
    for row in gapped.values():
        cells = [f"{row['gap'][s]['loss_before']['mean']:.3f} / {row['gap'][s]['gap']['mean']:+.4f}" for s in shards]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {next(iter(row['passes'].values()))} |")
    lines += [""] + _gap_lines(preset, result) + _step_size_lines(preset, result)
    return "\n".join(lines) + "\n" + _cost_line(preset, result)
