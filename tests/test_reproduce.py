"""eqssl-reproduce's plumbing on the tiny multilingual corpus with a few updates per run: every
stage runs and leaves a verifiable record, reruns skip finished stages, a changed checkpoint
redoes exactly what depends on it, the results file has every cell, and the compute-matched
baseline really makes as many passes as the PTLOC run. Which method wins is not asserted."""

import json
import math

import pytest
import yaml

from conftest import REPO, compose_jobs, run, tensorboard_scalars, train_log_values

from eqssl.models.eq_wav2vec2 import load_pretraining_checkpoint
from eqssl.experiment.fairseq_log import validations

PRETRAINING = ["cssl.1", "cssl.1.x0.5", "ptloc.1.off", "cssl.1+2x", "ptloc.1.r10", "ptloc.1.r100", "cssl.1-temp",
               "cssl.2", "cssl.2.twin", "ptloc.2.off", "ptloc.2.twin", "ptloc.2"]
ROWS = ["fbank", "cssl.1", "none", *PRETRAINING[1:]]
# Fine-tuned: the first round's reference rows and a later round (each fine-tuning is a fairseq process).
FINETUNED = ["cssl.1", "none", "ptloc.1.r10", "ptloc.2"]
SETS = ["sv"]


@pytest.fixture(scope="module")
def experiment(multilingual_corpus, tmp_path_factory):
    """A finished two-round, one-seed experiment and the output of its first run."""
    out = tmp_path_factory.mktemp("reproduce")
    (out / "multilingual").mkdir()
    # The manifests hold the corpus's absolute audio root, so it is linked, not copied; the
    # corpus stage then verifies it and writes nothing.
    (out / "multilingual" / "corpus").symlink_to(multilingual_corpus)
    settings = yaml.safe_load(open(REPO / "recipes" / "reproduce" / "tiny.yaml"))
    settings.update(rounds=2, inner_steps=1, validate_interval_updates=4, positive_control=[0.5])
    settings["cssl1"].update(max_update=8, validate_interval_updates=4)
    # multilingual proportions: PTLOC rounds of 0.8 x 8 = 6 updates; two step sizes, so the alpha
    # rule chooses the later rounds' from round 1
    settings["ptloc"].update(ratios=[10, 100], pass_matched=True)
    settings["gap"]["batches"] = 2
    settings["finetune"].update(max_update=4, sets={"multilingual": SETS}, checkpoints=FINETUNED)
    settings["probe"].update(updates=5, batch_size=4)
    settings["phones"]["sets"] = {"multilingual": SETS}
    settings["pretrain_overrides"] += ["common.log_interval=2"]  # training lines (the gradient change) in 6 updates
    path = out / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    # one chain and two jobs: the chain's independent stages run side by side
    command = ["eqssl-reproduce", "--preset", "multilingual", "--size", path, "--out", out, "--jobs", "2",
               "--records", out / "records", "--reference-seconds", "0.1"]
    first = run(command, fresh=True)  # a new interpreter: its output includes what it prints as it imports
    assert first.returncode == 0, first.stdout[-3000:]
    return out, command, first.stdout


def records(out):
    seed = out / "multilingual" / "seed1"
    found = {name: json.loads((seed / name / "eqssl_stage.json").read_text()) for name in PRETRAINING + ["none"]}
    for name in FINETUNED:
        for s in SETS:
            found[f"{name}/{s}"] = json.loads((seed / "finetune" / name / s / "eqssl_stage.json").read_text())
    for name in ROWS:
        for s in SETS:
            found[f"probe {name}/{s}"] = json.loads((seed / "probe" / name / s / "eqssl_stage.json").read_text())
            found[f"phones {name}/{s}"] = json.loads((seed / "phones" / name / s / "eqssl_stage.json").read_text())
    return found


def test_results_file_has_every_cell(experiment):
    out, _, stdout = experiment
    summary = json.loads((out / "results.json").read_text())
    result = summary["presets"]["multilingual"]
    assert list(result["checkpoints"]) == ROWS
    assert result["sets"] == {"sv": False}  # unseen in pre-training
    for name, row in result["checkpoints"].items():
        measures = ["probe", "finetune"] if name in FINETUNED else ["probe"]
        for measure in measures:
            for s in SETS:
                for metric in ("wer", "cer"):
                    cell = row[measure][s][metric]
                    assert math.isfinite(cell["mean"]) and cell["seeds"] == 1, (name, measure, s, metric)
        for measure in ("abx_within", "abx_across", "phone_probe"):  # the primary measures, every row
            cell = row[measure]["sv"]["error"]
            assert 0 <= cell["mean"] <= 1 and cell["seeds"] == 1, (name, measure)
        if name == "fbank":
            assert row["finetune"] == {} and row["gap"] == {}
            continue
        assert sorted(row["gap"]) == ["en", "fr", "nl"]
        if name != "none":
            assert sorted(row["valid_accuracy"]) == ["en", "fr", "nl"] and row["chance"] == pytest.approx(1 / 11)
        for shard in row["gap"].values():
            assert math.isfinite(shard["gap"]["mean"])
            assert shard["gap"]["mean"] == pytest.approx(shard["loss_before"]["mean"] - shard["loss_after"]["mean"])
    table = (out / "results.md").read_text()
    assert table in stdout
    for row in result["checkpoints"].values():
        assert f"| {row['label']} |" in table
    # One seed: no spread, so no minimum detectable difference and no verdict, and the tables say so.
    assert math.isnan(result["detectable"]["probe"]["sv"]["cer"]["mdd"])
    assert "| minimum detectable CER difference | n/a (one seed) |" in table
    assert result["detectable"]["probe"]["sv"]["cer"]["sensitivity"] == "undetermined"
    for line in ["| CSSL.1 − No pre-training (random init) |", "| CSSL.1 − CSSL.1 at 0.5 of its budget |",
                 "| PTLOC.1 K=1 α/β=10 − PTLOC.1 constraint off (twin, K=0) |",
                 "| PTLOC.1 K=1 α/β=100 − CSSL.1 +2x updates (pass-matched to PTLOC.1) |",
                 "| PTLOC.2 K=1 α/β=100 − PTLOC.2 of the twin chain (K=0) |", "| PTLOC.2 K=1 α/β=100 − CSSL.2 |",
                 "| PTLOC.2 K=1 α/β=100 − CSSL.1 |",
                 "| frozen-upstream probe: sensitive? (CSSL.1 beats ½ budget beyond the paired MDD) | undetermined |",
                 "| the paper's multilingual gains (0.8–3.4 % rel.) on CSSL.1's CER |"]:
        assert line in table, line
    # The gap of each PTLOC run against its twin, paired by seed, from the stage records.
    found = records(out)
    gaps = {(d["a"], d["kind"]): d for d in result["gap_differences"]}
    assert sorted(gaps) == [("ptloc.1.r10", "constraint"), ("ptloc.1.r10", "pass-matched"),
                            ("ptloc.1.r100", "constraint"), ("ptloc.1.r100", "pass-matched"),
                            ("ptloc.2", "constraint"), ("ptloc.2", "twin chain")]
    for shard in ("en", "fr", "nl"):
        expected = found["ptloc.1.r10"]["gap"][shard]["gap"] - found["ptloc.1.off"]["gap"][shard]["gap"]
        assert gaps[("ptloc.1.r10", "constraint")]["gap"][shard]["mean"] == pytest.approx(expected)
    assert "PTLOC minus its controls (bits" in table
    assert "Gap against frozen-upstream probe CER: Spearman ρ = " in table
    # The inner step: alpha/beta 10 (the paper's) and 100, each against the same twin, with how far
    # each took the trajectory and the outer gradient.
    steps = result["step_size"]
    assert [(e["name"], e["ratio"], e["against"]) for e in steps] == [
        ("ptloc.1.r10", 10.0, "ptloc.1.off"), ("ptloc.1.r100", 100.0, "ptloc.1.off")]
    probe_delta = found["probe ptloc.1.r100/sv"]["cer"] - found["probe ptloc.1.off/sv"]["cer"]
    assert steps[1]["probe"]["cer_difference"] == pytest.approx(probe_delta)
    abx_delta = (found["phones ptloc.1.r100/sv"]["layers"]["1"]["abx_across"]
                 - found["phones ptloc.1.off/sv"]["layers"]["1"]["abx_across"])
    assert 100 * steps[1]["abx_across"]["cer_difference"] == pytest.approx(abx_delta)
    # ABX and the phone probe: every layer in the record, the settings' layer in the tables
    record = found["phones cssl.1/sv"]
    assert sorted(record["layers"]) == ["0", "1"]  # the settings' phones.layer is 1
    cell = result["checkpoints"]["cssl.1"]["abx_across"]["sv"]["error"]["mean"]
    assert 100 * cell == pytest.approx(record["layers"]["1"]["abx_across"])
    assert list(found["phones fbank/sv"]["layers"]) == ["0"]
    for title in ("ABX within speaker", "ABX across speakers", "phone probe"):
        assert f"### multilingual: {title}, error (%) on the test sets" in table, title
    for e in steps:
        assert e["divergence"]["mean"] == pytest.approx(found[e["name"]]["divergence"]["value"]) and e["divergence"]["mean"] > 0
        assert 0 < e["gradient_change"]["mean"] < 10
    assert steps[0]["gradient_change"]["mean"] < steps[1]["gradient_change"]["mean"]  # a larger step moves it more
    assert "| 100 | 0.005 |" in table  # beta = 0.1 x the tiny recipe's 5e-4 (multilingual proportions)
    assert "validation loss per run" in table
    _, _, stdout = experiment
    assert "probe feature cache: multilingual" in stdout
    # Each checkpoint's probe features are deleted once its probes have finished: only FBANK's stay.
    assert [p.name for p in (out / "multilingual" / "features").iterdir()] == ["fbank"]
    seconds = result["seconds"]
    assert seconds["pretraining"] == pytest.approx(sum(found[n]["seconds"] for n in PRETRAINING + ["none"]))
    assert "Compute of multilingual (1 seed(s))" in table
    assert seconds["phones"] == pytest.approx(sum(found[f"phones {n}/sv"]["seconds"] for n in ROWS))
    assert "progress: 45/45 stages" in stdout


