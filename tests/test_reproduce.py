"""eqssl-reproduce's plumbing on the tiny multilingual corpus with a few updates per run: every
stage runs and leaves a verifiable record, reruns skip finished stages, a changed checkpoint
redoes exactly what depends on it, the results file has every cell, and the compute-matched
baseline really makes as many passes as the PTLOC run. Which method wins is not asserted."""

import json
import math

import pytest
import yaml

from conftest import REPO, run, tensorboard_scalars

from eqssl.models.eq_wav2vec2 import load_pretraining_checkpoint
from eqssl.experiment.fairseq_log import validations

PRETRAINING = ["cssl.1", "ptloc.1.k1", "cssl.1+2x", "ptloc.1.k1.r100", "cssl.1-temp", "cssl.2", "ptloc.2"]
ROWS = ["fbank", "cssl.1", "none", "ptloc.1.k1", "cssl.1+2x", "ptloc.1.k1.r100", "cssl.1-temp", "cssl.2", "ptloc.2"]
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
    settings.update(rounds=2, inner_steps=[1], validate_interval_updates=4)
    settings["cssl1"].update(max_update=8, validate_interval_updates=4)
    settings["ptloc"].update(max_update=3, warmup_updates=1)
    settings["cssl_round"]["max_update"] = 3
    settings["gap"]["batches"] = 2
    settings["finetune"].update(max_update=4, sets={"multilingual": SETS})
    settings["probe"].update(updates=5, batch_size=4)
    settings["step_size_sweep"] = {"ratios": [100], "presets": ["multilingual"]}
    path = out / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    command = ["eqssl-reproduce", "--preset", "multilingual", "--size", path, "--out", out]
    first = run(command)
    assert first.returncode == 0, first.stdout[-3000:]
    return out, command, first.stdout


def records(out):
    seed = out / "multilingual" / "seed1"
    found = {name: json.loads((seed / name / "eqssl_stage.json").read_text()) for name in PRETRAINING + ["none"]}
    for name in PRETRAINING + ["none"]:
        for s in SETS:
            found[f"{name}/{s}"] = json.loads((seed / "finetune" / name / s / "eqssl_stage.json").read_text())
    for name in ROWS:
        for s in SETS:
            found[f"probe {name}/{s}"] = json.loads((seed / "probe" / name / s / "eqssl_stage.json").read_text())
    return found


def test_results_file_has_every_cell(experiment):
    out, _, stdout = experiment
    summary = json.loads((out / "results.json").read_text())
    result = summary["presets"]["multilingual"]
    assert list(result["checkpoints"]) == ROWS
    assert result["sets"] == {"sv": False}  # unseen in pre-training
    for name, row in result["checkpoints"].items():
        measures = ["probe"] if name == "fbank" else ["probe", "finetune"]
        for measure in measures:
            for s in SETS:
                for metric in ("wer", "cer"):
                    cell = row[measure][s][metric]
                    assert math.isfinite(cell["mean"]) and cell["seeds"] == 1, (name, measure, s, metric)
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
    # One seed: no spread, so no minimum detectable difference, and the tables say so.
    assert math.isnan(result["detectable"]["probe"]["sv"]["cer"]["mdd"])
    assert "| minimum detectable CER difference | n/a (one seed) |" in table
    assert "| CSSL.1 − No pre-training (random init) |" in table
    assert "| PTLOC.1 K=1 − CSSL.1 +2x updates (matched to PTLOC.1 K=1) |" in table
    assert "| PTLOC.1 K=1 α/β=100 − CSSL.1 +2x updates (matched to PTLOC.1 K=1) |" in table
    assert "| the paper's multilingual gains (0.8–3.4 % rel.) on CSSL.1's CER |" in table
    # The gap of each PTLOC run against its matched CSSL, paired by seed, from the stage records.
    found = records(out)
    gaps = {d["a"]: d for d in result["gap_differences"]}
    assert sorted(gaps) == ["ptloc.1.k1", "ptloc.1.k1.r100"]
    for shard in ("en", "fr", "nl"):
        expected = found["ptloc.1.k1"]["gap"][shard]["gap"] - found["cssl.1+2x"]["gap"][shard]["gap"]
        assert gaps["ptloc.1.k1"]["gap"][shard]["mean"] == pytest.approx(expected)
    assert "PTLOC minus its compute-matched CSSL (bits" in table
    assert "Gap against frozen-upstream probe CER: Spearman ρ = " in table
    # The sweep: alpha/beta 10 (the paper's) and 100, each against the same matched CSSL.
    assert [(e["name"], e["ratio"], e["against"]) for e in result["step_size"]] == [
        ("ptloc.1.k1", 10.0, "cssl.1+2x"), ("ptloc.1.k1.r100", 100.0, "cssl.1+2x")]
    probe_delta = found["probe ptloc.1.k1.r100/sv"]["cer"] - found["probe cssl.1+2x/sv"]["cer"]
    assert result["step_size"][1]["probe"]["cer_difference"] == pytest.approx(probe_delta)
    assert "| 100 | 0.01 |" in table
    seconds = result["seconds"]
    assert seconds["pretraining"] == pytest.approx(sum(found[n]["seconds"] for n in PRETRAINING + ["none"]))
    assert "Compute of multilingual (1 seed(s))" in table


