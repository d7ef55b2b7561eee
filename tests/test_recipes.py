"""The hydra recipes from any working folder: composition, overrides, a real run, TensorBoard."""

import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_jobs, run, tensorboard_scalars

# recipes/reproduce holds eqssl-reproduce's settings, not hydra recipes (tests/test_reproduce.py).
RECIPES = sorted(p for group in ("pretrain", "finetune") for p in (REPO / "recipes" / group).glob("*.yaml"))


# Fields of each recipe's task, criterion and model that no recipe lists, with non-default values.
UNLISTED = {
    "pretrain": ["task.shard_sampling=temperature", "task.validation_gap_steps=2", "optimizer.use_old_adam=true"],
    "wav2vec2": ["criterion.collapse_accuracy=0.5", "model.conv_bias=true"],
    "bestrq": ["model.quantizer_seed=7"],
    "cpc": ["model.num_negatives=7", "model.prediction_steps=10"],
    "finetune": ["task.eval_wer=true", "criterion.wer_kenlm_model=/lm.bin", "model.mask_channel_before=true",
                 "lr_scheduler.init_lr_scale=0.02"],
    # CPC fine-tuning sets no mask field (eq_cpc masks nothing): an unlisted field it does read instead
    "finetune_cpc": ["task.eval_wer=true", "criterion.wer_kenlm_model=/lm.bin", "model.final_dropout=0.2",
                     "lr_scheduler.init_lr_scale=0.02"],
}


def unlisted(recipe: Path) -> list:
    family = next((f for f in ("bestrq", "cpc") if f"_{f}_" in f"_{recipe.stem}_"), "wav2vec2")
    if recipe.parent.name == "finetune":
        return UNLISTED["finetune_cpc" if family == "cpc" else "finetune"]
    return UNLISTED["pretrain"] + UNLISTED[family]


# What hydra says of recipes written for hydra 1.0 (`# @package _group_` headers) and of fairseq's
# matching of a recipe to its schema by name: neither is the user's to act on.
HYDRA_NOTICES = ("Usage of deprecated keyword in package header", "is validated against ConfigStore schema")


def recipe_id(recipe: Path) -> str:
    return f"{recipe.parent.name}/{recipe.stem}"


def recipe_command(recipe: Path) -> list:
    """fairseq-hydra-train composing ``recipe`` in the design card's form, with the fields it does
    not list, printing the config (--cfg job --resolve runs nothing)."""
    group = recipe.parent.name
    command = ["fairseq-hydra-train", "--config-dir", REPO / "recipes", "--config-name", f"{group}/{recipe.stem}",
               "task.data=/data", *unlisted(recipe), "--cfg", "job", "--resolve"]
    if "ptloc" in recipe.stem:
        command.insert(-3, "model.init_from=/pretrained.pt")
    if group == "finetune":
        command.insert(-3, "model.w2v_path=/pretrained.pt")
    return command


@pytest.fixture(scope="module")
def recipes_composed(tmp_path_factory) -> dict:
    """Every recipe's composition, from a folder that is not the repository, all in one process
    (conftest.compose_jobs: fairseq's own entry point, one import for all)."""
    return compose_jobs({recipe_id(r): recipe_command(r) for r in RECIPES}, tmp_path_factory.mktemp("elsewhere"))


@pytest.mark.parametrize("recipe", RECIPES, ids=recipe_id)
def test_every_recipe_composes_from_any_folder(recipe, recipes_composed):
    """Each recipe composes in fairseq-hydra-train, named as the design card names it
    (--config-dir recipes --config-name GROUP/RECIPE), from a folder that is not the repository
    (--cfg job --resolve prints the config, runs nothing): common.user_dir resolves to the
    installed package, task, criterion, model, optimizer and lr_scheduler fields the recipe does
    not list are overridden as plain task.X= / criterion.X= / model.X= / ..., and hydra prints
    no deprecation notice."""
    group = recipe.parent.name
    result = recipes_composed[recipe_id(recipe)]
    assert result.returncode == 0, result.stdout[-3000:]
    task = "equilibrium_pretraining" if group == "pretrain" else "audio_finetuning"
    assert f"_name: {task}" in result.stdout
    assert f"user_dir: {REPO / 'eqssl'}" in result.stdout
    for override in unlisted(recipe):
        key, value = override.split(".", 1)[1].split("=")
        assert re.search(rf"^  {key}: {re.escape(value)}$", result.stdout, re.M), (override, result.stdout[-3000:])
    for notice in HYDRA_NOTICES:
        assert notice not in result.stdout