def test_one_chain_under_two_jobs_runs_its_independent_stages_side_by_side(experiment):
    """Round 2's CSSL runs of the two chains (from PTLOC.1 and from its twin) both start before
    either finishes; every run starts after the run it starts from has finished."""
    _, _, stdout = experiment
    lines = stdout.splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    starts = {name: first(f"[multilingual seed 1] {name}: CSSL.2") for name in ("cssl.2", "cssl.2.twin")}
    ends = {name: first(f"[multilingual seed 1] {name}: finished") for name in ("cssl.2", "cssl.2.twin")}
    assert max(starts.values()) < min(ends.values()), "\n".join(lines[min(starts.values()):max(ends.values()) + 1])
    for name, source in [("ptloc.2", "cssl.2"), ("ptloc.2.twin", "cssl.2.twin"), ("ptloc.2.off", "cssl.2")]:
        assert first(f"[multilingual seed 1] {source}: finished") < first(f"[multilingual seed 1] {name}: PTLOC.2")


def records_report(settings, records) -> str:
    """eqssl-reproduce --report --records: its output (the tables from the records alone)."""
    report = run(["eqssl-reproduce", "--preset", "multilingual", "--size", settings, "--report", "--records", records])
    assert report.returncode == 0, report.stdout[-3000:]
    return report.stdout


def test_records_alone_give_the_run_folders_tables(experiment, tmp_path):
    """The records copied out of the run (as a fresh clone has them: no run folder, no checkpoint)
    give the same tables, character for character, as the report of the run folder."""
    import shutil

    out, _, _ = experiment
    records = tmp_path / "clone" / "results"
    shutil.copytree(out / "records", records)
    assert not list(records.rglob("*.pt")) and max(p.stat().st_size for p in records.rglob("*.json")) < 20_000
    seed = records / "wav2vec2-settings" / "multilingual" / "seed1"
    first = json.loads((seed / "ptloc.2.json").read_text())
    assert first["parent"] == "cssl.2" and first["weights_sha256"] and first["commit"]
    assert first["parent_weights_sha256"] == json.loads((seed / "cssl.2.json").read_text())["weights_sha256"]
    assert first["reference_seconds"] == 0.1 and len(first["settings_sha256"]) == 64
    assert json.loads((seed / "phones" / "fbank" / "sv.json").read_text())["parent_weights_sha256"] is None
    settings = tmp_path / "clone" / "settings.yaml"
    shutil.copy(out / "settings.yaml", settings)
    printed = records_report(settings, records)
    tables = (out / "results.md").read_text()
    assert "\n" + tables + "\n(from the records under" in printed
    assert "NOTE" not in printed


def test_records_that_do_not_belong_together_are_refused(experiment, tmp_path):
    """Pooling needs one settings hash; a chain link whose parent is other weights is reported; a
    record with a missing field or bad JSON gets one line naming the file (and the field)."""
    import shutil

    out, _, _ = experiment
    settings = tmp_path / "settings.yaml"
    shutil.copy(out / "settings.yaml", settings)

    def fresh(name: str):
        records = tmp_path / name
        shutil.copytree(out / "records", records)
        return records, records / "wav2vec2-settings" / "multilingual" / "seed1"

    def refused(records) -> str:
        report = run(["eqssl-reproduce", "--preset", "multilingual", "--size", settings, "--report", "--records", records])
        assert report.returncode != 0
        return report.stdout.strip().splitlines()[-1]

    records, seed = fresh("mixed")
    path = seed / "phones" / "cssl.1" / "sv.json"
    record = json.loads(path.read_text())
    record["settings_sha256"] = "0" * 64
    path.write_text(json.dumps(record))
    line = refused(records)
    assert "made under different settings cannot be pooled" in line and str(path) in line
    changed = yaml.safe_load(settings.read_text())
    changed["gap"]["batches"] = 3
    other = tmp_path / "changed" / "settings.yaml"
    other.parent.mkdir()
    other.write_text(yaml.safe_dump(changed))
    report = run(["eqssl-reproduce", "--preset", "multilingual", "--size", other, "--report", "--records",
                  fresh("other")[0]])
    assert report.returncode != 0 and "made under other settings" in report.stdout

    records, seed = fresh("link")
    path = seed / "ptloc.2.json"
    record = json.loads(path.read_text())
    record["parent_weights_sha256"] = "f" * 64
    path.write_text(json.dumps(record))
    printed = records_report(settings, records)
    assert f"NOTE: {path}: started from or measured cssl.2 with weights ffffffffffff" in printed

    records, seed = fresh("field")
    path = seed / "finetune" / "ptloc.2" / "sv.json"
    record = json.loads(path.read_text())
    del record["record"]["cer"]
    path.write_text(json.dumps(record))
    assert refused(records) == f"eqssl-reproduce: {path}: missing field 'record.cer'"
    path.write_text("{not json")
    assert refused(records).startswith(f"eqssl-reproduce: {path}: not a readable record")