def test_compute_matched_baseline_makes_as_many_passes_as_ptloc(experiment):
    out, _, _ = experiment
    seed = out / "multilingual" / "seed1"
    ptloc = load_pretraining_checkpoint(str(seed / "ptloc.1.k1" / "checkpoint_last.pt"))
    cssl = load_pretraining_checkpoint(str(seed / "cssl.1+2x" / "checkpoint_last.pt"))
    k = ptloc["cfg"]["task"]["inner_steps"]
    assert (k, cssl["cfg"]["task"]["inner_steps"]) == (1, 0)
    for state in (ptloc, cssl):
        assert state["cfg"]["task"]["shard_sampling"] == "all"  # every shard in every update
        assert list(state["cfg"]["optimization"]["lr"]) == [0.0001]
    ptloc_updates = ptloc["optimizer_history"][-1]["num_updates"]
    cssl_updates = cssl["optimizer_history"][-1]["num_updates"]
    assert ptloc_updates == 3
    assert cssl_updates == (k + 1) * ptloc_updates
    found = records(out)
    assert found["cssl.1+2x"]["passes"] == found["ptloc.1.k1"]["passes"] == 3 * 3 * 2
    # Both continue from CSSL.1's result, and the temperature baseline draws one language per update.
    assert found["cssl.1+2x"]["input_sha256"] == found["ptloc.1.k1"]["input_sha256"] == found["cssl.1"]["sha256"]
    assert found["cssl.1-temp"]["passes"] == found["cssl.1-temp"]["num_updates"]
    # The step-size sweep: the same passes from the same start, only alpha differs (alpha/beta = 100).
    swept = load_pretraining_checkpoint(str(seed / "ptloc.1.k1.r100" / "checkpoint_last.pt"))
    assert swept["cfg"]["task"]["inner_lr"] == pytest.approx(100 * 0.0001)
    assert ptloc["cfg"]["task"]["inner_lr"] == pytest.approx(10 * 0.0001)
    assert found["ptloc.1.k1.r100"]["passes"] == found["ptloc.1.k1"]["passes"]
    assert found["ptloc.1.k1.r100"]["input_sha256"] == found["cssl.1"]["sha256"]
    assert found["ptloc.1.k1.r100"]["compared_with"] == "cssl.1+2x"


def test_the_step_size_sweep_runs_on_the_presets_it_names():
    from eqssl.experiment.plan import load_settings, plan_pretraining

    settings = load_settings(str(REPO / "recipes" / "reproduce" / "small.yaml"))
    settings["step_size_sweep"] = {"ratios": [100, 1000], "presets": ["multidomain"]}
    runs = {run.name: run for run in plan_pretraining("multidomain", settings)}
    assert [n for n in runs if ".r" in n] == ["ptloc.1.k1.r100", "ptloc.1.k1.r1000"]
    assert "++task.inner_lr=0.1" in runs["ptloc.1.k1.r1000"].overrides
    assert runs["ptloc.1.k1.r1000"].compared_with == "cssl.1+2x"
    assert not [r for r in plan_pretraining("multilingual", settings) if ".r" in r.name]


def test_validation_logs_the_gap_of_every_shard_in_every_run(experiment):
    out, _, _ = experiment
    for name in PRETRAINING:
        log = (out / "multilingual" / "seed1" / name / "train.log").read_text()
        valid = validations(log.splitlines())
        assert valid, name
        for shard in ("en", "fr", "nl"):
            assert f"gap_{shard}" in valid[-1] and f"loss_after_{shard}" in valid[-1], (name, valid[-1])


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
    assert redone == {"cssl.2", "ptloc.2", "cssl.2/sv", "ptloc.2/sv", "probe cssl.2/sv", "probe ptloc.2/sv"}
    for name in ("cssl.1", "ptloc.1.k1", "cssl.1+2x", "cssl.1-temp"):
        assert f"{name}: done, skipped" in again.stdout
    # Same seed, same start: the redone runs repeat the first ones exactly.
    assert after["cssl.2"]["gap"] == before["cssl.2"]["gap"]