def composed(config_dir: Path, config_name: str, overrides: list) -> str:
    """The config fairseq-hydra-train composes (its --cfg job), composed in this process as it
    does: fairseq's schema stored under the recipe's name, then hydra 1.1's composition."""
    from fairseq.dataclass.initialize import hydra_init
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    hydra_init(config_name)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.1", job_name="recipes"):
        return OmegaConf.to_yaml(compose(config_name=config_name, overrides=overrides))


def test_both_recipe_forms_compose_the_same_config():
    """--config-dir recipes/GROUP --config-name RECIPE (fairseq's examples' form) and
    --config-dir recipes --config-name GROUP/RECIPE give every recipe the same config, with
    fairseq's defaults in it (common, dataset, ...) and eqssl's model fields typed."""
    for recipe in RECIPES:
        group = recipe.parent.name
        overrides = ["task.data=/data", *(["model.quantizer_seed=7"] if "bestrq" in recipe.stem and group == "pretrain"
                                          else [])]
        in_group = composed(recipe.parent, recipe.stem, overrides)
        named_with_group = composed(REPO / "recipes", f"{group}/{recipe.stem}", overrides)
        assert named_with_group == in_group, recipe
        assert re.search(r"^common:\n  _name: null\n", in_group, re.M) and "\n  tpu: false\n" in in_group, recipe
        if "quantizer_seed=7" in " ".join(overrides):
            assert "\n  quantizer_seed: 7\n" in in_group


def test_a_misspelt_field_names_itself(tmp_path):
    """Recipes are typed by eqssl's dataclasses: a field that does not exist is refused by name."""
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/pretrain", "--config-name", "cssl_tiny",
                  "task.data=/data", "task.inner_step=1", "--cfg", "job"], cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not override 'task.inner_step'" in result.stdout
    assert "Key 'inner_step' not in 'EquilibriumPretrainingConfig'" in result.stdout


@pytest.fixture(scope="module")
def recipe_run(corpus, tmp_path_factory) -> dict:
    """cssl_tiny run for 4 updates from a folder outside the repository, in the design card's form
    (the experiment's runs use --config-dir recipes/pretrain), with one field the recipe does
    not list (task.validation_gap_steps, so that validation logs gaps) and TensorBoard logs."""
    folder = tmp_path_factory.mktemp("elsewhere")
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes", "--config-name", "pretrain/cssl_tiny",
                  f"task.data={corpus}", "checkpoint.save_dir=ck", "common.tensorboard_logdir=tb",
                  "task.validation_gap_steps=1", "optimization.max_update=4", "dataset.validate_interval_updates=2",
                  "common.log_interval=1"], cwd=folder)
    assert result.returncode == 0, result.stdout[-3000:]
    return {"folder": folder, "output": result.stdout}


def test_a_recipe_trains_from_another_folder(recipe_run):
    """The checkpoint lands under the working folder and records the override and the
    installed package as its user_dir."""
    checkpoint = torch.load(recipe_run["folder"] / "ck" / "checkpoint_last.pt", weights_only=False)
    cfg = checkpoint["cfg"]
    assert cfg["common"]["user_dir"] == str(REPO / "eqssl")
    assert cfg["task"]["validation_gap_steps"] == 1
    assert checkpoint["extra_state"]["train_iterator"]["epoch"] >= 1


def test_per_shard_scalars_land_in_tensorboard(recipe_run, corpus):
    """fairseq writes every per-shard meter to TensorBoard (train_inner every update, valid at
    each validation), and no command asks for tensorboardX any more."""
    assert "install tensorboard" not in recipe_run["output"].lower()
    scalars = tensorboard_scalars(recipe_run["folder"] / "tb")
    assert {"train_inner", "valid"} <= set(scalars)
    shards = sorted(p.name for p in corpus.iterdir() if p.is_dir())
    for shard in shards:
        for key in ("loss_before", "accuracy", "code_ppl"):
            steps = [step for step, _ in scalars["train_inner"][f"{key}_{shard}"]]
            assert steps == [1, 2, 3, 4], (key, shard, steps)
        for key in ("loss_before", "loss_after", "gap", "accuracy"):
            points = scalars["valid"][f"{key}_{shard}"]
            assert [step for step, _ in points] == [2, 4], (key, shard, points)
            assert all(value == value for _, value in points)  # no NaN
        # the validation gap is measured (validation_gap_steps=1), so it is not the constant 0 of K=0 training
        assert any(value != 0 for _, value in scalars["valid"][f"gap_{shard}"])