def test_a_later_round_is_a_cell_that_recreates_its_start(experiment, tmp_path):
    """--rounds 2 on a machine with the records but no run folder: round 1's runs that round 2
    starts from are trained again (and not measured), their weights match the committed records
    (same machine), and round 2's records come out the same as the whole chain's."""
    import shutil

    out, command, _ = experiment
    records = tmp_path / "results"
    shutil.copytree(out / "records", records)
    seed = records / "wav2vec2-settings" / "multilingual" / "seed1"
    before = {p: json.loads(p.read_text()) for p in seed.rglob("*.json") if not p.name.startswith("cell.")}
    mine = tmp_path / "out"
    (mine / "multilingual").mkdir(parents=True)
    (mine / "multilingual" / "corpus").symlink_to((out / "multilingual" / "corpus").resolve())
    cell = run(["eqssl-reproduce", "--preset", "multilingual", "--size", out / "settings.yaml", "--out", mine,
                "--jobs", "2", "--records", records, "--reference-seconds", "0.1", "--rounds", "2"])
    assert cell.returncode == 0, cell.stdout[-3000:]
    assert "the α rule's choice recorded in" in cell.stdout
    ran = sorted(p.name for p in (mine / "multilingual" / "seed1").iterdir() if (p / "train.log").exists())
    ratio = json.loads((out / "multilingual" / "chain_ratio.json").read_text())["ratio"]
    assert ran == sorted(["cssl.1", "cssl.2", "cssl.2.twin", f"ptloc.1.r{ratio:g}", "ptloc.1.off", "ptloc.2",
                          "ptloc.2.off", "ptloc.2.twin"])
    for name in ("cssl.1", f"ptloc.1.r{ratio:g}", "ptloc.1.off"):
        assert f"records: {name} (seed 1) recreated here: its weights match the committed record's" in cell.stdout
    assert not (mine / "multilingual" / "seed1" / "phones" / "cssl.1").exists()  # round 1 is not measured again
    after = {p: json.loads(p.read_text()) for p in seed.rglob("*.json") if not p.name.startswith("cell.")}
    assert after == before  # nothing rewritten, nothing new: the cell repeated the committed round 2
    timing = json.loads(next(seed.glob("cell.rounds2-2*.json")).read_text())
    assert timing["real_seconds"] > 0 and timing["estimate_seconds"] is None  # the tiny settings state no costs
    assert "mean ± sd over 1 seed(s)" in cell.stdout  # the records complete the chain: its tables
    assert "[multilingual seed 1] cell cell.rounds2-2.json: " in cell.stdout  # its time, beside the tables
    assert "estimated – (no costs)" in cell.stdout


def test_the_plan_cuts_each_chain_into_cells_that_fit(tmp_path):
    """--plan prints the cells of the small experiment with their estimates from the settings'
    costs scaled by this machine's reference figure; a machine too slow for a round is refused,
    with the round's longest step named."""
    for model, preset in [("bestrq", "multidomain"), ("bestrq", "multilingual"), ("cpc", "multilingual")]:
        plan = run(["eqssl-reproduce", "--model", model, "--preset", preset, "--size", "small", "--seeds", "3",
                    "--jobs", "2", "--plan", "--reference-seconds", "0.08"])
        assert plan.returncode == 0, plan.stdout[-3000:]
        rows = [line for line in plan.stdout.splitlines() if line.startswith("| ") and "--rounds" in line]
        rounds = 3 if preset == "multidomain" else 1
        assert {row.split(" | ")[2] for row in rows} == {"1", "2", "3"}  # every seed
        covered = [row.split(" | ")[3] for row in rows if row.split(" | ")[2] == "1"]
        assert covered and covered[0].startswith("1") and covered[-1].endswith(str(rounds))
        for row in rows:
            estimate = row.split(" | ")[7]
            assert estimate.endswith(" min") and float(estimate.split()[0]) <= 100, row
    slow = run(["eqssl-reproduce", "--model", "bestrq", "--preset", "multidomain", "--size", "small", "--plan",
                "--jobs", "2", "--reference-seconds", "1.0"])
    assert slow.returncode == 0 and "| PTLOC.r length / CSSL.r length |" in slow.stdout  # the plan itself
    assert "No cells fit: " in slow.stdout and "multidomain round 1 alone needs about" in slow.stdout
    assert "its longest step is train " in slow.stdout and "| cell |" not in slow.stdout


def test_a_cell_that_cannot_fit_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    refused = reproduce_refuses("--model", "bestrq", "--preset", "multidomain", "--size", "small", "--seed", "1",
                                "--rounds", "1", "--jobs", "1", "--out", out, "--reference-seconds", "0.5")
    assert "multidomain seed 1 rounds 1: about" in refused and "beyond a cell's 100 minutes" in refused
    assert "its longest step is train " in refused
    assert not (out / "multidomain").exists()  # no corpus, no run


def test_a_one_round_chain_is_read_from_records_without_a_run_folder():
    """CPC's multilingual chain has one round and two α/β: no α choice is read, and no OUT is needed."""
    from eqssl.experiment.plan import load_settings
    from eqssl.experiment.stages import Chain, collect_chain

    settings = dict(load_settings("small", "cpc"), preset_files={})
    asked = []
    chain = Chain("multilingual", 1, None, settings, 1)
    assert collect_chain(chain, lambda path, sha: asked.append(path)) is None
    assert asked == ["cssl.1"]


def test_the_settings_hash_counts_what_results_depend_on():
    """A record's settings hash changes with a setting that changes a result, not with the plan's
    costs, the cell limit or another family's section."""
    import copy

    from eqssl.experiment.plan import load_settings, settings_sha256

    settings = load_settings("small", "cpc")
    other = copy.deepcopy(settings)
    other["costs"]["pass_seconds"] *= 2
    other["cells"] = {"minutes": 50}
    other["families"]["bestrq"]["cssl1"] = {"max_update": 1}
    assert settings_sha256(other) == settings_sha256(settings) == settings["sha256"]
    other["cssl1"] = dict(other["cssl1"], max_update=601)
    assert settings_sha256(other) != settings["sha256"]


def test_the_reference_figure_is_this_machines_benchmark():
    """The figure every record carries and the plan scales by: the benchmark's seconds per update."""
    from eqssl.experiment.records import reference_seconds

    assert 0.001 < reference_seconds() < 10


# Early in the file: pytest-xdist gives a worker its next file when two tests are left, so a
# long test at the end would hold that file back while the other worker may be idle.
def test_a_failing_chain_leaves_the_others_and_resumes(experiment, tmp_path):
    """Under --jobs 2, a chain that raises is reported with its stage, log and last line; the
    other chain finishes and is tabulated, the exit status says one failed, and a rerun resumes
    the failed chain from its last finished stage."""
    import shutil

    out, _, _ = experiment
    mine = tmp_path / "out"
    (mine / "multilingual").mkdir(parents=True)
    (mine / "multilingual" / "corpus").symlink_to((out / "multilingual" / "corpus").resolve())
    shutil.copytree(out / "multilingual" / "seed1", mine / "multilingual" / "seed1", symlinks=True)
    # Seed 2 runs a subset of the experiment's stages (one round, one step size, one fine-tuning,
    # no positive control): seed 1's finished stages cover it, and the second chain costs a few
    # runs, not a whole one.
    settings = yaml.safe_load((out / "settings.yaml").read_text())
    settings["rounds"] = 1
    settings["ptloc"].update(ratios=[10], pass_matched=False)
    settings["finetune"]["checkpoints"] = ["cssl.1"]
    settings["positive_control"] = []
    lighter = tmp_path / "settings.yaml"
    lighter.write_text(yaml.safe_dump(settings))
    blocked = mine / "multilingual" / "seed2" / "ptloc.1.off"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way")  # a file where the twin's run folder goes
    again = ["eqssl-reproduce", "--preset", "multilingual", "--size", lighter, "--out", mine, "--seeds", "2",
             "--jobs", "2"]
    first = run(again)
    assert first.returncode == 1, first.stdout[-3000:]
    assert "FAILED [multilingual seed 2] ptloc.1.off failed (folder: " in first.stdout
    assert "FileExistsError" in first.stdout and "1 chain(s) failed" in first.stdout
    assert "mean ± sd over 1 seed(s)" in first.stdout  # seed 1's tables
    assert json.loads((mine / "results.json").read_text())["failures"]
    assert (mine / "multilingual" / "seed2" / "cssl.1" / "eqssl_stage.json").exists()
    blocked.unlink()
    second = run(again)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "[multilingual seed 2] cssl.1: done, skipped" in second.stdout
    assert "[multilingual seed 2] ptloc.1.off: PTLOC.1 constraint off" in second.stdout
    assert "mean ± sd over 2 seed(s)" in second.stdout