def test_bad_settings_fail_before_any_work(tmp_path):
    settings = yaml.safe_load(open(REPO / "recipes" / "reproduce" / "tiny.yaml"))
    settings["finetune"]["sets"] = {"multilingual": ["klingon"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(settings))
    result = run(["eqssl-reproduce", "--preset", "multilingual", "--size", path, "--out", tmp_path / "out"])
    assert result.returncode != 0
    assert "finetune.sets.multilingual: unknown set(s) ['klingon']" in result.stdout
    assert str(path) in result.stdout
    assert not (tmp_path / "out").exists()
    missing = run(["eqssl-reproduce", "--size", "huge", "--out", tmp_path / "out"])
    assert missing.returncode != 0 and "sizes: full, small, tiny" in missing.stdout
    settings = yaml.safe_load(open(REPO / "recipes" / "reproduce" / "tiny.yaml"))
    settings["cssl1"]["patience"] = 3
    path.write_text(yaml.safe_dump(settings))
    old = run(["eqssl-reproduce", "--preset", "multilingual", "--size", path, "--out", tmp_path / "out"])
    assert old.returncode != 0 and f"{path}: cssl1.patience is no longer read" in old.stdout
    assert not (tmp_path / "out").exists()


def test_compare_checkpoints_runs_the_same_measures_on_any_checkpoints(experiment, multilingual_corpus, tmp_path):
    out, _, _ = experiment
    seed = out / "multilingual" / "seed1"
    result = run(["python", REPO / "examples" / "compare_checkpoints.py", tmp_path,
                  "--checkpoints", f"A={seed / 'cssl.1' / 'checkpoint_last.pt'}",
                  f"B={seed / 'ptloc.1.k1' / 'checkpoint_last.pt'}",
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


@pytest.mark.parametrize("name", ["cssl.1", "ptloc.1.k3", "cssl.1+4x", "cssl.1-temp", "cssl.3", "finetune"])
def test_gpu_size_settings_compose(name):
    """The `full` (BASE, GPU) experiment is not run here; each kind of its runs composes in
    fairseq-hydra-train with the overrides eqssl-reproduce gives it (--cfg job runs nothing)."""
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
        if name == "ptloc.1.k3":
            expected += ["inner_steps: 3", "max_update: 10000"]
        if name == "cssl.1+4x":
            expected += ["inner_steps: 0", "max_update: 40000", "warmup_updates: 8000"]
        if name == "cssl.1-temp":
            expected += ["shard_sampling: temperature", "shards_per_update: 1"]
    result = run([*command, "--cfg", "job"])
    assert result.returncode == 0, result.stdout[-3000:]
    for line in expected:
        assert line in result.stdout, (line, result.stdout[-3000:])


def test_report_tabulates_finished_seeds_and_runs_nothing(experiment, tmp_path):
    out, command, _ = experiment
    report = run([*command, "--seeds", "2", "--report"])
    assert report.returncode == 0, report.stdout[-3000:]
    assert "[multilingual seed 2]: not finished, left out of the tables" in report.stdout
    assert "mean ± sd over 1 seed(s)" in report.stdout
    assert "] corpus:" not in report.stdout and "cssl.1: CSSL.1" not in report.stdout  # nothing ran
    assert not (out / "multilingual" / "seed2").exists()
    nothing = run([*command[:-2], "--out", tmp_path, "--report"])
    assert nothing.returncode != 0 and "no finished seed for multilingual" in nothing.stdout


@pytest.mark.parametrize("name", ["cssl.1", "ptloc.1.k1", "cssl.1+2x", "cssl.1-temp", "cssl.2"])
def test_small_settings_compose(name):
    """The `small` experiment's runs compose with its recipes; every run continued from another
    keeps the Gumbel temperature at CSSL.1's floor instead of restarting its schedule."""
    from eqssl.experiment.plan import load_settings, plan_pretraining
    from eqssl.experiment.stages import pretrain_command

    settings = load_settings("small")
    run_ = {r.name: r for r in plan_pretraining("multilingual", settings)}[name]
    command = pretrain_command(run_, "/data", "/save", 1, None if run_.init_from is None else "/init.pt")
    result = run([*command, "--cfg", "job"])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "max_tokens: 480000" in result.stdout and "feature_grad_mult: 1.0" in result.stdout
    temperature = [0.5, 0.5, 1.0] if run_.init_from else [2.0, 0.5, 0.995]
    assert "latent_temp:\n" + "".join(f"  - {t}\n" for t in temperature) in result.stdout, result.stdout[-3000:]


@pytest.mark.parametrize("size", ["small", "full"])
def test_bestrq_family_runs_compose(size):
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
    # every run of wav2vec 2.0's plan, in the same order (the family may add the step-size sweep)
    names = [r.name for r in plan if ".r" not in r.name]
    assert names == [r.name for r in plan_pretraining("multidomain", wav2vec2)]
    for run_ in (plan[0], next(r for r in plan if r.name == "ptloc.1.k1")):
        assert run_.recipe.startswith(("cssl_bestrq_", "ptloc_bestrq_"))
        assert not any("latent_temp" in o for o in run_.overrides)
        command = pretrain_command(run_, "/data", "/save", 1, None if run_.init_from is None else "/init.pt")
        result = run([*command, "--cfg", "job"])
        assert result.returncode == 0, result.stdout[-3000:]
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
    """aggregate on the finished seed and a copy of it with known shifts: the paired spread, not
    each row's, sets the minimum detectable difference of PTLOC against its matched CSSL."""
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
    second["ptloc.1.k1"]["probe"]["sv"]["cer"] += 0.02
    second["cssl.1+2x"]["probe"]["sv"]["cer"] += 0.04  # also the matched CSSL of the r100 run
    result = aggregate("multilingual", settings, {1: first, 2: second})
    pairs = {(c["a"], c["b"]): c["cer"]["sv"] for c in result["comparisons"]["probe"]}
    delta = first["ptloc.1.k1"]["probe"]["sv"]["cer"] - first["cssl.1+2x"]["probe"]["sv"]["cer"]
    assert pairs[("ptloc.1.k1", "cssl.1+2x")]["mean"] == pytest.approx(delta - 0.01)
    assert pairs[("ptloc.1.k1", "cssl.1+2x")]["sd"] == pytest.approx(0.02 / math.sqrt(2))
    assert pairs[("ptloc.1.k1.r100", "cssl.1+2x")]["sd"] == pytest.approx(0.04 / math.sqrt(2))
    assert pairs[("cssl.1", "none")]["sd"] == pytest.approx(0.0)
    # Only PTLOC against its matched CSSL sets the paired spread: the step-size sweep's r100 pair,
    # whose spread is twice as large here, stays out of the pool.
    pooled = 0.02 / math.sqrt(2)
    found = result["detectable"]["probe"]["sv"]["cer"]
    assert found["paired_sd"] == pytest.approx(pooled)
    assert found["paired_mdd"] == pytest.approx(minimum_detectable_difference(pooled, 2, paired=True))
    # A difference between the pooled paired MDD and twice it: starred against a matched CSSL,
    # not in the step-size sweep, whose pair is judged by its own (here twice as large) spread.
    between = {"mean": -1.5 * found["paired_mdd"], "sd": 2 * pooled, "low": -1.0, "high": 1.0, "seeds": 2}
    for a, star in (("ptloc.1.k1", "*"), ("ptloc.1.k1.r100", "")):
        cell = _difference_cell(result, "probe", {"a": a, "b": "cssl.1+2x", "cer": {"sv": between}}, "sv",
                                relative=False)
        assert cell.startswith(f"{100 * between['mean']:+.1f}{star} ["), (a, cell)
    table = markdown("multilingual", result)
    assert "| … paired, PTLOC − matched CSSL | " in table and "mean ± sd over 2 seed(s)" in table
    assert f"{100 * (delta - 0.01):+.1f}" in table
    # The summary leads with the answer: PTLOC against its matched CSSL beside the paired MDD,
    # without the step-size sweep's rows.
    summary = table[:table.index("did pre-training learn?")]
    assert summary.startswith("### multilingual: summary, CER differences a − b in points (paired over 2 seed(s)")
    assert f"| frozen-upstream probe: PTLOC.1 K=1 − matched CSSL | {100 * (delta - 0.01):+.1f}" in summary
    assert f"| frozen-upstream probe: paired MDD, PTLOC − matched CSSL | {100 * found['paired_mdd']:.1f} (" in summary
    assert "| full fine-tuning: CSSL.1 − random init |" in summary and "α/β=100" not in summary