def test_twin_and_pass_matched_runs_differ_from_ptloc_only_where_they_should(experiment):
    """The twin has exactly PTLOC's start, updates, learning rates and schedule, with inner_steps 0;
    the pass-matched CSSL (K+1) x the updates and passes at the same β and schedule shape."""
    out, _, _ = experiment
    seed = out / "multilingual" / "seed1"
    found = records(out)
    states = {n: load_pretraining_checkpoint(str(seed / n / "checkpoint_last.pt"))
              for n in ("ptloc.1.r10", "ptloc.1.r100", "ptloc.1.off", "cssl.1+2x")}
    cfg = {n: state["cfg"] for n, state in states.items()}
    assert [cfg[n]["task"]["inner_steps"] for n in states] == [1, 1, 0, 0]
    for n in ("ptloc.1.r100", "ptloc.1.off"):
        assert cfg[n]["lr_scheduler"] == cfg["ptloc.1.r10"]["lr_scheduler"], n
        assert cfg[n]["optimization"]["max_update"] == cfg["ptloc.1.r10"]["optimization"]["max_update"] == 6
        assert found[n]["input_sha256"] == found["ptloc.1.r10"]["input_sha256"] == found["cssl.1"]["sha256"]
    assert cfg["ptloc.1.r10"]["lr_scheduler"]["_name"] == "tri_stage"
    assert list(cfg["ptloc.1.r10"]["optimization"]["lr"]) == [0.00005]  # 0.1 x CSSL.1's 5e-4
    assert cfg["ptloc.1.r100"]["task"]["inner_lr"] == pytest.approx(100 * 0.00005)
    assert cfg["ptloc.1.r10"]["task"]["inner_lr"] == pytest.approx(10 * 0.00005)
    # The learning rate of every logged update is the same for PTLOC and its twin.
    logs = {n: train_log_values((seed / n / "train.log").read_text(), "lr") for n in ("ptloc.1.r10", "ptloc.1.off")}
    assert logs["ptloc.1.r10"] and logs["ptloc.1.r10"] == logs["ptloc.1.off"]
    matched = cfg["cssl.1+2x"]["lr_scheduler"]
    assert cfg["cssl.1+2x"]["optimization"]["max_update"] == 12
    for stage in ("warmup_steps", "hold_steps", "decay_steps"):
        assert abs(matched[stage] - 2 * cfg["ptloc.1.r10"]["lr_scheduler"][stage]) <= 1, stage
    assert found["cssl.1+2x"]["passes"] == found["ptloc.1.r10"]["passes"] == 6 * 3 * 2
    assert found["cssl.1-temp"]["passes"] == found["cssl.1-temp"]["num_updates"]
    # Round 2 runs on CSSL.1's schedule and length, from the PTLOC run the alpha rule chose, and the
    # twin chain continues the twin.
    choice = json.loads((out / "multilingual" / "chain_ratio.json").read_text())
    assert set(choice["loss_at_theta_minus_twin"]) == {"10", "100"}
    assert found["cssl.2"]["input_sha256"] == found[f"ptloc.1.r{choice['ratio']:g}"]["sha256"]
    assert found["cssl.2.twin"]["input_sha256"] == found["ptloc.1.off"]["sha256"]
    assert found["cssl.2"]["num_updates"] == found["cssl.1"]["num_updates"] == 8
    assert found["ptloc.2"]["ratio"] == choice["ratio"]
    assert found["ptloc.2.off"]["input_sha256"] == found["ptloc.2"]["input_sha256"] == found["cssl.2"]["sha256"]
    # The positive control: CSSL.1 from scratch with half its budget.
    assert found["cssl.1.x0.5"]["num_updates"] == 4 and found["cssl.1.x0.5"]["init_from"] is None


def test_the_alpha_rule_reads_round_one_validation_losses():
    """The largest ratio within the tolerance of its twin's loss at θ; the smallest if none is."""
    from eqssl.experiment.plan import choose_chain_ratio

    def seed(losses):  # ratio -> loss at theta on both shards; the twin at 5.0
        record = lambda loss: {"gap": {s: {"loss_before": loss} for s in ("a", "b")}}  # noqa: E731
        return {"ptloc.1.off": record(5.0), **{f"ptloc.1.r{r:g}": record(v) for r, v in losses.items()}}

    settings = {"ptloc": {"ratios": [10, 30, 100, 300]}, "chain": {"tolerance_bits": 0.1}}
    both = [seed({10: 5.0, 30: 5.02, 100: 5.05, 300: 5.4}), seed({10: 5.0, 30: 5.01, 100: 5.13, 300: 5.5})]
    choice = choose_chain_ratio(settings, both)
    assert choice["ratio"] == 100  # 100: +0.09 on average, within 0.1; 300 is not
    assert choice["loss_at_theta_minus_twin"]["100"] == pytest.approx(0.09)
    assert choose_chain_ratio(settings, [seed({10: 5.2, 30: 5.3, 100: 5.4, 300: 5.5})])["ratio"] == 10


def test_small_settings_follow_the_papers_proportions():
    """BEST-RQ small: PTLOC.r is 3/4 of its CSSL round at 0.05 x its peak lr (4/5 and 0.1
    multilingual), each alpha/beta ratio against one twin, CSSL.r as long as CSSL.1, three rounds
    with the twin chain on multidomain; --plan prints the table paper vs eqssl."""
    from eqssl.experiment.plan import learning_rates, load_settings, plan_pretraining

    settings = load_settings("small", "bestrq")
    runs = {r.name: r for r in plan_pretraining("multidomain", settings, 100.0)}
    cssl = runs["cssl.1"].schedule
    assert [n for n in runs if n.startswith("ptloc.1.r")] == ["ptloc.1.r10", "ptloc.1.r30", "ptloc.1.r100", "ptloc.1.r300"]
    for ratio in (10, 30, 100, 300):
        run_ = runs[f"ptloc.1.r{ratio}"]
        assert run_.schedule["max_update"] == 0.75 * cssl["max_update"] and run_.twin == "ptloc.1.off"
        assert run_.schedule["lr"] == pytest.approx(0.05 * cssl["lr"])
        assert f"++task.inner_lr={ratio * 0.05 * cssl['lr']:g}" in run_.overrides
    assert runs["ptloc.1.off"].schedule == {k: v for k, v in runs["ptloc.1.r10"].schedule.items() if k != "inner_lr"}
    assert runs["cssl.2"].schedule == cssl and runs["cssl.3"].init_from == "ptloc.2"
    assert runs["cssl.2"].init_from == "ptloc.1.r100" and runs["cssl.2.twin"].init_from == "ptloc.1.off"
    assert runs["ptloc.3"].against == {"constraint": "ptloc.3.off", "twin chain": "ptloc.3.twin",
                                       "vs CSSL.1": "cssl.1", "vs CSSL.r": "cssl.3"}
    assert runs["cssl.1"].against == {"pre-training": "none", "¼ budget": "cssl.1.x0.25", "½ budget": "cssl.1.x0.5"}
    rates = learning_rates(runs["ptloc.1.r10"].schedule)  # fairseq's tri_stage: constant, then decayed
    assert max(rates) == pytest.approx(1e-4) and rates[500] == pytest.approx(1e-4)
    assert rates[-1] == pytest.approx(1e-7, rel=0.05)
    multilingual = {r.name: r for r in plan_pretraining("multilingual", settings)}
    assert multilingual["ptloc.1.r10"].schedule["max_update"] == 1600 and "cssl.2" not in multilingual
    printed = run(["eqssl-reproduce", "--model", "bestrq", "--size", "small", "--preset", "multidomain", "--plan",
                   "--out", "/nonexistent", "--jobs", "2", "--reference-seconds", "0.087"])
    assert printed.returncode == 0, printed.stdout[-3000:]
    assert "| PTLOC.r length / CSSL.r length | 0.75 | 1500 / 2000 updates = 0.75 |" in printed.stdout
    assert "| Σ lr over PTLOC.r / over CSSL.r | 3.4 % | 5.2 % |" in printed.stdout


def test_validation_logs_the_gap_of_every_shard_in_every_run(experiment):
    out, _, _ = experiment
    for name in PRETRAINING:
        log = (out / "multilingual" / "seed1" / name / "train.log").read_text()
        valid = validations(log.splitlines())
        assert valid, name
        for shard in ("en", "fr", "nl"):
            assert f"gap_{shard}" in valid[-1] and f"loss_after_{shard}" in valid[-1], (name, valid[-1])


def test_the_logs_hold_no_notice_meant_for_fairseq(experiment):
    """The experiment's own output holds no torch.jit notice (fairseq's import) and no hydra
    notice; nor does any fairseq run it started, pre-training or fine-tuning."""
    out, _, printed = experiment
    notices = ("`torch.jit.script` is deprecated", "version_base parameter is not specified",
               "Usage of deprecated keyword in package header", "is validated against ConfigStore schema")
    logs = sorted((out / "multilingual" / "seed1").glob("**/train.log"))
    assert len(logs) > len(PRETRAINING)  # pre-training and fine-tuning runs
    for name, text in [("output", printed)] + [(str(log), log.read_text()) for log in logs]:
        for notice in notices:
            assert notice not in text, (name, notice)
    assert "fairseq_cli.train" in logs[0].read_text()  # fairseq's own log lines are still there


def test_every_run_writes_tensorboard_logs(experiment):
    """Each pre-training run's per-shard validation gaps, and each fine-tuning run's CER, land in
    a tensorboard/ folder inside its run folder."""
    out, _, _ = experiment
    seed = out / "multilingual" / "seed1"
    # fairseq names each event folder after its subset: pre-training validates on valid, fine-tuning on dev
    for folder, subset, tags in [*((seed / name, "valid", {f"gap_{s}" for s in ("en", "fr", "nl")})
                                   for name in PRETRAINING),
                                 (seed / "finetune" / "cssl.1" / SETS[0], "dev", {"uer"})]:
        scalars = tensorboard_scalars(folder / "tensorboard")
        assert tags <= set(scalars[subset]), (folder, sorted(scalars[subset]))


def test_rerun_skips_finished_stages_and_keeps_the_results(experiment):
    out, command, _ = experiment
    before = records(out)
    logs = {n: (out / "multilingual" / "seed1" / n / "train.log").stat().st_size for n in PRETRAINING}
    again = run(command)
    assert again.returncode == 0, again.stdout[-3000:]
    for name in PRETRAINING:
        assert f"{name}: done, skipped" in again.stdout
    assert records(out) == before
    assert logs == {n: (out / "multilingual" / "seed1" / n / "train.log").stat().st_size for n in PRETRAINING}
    # The earlier results stay; the rerun's table is a new file with the same numbers.
    first = json.loads((out / "results.json").read_text())["presets"]
    second = json.loads((out / "results.1.json").read_text())["presets"]
    assert first == second


def test_a_changed_checkpoint_redoes_it_and_what_depends_on_it(experiment):
    out, command, _ = experiment
    seed = out / "multilingual" / "seed1"
    before = records(out)
    checkpoint = seed / "cssl.2" / before["cssl.2"]["checkpoint"]
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # truncated
    again = run(command)
    assert again.returncode == 0, again.stdout[-3000:]
    assert (seed / "cssl.2.stale").is_dir()  # moved aside, not deleted
    after = records(out)
    redone = {name for name in after if after[name] != before[name]}
    assert redone == {"cssl.2", "ptloc.2", "ptloc.2.off", "ptloc.2/sv", "probe cssl.2/sv", "probe ptloc.2/sv",
                      "probe ptloc.2.off/sv", "phones cssl.2/sv", "phones ptloc.2/sv", "phones ptloc.2.off/sv"}
    for name in ("cssl.1", "ptloc.1.r10", "cssl.1+2x", "cssl.1-temp", "cssl.2.twin", "ptloc.2.twin"):
        assert f"{name}: done, skipped" in again.stdout
    # Same seed, same start: the redone runs repeat the first ones exactly.
    assert after["cssl.2"]["gap"] == before["cssl.2"]["gap"]


def reproduce_refuses(*arguments) -> str:
    """eqssl-reproduce's main on ``arguments`` (in this process): the message it exits with."""
    from eqssl.cli.reproduce import main

    with pytest.raises(SystemExit) as stop:
        main(list(map(str, arguments)))
    assert isinstance(stop.value.code, str), stop.value.code  # a message, printed with exit status 1
    return stop.value.code


def test_bad_settings_fail_before_any_work(tmp_path):
    settings = yaml.safe_load(open(REPO / "recipes" / "reproduce" / "tiny.yaml"))
    settings["finetune"]["sets"] = {"multilingual": ["klingon"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(settings))
    out = tmp_path / "out"
    message = reproduce_refuses("--preset", "multilingual", "--size", path, "--out", out)
    assert "finetune.sets.multilingual: unknown set(s) ['klingon']" in message
    assert str(path) in message
    assert not out.exists()
    assert "sizes: full, small, tiny" in reproduce_refuses("--size", "huge", "--out", out)
    settings = yaml.safe_load(open(REPO / "recipes" / "reproduce" / "tiny.yaml"))
    settings["cssl1"]["patience"] = 3
    path.write_text(yaml.safe_dump(settings))
    message = reproduce_refuses("--preset", "multilingual", "--size", path, "--out", out)
    assert f"{path}: cssl1.patience is no longer read" in message
    settings = yaml.safe_load(open(REPO / "recipes" / "reproduce" / "tiny.yaml"))
    settings["ptloc"]["lr"] = 0.0001  # the settings of a 200-update continuation
    path.write_text(yaml.safe_dump(settings))
    message = reproduce_refuses("--preset", "multilingual", "--size", path, "--out", out)
    assert f"{path}: ptloc.lr is no longer read: β is proportions" in message
    assert not out.exists()
    # and as a command: one line, exit status 1, no traceback
    command = run(["eqssl-reproduce", "--preset", "multilingual", "--size", path, "--out", out])
    assert command.returncode == 1 and command.stdout.strip().splitlines() == [message]


def test_compare_checkpoints_runs_the_same_measures_on_any_checkpoints(experiment, multilingual_corpus, tmp_path):
    out, _, _ = experiment
    seed = out / "multilingual" / "seed1"
    result = run(["python", REPO / "examples" / "compare_checkpoints.py", tmp_path,
                  "--checkpoints", f"A={seed / 'cssl.1' / 'checkpoint_last.pt'}",
                  f"B={seed / 'ptloc.1.r10' / 'checkpoint_last.pt'}",
                  "--sets", f"sv={multilingual_corpus / 'finetune' / 'sv'}", "--measures", "finetune", "probe",
                  "--control", "--probe-updates", "5", "--override", "optimization.max_update=4"])
    assert result.returncode == 0, result.stdout[-3000:]
    tables = json.loads((tmp_path / "comparison.json").read_text())["results"]
    assert list(tables["finetune"]) == ["no pre-training", "A", "B"]
    assert list(tables["probe"]) == ["FBANK", "no pre-training", "A", "B"]
    for table in tables.values():
        for row in table.values():
            assert math.isfinite(row["sv"]["wer"]) and math.isfinite(row["sv"]["cer"])
    assert (tmp_path / "finetune" / "B" / "sv" / "checkpoint_best.pt").exists()
    assert (tmp_path / "control" / "random_init.pt").exists()


GPU_RUNS = ["cssl.1", "ptloc.1.r10", "cssl.1+2x", "cssl.1-temp", "finetune"]


def gpu_size_run(name: str) -> tuple:
    """The fairseq-hydra-train command eqssl-reproduce gives one kind of the `full` experiment's
    runs, with --cfg job, and lines its config must hold."""
    from eqssl.experiment.stages import finetune_command, pretrain_command
    from eqssl.experiment.plan import load_settings, plan_pretraining

    settings = load_settings("full")
    if name == "finetune":
        command = finetune_command(settings["finetune"]["recipe"], "/data/sv", "/pretrained.pt", "/ft",
                                   settings["finetune"]["overrides"])
        expected = ["_name: audio_finetuning", "distributed_world_size: 1", "max_update: 13000"]
    else:
        run_ = {r.name: r for r in plan_pretraining("multilingual", settings)}[name]
        command = pretrain_command(run_, "/data", "/save", 1, None if name == "cssl.1" else "/init.pt")
        expected = ["_name: equilibrium_pretraining", "distributed_world_size: 1", "validation_gap_steps: 1",
                    "encoder_embed_dim: 768"]
        if name == "ptloc.1.r10":  # multilingual proportions: 0.8 x 40000 updates, beta = 0.1 x 5e-4
            expected += ["inner_steps: 1", "max_update: 32000", "_name: tri_stage", "inner_lr: 0.0005"]
        if name == "cssl.1+2x":
            expected += ["inner_steps: 0", "max_update: 64000", "_name: tri_stage", "decay_steps: 16000"]
        if name == "cssl.1-temp":
            expected += ["shard_sampling: temperature", "shards_per_update: 1"]
    return [*command, "--cfg", "job"], expected


@pytest.fixture(scope="module")
def gpu_size_composed(tmp_path_factory) -> dict:
    return compose_jobs({name: gpu_size_run(name)[0] for name in GPU_RUNS}, tmp_path_factory.mktemp("gpu"))


@pytest.mark.parametrize("name", GPU_RUNS)
def test_gpu_size_settings_compose(name, gpu_size_composed):
    """The `full` (BASE, GPU) experiment is not run here; each kind of its runs composes in
    fairseq-hydra-train with the overrides eqssl-reproduce gives it (--cfg job runs nothing;
    all in one process, conftest.compose_jobs)."""
    result = gpu_size_composed[name]
    assert result.returncode == 0, result.stdout[-3000:]
    for line in gpu_size_run(name)[1]:
        assert line in result.stdout, (line, result.stdout[-3000:])


def test_report_tabulates_finished_seeds_and_runs_nothing(experiment, tmp_path):
    out, command, _ = experiment
    command = command[:command.index("--records")]  # the run folder's report (--records: the records')
    report = run([*command, "--seeds", "2", "--report"])
    assert report.returncode == 0, report.stdout[-3000:]
    assert "[multilingual seed 2]: not finished, left out of the tables" in report.stdout
    assert "mean ± sd over 1 seed(s)" in report.stdout
    assert "] corpus:" not in report.stdout and "cssl.1: CSSL.1" not in report.stdout  # nothing ran
    assert not (out / "multilingual" / "seed2").exists()
    nothing = run([*command[:-2], "--out", tmp_path, "--report"])
    assert nothing.returncode != 0 and "no finished seed for multilingual" in nothing.stdout
    recorded = run([*command, "--seeds", "2", "--report", "--records", out / "records"])
    assert recorded.returncode == 0, recorded.stdout[-3000:]
    seed2 = out / "records" / "wav2vec2-settings" / "multilingual" / "seed2" / "cssl.1.json"
    assert f"[multilingual seed 2]: not finished in the records (no record {seed2}), left out" in recorded.stdout


SMALL_RUNS = ["cssl.1", "ptloc.1.r10", "cssl.1+2x", "cssl.1-temp", "cssl.2", "ptloc.3"]


def small_run(name: str):
    """One run of the `small` experiment's plan (three rounds on multidomain only)."""
    from eqssl.experiment.plan import load_settings, plan_pretraining

    preset = "multidomain" if name in ("cssl.2", "ptloc.3") else "multilingual"
    return {r.name: r for r in plan_pretraining(preset, load_settings("small"), 100.0)}[name]


@pytest.fixture(scope="module")
def small_composed(tmp_path_factory) -> dict:
    from eqssl.experiment.stages import pretrain_command

    jobs = {}
    for name in SMALL_RUNS:
        run_ = small_run(name)
        init = None if run_.init_from is None else "/init.pt"
        jobs[name] = [*pretrain_command(run_, "/data", "/save", 1, init), "--cfg", "job"]
    return compose_jobs(jobs, tmp_path_factory.mktemp("small"))


@pytest.mark.parametrize("name", SMALL_RUNS)
def test_small_settings_compose(name, small_composed):
    """The `small` experiment's runs compose with its recipes; every run continued from another
    keeps the Gumbel temperature at CSSL.1's floor instead of restarting its schedule."""
    result = small_composed[name]
    assert result.returncode == 0, result.stdout[-3000:]
    assert "max_tokens: 480000" in result.stdout and "feature_grad_mult: 1.0" in result.stdout
    temperature = [0.5, 0.5, 1.0] if small_run(name).init_from else [2.0, 0.5, 0.995]
    assert "latent_temp:\n" + "".join(f"  - {t}\n" for t in temperature) in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("size", ["small", "full"])
def test_bestrq_family_runs_compose(size, tmp_path):
    """--model bestrq runs the same plan with the BEST-RQ recipes (eq_bestrq, its criterion), and
    none of the wav2vec 2.0 overrides (Gumbel temperature) leak into it."""
    from eqssl.experiment.plan import load_settings, plan_pretraining
    from eqssl.experiment.stages import pretrain_command

    settings = load_settings(size, "bestrq")
    wav2vec2 = load_settings(size)
    # the family's fine-tuning fields, merged into the rest of the fine-tuning settings: the same
    # rows and sets (its budget may differ)
    assert settings["finetune"]["recipe"].startswith("ctc_bestrq_")
    for key in ("checkpoints", "sets", "preset_overrides"):
        assert settings["finetune"].get(key) == wav2vec2["finetune"].get(key), key
    plan = plan_pretraining("multidomain", settings)
    # every run of wav2vec 2.0's plan, in the same order
    assert [r.name for r in plan] == [r.name for r in plan_pretraining("multidomain", wav2vec2)]
    runs = (plan[0], next(r for r in plan if r.name == "ptloc.1.r10"))
    jobs = {}
    for run_ in runs:
        assert run_.recipe.startswith(("cssl_bestrq_", "ptloc_bestrq_"))
        assert not any("latent_temp" in o for o in run_.overrides)
        init = None if run_.init_from is None else "/init.pt"
        jobs[run_.name] = [*pretrain_command(run_, "/data", "/save", 1, init), "--cfg", "job"]
    for name, result in compose_jobs(jobs, tmp_path).items():
        assert result.returncode == 0, (name, result.stdout[-3000:])
        assert "_name: eq_bestrq" in result.stdout and "_name: equilibrium_bestrq" in result.stdout


def test_a_family_without_its_settings_section_is_refused(tmp_path):
    """A settings file written for wav2vec 2.0 only is not silently reused for BEST-RQ."""
    from eqssl.experiment.plan import ReproduceError, load_settings

    text = (REPO / "recipes/reproduce/small.yaml").read_text().split("\nfamilies:")[0]
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ReproduceError, match=r"mine.yaml: no families.bestrq section"):
        load_settings(str(path), "bestrq")


def test_paired_differences_and_rank_correlation_by_hand():
    from eqssl.experiment.statistics import minimum_detectable_difference, paired_difference, seeds_needed, spearman

    d = paired_difference([0.30, 0.32, 0.28], [0.31, 0.35, 0.30])  # deltas -0.01, -0.03, -0.02
    assert d["mean"] == pytest.approx(-0.02) and d["sd"] == pytest.approx(0.01)
    half = 4.302653 * 0.01 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert (d["low"], d["high"]) == (pytest.approx(-0.02 - half), pytest.approx(-0.02 + half))
    assert math.isnan(paired_difference([0.3], [0.2])["low"])
    # 80 % power at 5 %, two-sided: (t(0.975) + t(0.80)) standard errors, Student's t quantiles
    # (4.302653 + 1.060660 at 2 degrees of freedom, 2.776445 + 0.940965 at 4)
    assert minimum_detectable_difference(0.01, 3, paired=True) == pytest.approx(5.363313 * 0.01 / math.sqrt(3))
    assert minimum_detectable_difference(0.01, 3) == pytest.approx(3.717410 * 0.01 * math.sqrt(2 / 3))
    assert math.isnan(minimum_detectable_difference(0.01, 1))
    needed = seeds_needed(0.01, 0.02, paired=True)
    assert minimum_detectable_difference(0.01, needed, paired=True) <= 0.02
    assert minimum_detectable_difference(0.01, needed - 1, paired=True) > 0.02
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(0.8660254)  # ties share their mean rank
    assert math.isnan(spearman([1, 2], [2, 1]))


def test_two_seeds_give_paired_differences_and_their_detectable_size(experiment):
    """aggregate on the finished seed and a copy of it with known shifts: the paired spread of
    PTLOC.1 at the smallest α/β against its twin and its pass-matched CSSL sets the MDD; larger
    steps keep their own spread."""
    import copy

    from eqssl.experiment.stages import Chain, collect_chain
    from eqssl.experiment.report import _difference_cell, aggregate, markdown
    from eqssl.experiment.plan import load_settings, resolve_presets
    from eqssl.experiment.statistics import minimum_detectable_difference

    out, _, _ = experiment
    settings = load_settings(str(out / "settings.yaml"))
    settings["preset_files"] = resolve_presets(["multilingual"], settings)
    first = collect_chain(Chain("multilingual", 1, str(out), settings, 1))
    second = copy.deepcopy(first)
    second["ptloc.1.r10"]["probe"]["sv"]["cer"] += 0.02
    second["ptloc.1.off"]["probe"]["sv"]["cer"] += 0.04  # also the twin of the r100 run
    second["cssl.1+2x"]["probe"]["sv"]["cer"] += 0.04
    result = aggregate("multilingual", settings, {1: first, 2: second})
    pairs = {(c["a"], c["b"]): c["cer"]["sv"] for c in result["comparisons"]["probe"]}
    delta = first["ptloc.1.r10"]["probe"]["sv"]["cer"] - first["ptloc.1.off"]["probe"]["sv"]["cer"]
    assert pairs[("ptloc.1.r10", "ptloc.1.off")]["mean"] == pytest.approx(delta - 0.01)
    assert pairs[("ptloc.1.r10", "ptloc.1.off")]["sd"] == pytest.approx(0.02 / math.sqrt(2))
    assert pairs[("ptloc.1.r10", "cssl.1+2x")]["sd"] == pytest.approx(0.02 / math.sqrt(2))
    assert pairs[("ptloc.1.r100", "ptloc.1.off")]["sd"] == pytest.approx(0.04 / math.sqrt(2))
    assert pairs[("cssl.1", "none")]["sd"] == pytest.approx(0.0)
    pooled = 0.02 / math.sqrt(2)  # the r100 pairs, twice as spread here, stay out of the pool
    found = result["detectable"]["probe"]["sv"]["cer"]
    assert found["paired_sd"] == pytest.approx(pooled)
    assert found["paired_mdd"] == pytest.approx(minimum_detectable_difference(pooled, 2, paired=True))
    # The positive control did not move (CSSL.1 − ½ budget is the same in both seeds, well within
    # the MDD): the probe is insensitive on sv, and no PTLOC comparison there is starred.
    assert found["sensitivity"] == "insensitive"
    between = {"mean": -1.5 * found["paired_mdd"], "sd": 2 * pooled, "low": -1.0, "high": 1.0, "seeds": 2}
    cell = _difference_cell(result, "probe", {"a": "ptloc.1.r10", "b": "ptloc.1.off", "kind": "constraint",
                                              "cer": {"sv": between}}, "sv", relative=False)
    assert cell == f"{100 * between['mean']:+.1f} [-100.0, +100.0] (insensitive)"
    table = markdown("multilingual", result)
    assert "| frozen-upstream probe: sensitive? (CSSL.1 beats ½ budget beyond the paired MDD) | insensitive |" in table
    # Make the ½-budget run clearly worse in both seeds: now the probe is sensitive on sv, and a
    # PTLOC difference between the pooled paired MDD and twice it is starred against its twin, but
    # not for the r100 run, whose pair is judged by its own (here twice as large) spread.
    worse = 10 * found["paired_mdd"]
    for results in (first, second):
        results["cssl.1.x0.5"]["probe"]["sv"]["cer"] = results["cssl.1"]["probe"]["sv"]["cer"] + worse
    result = aggregate("multilingual", settings, {1: first, 2: second})
    found = result["detectable"]["probe"]["sv"]["cer"]
    assert found["positive_control"]["mean"] == pytest.approx(-worse) and found["sensitivity"] == "sensitive"
    for a, star in (("ptloc.1.r10", "*"), ("ptloc.1.r100", "")):
        cell = _difference_cell(result, "probe", {"a": a, "b": "ptloc.1.off", "kind": "constraint",
                                                  "cer": {"sv": between}}, "sv", relative=False)
        assert cell.startswith(f"{100 * between['mean']:+.1f}{star} [") and "insensitive" not in cell, (a, cell)
    table = markdown("multilingual", result)
    assert "| … paired (PTLOC.1 − twin and − pass-matched) | " in table and "mean ± sd over 2 seed(s)" in table
    summary = table[:table.index("did pre-training learn?")]
    assert summary.startswith("### multilingual: summary, differences a − b in points of each measure's error rate")
    assert "paired over 2 seed(s)" in summary.splitlines()[0]
    assert f"| frozen-upstream probe: PTLOC.1 K=1 α/β=10 − twin | {100 * (delta - 0.01):+.1f}" in summary
    assert "| frozen-upstream probe: sensitive? (CSSL.1 beats ½ budget beyond the paired MDD) | sensitive |" in summary
    assert f"| frozen-upstream probe: paired MDD (PTLOC.1 − twin and − pass-matched, smallest α/β) | {100 * found['paired_mdd']:.1f} (" in summary
    assert "| full fine-tuning: CSSL.1 − random init |" in summary


def test_controls_only_plans_the_positive_control_and_judges_it_by_its_own_spread(experiment):
    """--controls-only: CSSL.1 and its budget fractions alone, no fine-tuning; with no PTLOC pair,
    a measure's paired MDD comes from the positive control's own pair (two seeds, constructed
    shifts on the finished seed's ABX records)."""
    import copy

    from eqssl.experiment.plan import load_settings, plan_pretraining, resolve_presets
    from eqssl.experiment.report import aggregate, markdown
    from eqssl.experiment.stages import Chain, collect_chain, finetuned
    from eqssl.experiment.statistics import minimum_detectable_difference

    out, _, _ = experiment
    settings = load_settings(str(out / "settings.yaml"))
    settings["preset_files"] = resolve_presets(["multilingual"], settings)
    full = collect_chain(Chain("multilingual", 1, str(out), settings, 1))
    settings.update(controls_only=True, rounds=1, rounds_by_preset={}, probe=None)
    assert [r.name for r in plan_pretraining("multilingual", settings)] == ["cssl.1", "cssl.1.x0.5"]
    assert finetuned({"cssl.1": {}, "none": {}}, settings) == {}
    first = {n: full[n] for n in ("fbank", "cssl.1", "none", "cssl.1.x0.5")}
    second = copy.deepcopy(first)
    for name, shift in (("cssl.1", 0.0), ("cssl.1.x0.5", 0.02)):
        second[name]["abx_across"]["sv"]["error"] = first["cssl.1"]["abx_across"]["sv"]["error"] + 0.05 + shift
    for name, shift in (("cssl.1", 0.0), ("cssl.1.x0.5", 0.03)):
        first[name]["abx_across"]["sv"]["error"] = first["cssl.1"]["abx_across"]["sv"]["error"] + shift
    result = aggregate("multilingual", settings, {1: first, 2: second})
    found = result["detectable"]["abx_across"]["sv"]["error"]
    assert found["positive_control"]["mean"] == pytest.approx(-0.025)  # CSSL.1 − ½ budget: −0.03, −0.02
    assert found["paired_mdd"] == pytest.approx(minimum_detectable_difference(found["positive_control"]["sd"], 2,
                                                                              paired=True))
    assert found["paired_mdd_from"] == "the positive control's own pair"
    table = markdown("multilingual", result)
    assert "| ABX across speakers: paired MDD (the positive control's own pair) |" in table
    assert "| ABX across speakers: CSSL.1 − ½ budget |" in table


def test_seeds_can_be_named(experiment, tmp_path):
    """--seed names the seeds (a cell of the experiment): the report of seed 1 named is the report
    of --seeds 1; a seed with no finished stage is left out, and alone it is refused."""
    out, command, _ = experiment
    report = [*command[:command.index("--out")], "--out", out, "--report"]
    by_count = run([*report, "--seeds", "1"])
    by_name = run([*report, "--seed", "1"])
    assert by_count.returncode == by_name.returncode == 0, by_name.stdout[-2000:]
    assert json.loads((out / "results.json").read_text())  # the run's own results stay
    tables = sorted(out.glob("results.*.md"), key=lambda p: p.stat().st_mtime)[-2:]
    assert tables[0].read_text() == tables[1].read_text()
    more = run([*report, "--seed", "1", "7"])
    assert more.returncode == 0 and "[multilingual seed 7]: not finished, left out of the tables" in more.stdout
    alone = run([*report, "--seed", "7"])
    assert alone.returncode != 0 and "no finished seed for multilingual" in alone.stdout
    bad = run([*report, "--seed", "1", "1"])
    assert bad.returncode != 0 and "distinct seeds >= 1" in bad.stdout


def test_a_difference_from_an_error_of_zero_has_no_relative_change():
    """ABX on the tiny corpus's few phone pairs can be exactly 0 %: the cell gives the difference alone."""
    from eqssl.experiment.report import _difference_cell

    cell = lambda mean: {"sv": {"error": {"mean": mean}}}  # noqa: E731
    result = {"checkpoints": {"cssl.1": {"abx_across": cell(0.0)}, "none": {"abx_across": cell(0.0)}},
              "detectable": {"abx_across": {"sv": {"error": {"mdd": math.nan, "sensitivity": "undetermined"}}}}}
    pair = {"a": "cssl.1", "b": "none", "kind": "pre-training", "error": {"sv": {
        "mean": 0.0, "sd": math.nan, "low": math.nan, "high": math.nan, "seeds": 1}}}
    assert _difference_cell(result, "abx_across", pair, "sv") == "+0.0"


def test_the_ctc_probe_runs_on_the_checkpoints_named():
    from eqssl.experiment.stages import ctc_probed

    settings = {"probe": {"fbank": True, "checkpoints": ["cssl.1", "none"]}}
    assert [n for n in ("fbank", "cssl.1", "none", "ptloc.1.r10") if ctc_probed(n, settings)] == ["fbank", "cssl.1", "none"]
    settings["probe"] = {"fbank": False}  # no list: every checkpoint
    assert [n for n in ("fbank", "cssl.1", "ptloc.1.r10") if ctc_probed(n, settings)] == ["cssl.1", "ptloc.1.r10"]
    assert not any(ctc_probed(n, {"probe": None}) for n in ("fbank", "cssl.1"))


def test_the_floors_line_on_constructed_numbers():
    """Where CSSL.1's CER beats both floors (FBANK and random weights) the line says so; where it
    misses one, it names the set with the numbers; a measure without FBANK (fine-tuning) names
    random init alone."""
    from eqssl.experiment.plan import CONTROL_LABEL, FBANK_LABEL
    from eqssl.experiment.report import floors_line

    def row(label, probe, finetune=None):
        cells = lambda cers: {s: {"cer": {"mean": c}} for s, c in cers.items()}  # noqa: E731
        return {"label": label, "probe": cells(probe), "finetune": cells(finetune or {})}

    result = {"sets": {"read": True, "meeting": False}, "seeds": [1], "checkpoints": {
        "cssl.1": row("CSSL.1", {"read": 0.60, "meeting": 0.80}, {"read": 0.30, "meeting": 0.50}),
        "none": row(CONTROL_LABEL, {"read": 0.75, "meeting": 0.85}, {"read": 0.35, "meeting": 0.45}),
        "fbank": row(FBANK_LABEL, {"read": 0.70, "meeting": 0.78})}}
    line = floors_line(result, "probe")
    assert line.startswith("Against the floors (frozen-upstream probe, CER %): CSSL.1 beats random init and FBANK on read "
                           "(60.0 against random init 75.0, FBANK 70.0); not on meeting (80.0 against "
                           "random init 85.0, FBANK 78.0): with one seed"), line
    line = floors_line(result, "finetune")
    assert line.startswith("Against the floors (full fine-tuning, CER %): CSSL.1 beats random init on read (30.0 against "
                           "random init 35.0); not on meeting"), line
    result["seeds"] = [1, 2]
    assert "beyond the seeds' spread" in floors_line(result, "probe")


def test_the_sensitivity_verdict_on_constructed_numbers():
    """Sensitive only where CSSL.1 beats its ½-budget run (lower CER) by more than the paired MDD."""
    from eqssl.experiment.report import sensitivity

    assert sensitivity({"mean": -0.05}, 0.02) == "sensitive"
    assert sensitivity({"mean": -0.01}, 0.02) == "insensitive"  # better, but within the MDD
    assert sensitivity({"mean": +0.05}, 0.02) == "insensitive"  # the known better model scored worse
    assert sensitivity({"mean": -0.05}, math.nan) == "undetermined"  # one seed: no spread
    assert sensitivity(None, 0.02) == "undetermined"  # no positive control


def test_a_diverging_run_is_named_with_its_update(tmp_path):
    """Inner steps that raise the loss on most shards for three training lines in a row, or a
    validation loss far above the start's, give one warning each, naming the run and the update."""
    from eqssl.experiment.stages import divergence_warnings

    def train(update, before, after):
        shards = ", ".join(f"loss_before_{s}={b}, loss_after_{s}={a}" for s, b, a in zip("xyz", before, after))
        return f"[2026-12-02 10:00:00][train_inner][INFO] - epoch 001: 10 / 99 loss=1, {shards}, num_updates={update}\n"

    def valid(update, loss):
        return f"[2026-12-02 10:00:00][valid][INFO] - epoch 001 | valid on 'valid' subset | loss {loss} | num_updates {update}\n"

    log = tmp_path / "train.log"
    healthy = [train(10 * i, (5, 5, 5), (4.9, 4.9, 5.1)) for i in range(1, 6)] + [valid(50, 5.2)]
    log.write_text("".join(healthy))
    assert divergence_warnings(str(log), "[p seed 1] ptloc.1.r300", start_loss=5.0) == []
    diverging = [train(10 * i, (5, 5, 5), (5.2, 5.3, 4.9)) for i in range(1, 4)] + [valid(30, 5.7)]
    log.write_text("".join(healthy + diverging))
    warnings = divergence_warnings(str(log), "[p seed 1] ptloc.1.r300", start_loss=5.0)
    assert len(warnings) == 2
    assert warnings[0].startswith("[p seed 1] ptloc.1.r300: the inner step raised the loss on most shards (x, y)")
    assert "up to update 30" in warnings[0]
    assert warnings[1] == ("[p seed 1] ptloc.1.r300: validation loss 5.700 at update 30 is 0.70 bits above its "
                           "start's (5.000)")


def test_stages_wait_for_theirs_and_the_longest_ready_starts_first():
    """run_stages on two lanes: two independent stages run at once (each waits for the other at
    a barrier), a stage starts only after those it waits for, the ready stage with the most work
    ahead (its own and its longest string of waiting stages) takes a free lane first, and an
    error is raised once the stage running beside it has finished."""
    import threading

    from eqssl.experiment.stages import Stage, run_stages

    lock, started, ended = threading.Lock(), [], []
    together = threading.Barrier(2, timeout=30)

    def stage(name: str, after=(), work=1.0, meet=False, check=None, fail=False) -> Stage:
        def body() -> None:
            with lock:
                started.append(name)
            if check:
                check()
            if meet:
                together.wait()
            if fail:
                raise ValueError(name)
            with lock:
                ended.append(name)
        return Stage(name, body, tuple(after), work)

    def both_long_ones_started() -> None:
        assert {"long", "heads"} <= set(started), started

    # "heads" is short itself but heads the longest string (heads, then after_it): it goes first
    run_stages([stage("short", work=3, check=both_long_ones_started), stage("long", work=5, meet=True),
                stage("heads", work=1, meet=True), stage("after_it", after=["heads"], work=9),
                stage("last", after=["short", "long"])], lanes=2)
    assert set(ended) == {"short", "long", "heads", "after_it", "last"}
    assert started.index("last") > max(ended.index("short"), ended.index("long"))
    assert started.index("after_it") > ended.index("heads")

    started.clear(), ended.clear()
    together.reset()
    with pytest.raises(ValueError, match="broken"):
        run_stages([stage("broken", work=5, meet=True, fail=True), stage("running", work=3, meet=True),
                    stage("never", after=["broken"])], lanes=2)
    assert sorted(started) == ["broken", "running"] and ended == ["running"]

    started.clear(), ended.clear()
    run_stages([stage("b"), stage("a", work=9), stage("c", after=["a"])], lanes=1)  # one lane: list order
    assert started == ["b", "a", "c"]
