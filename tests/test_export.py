"""eqssl-export: eqssl checkpoints become stock fairseq ones that load without eqssl, in fairseq
and in torchaudio, with the same outputs."""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO, fairseq_train, run
from eqssl.cli.export import main
from eqssl.cli.export_fairseq import ExportError, PortabilityWarning, export_checkpoint, portability_warnings

# Runs in a fresh interpreter where `import eqssl` fails, so nothing of eqssl can be used: loads
# OUT with plain fairseq (no user_dir), imports it into torchaudio and compares their outputs on
# one fixed random waveform. Prints one JSON line.
NO_EQSSL_SCRIPT = r"""
import json, sys
sys.modules["eqssl"] = None  # `import eqssl` now raises ImportError
import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model
from fairseq.tasks.audio_pretraining import AudioPretrainingTask
from torchaudio.models.wav2vec2.utils import import_fairseq_model

# torch >= 2.6 loads weights_only: a fine-tuned checkpoint's target Dictionary must be allowed,
# as for any stock fairseq fine-tuned checkpoint.
torch.serialization.add_safe_globals([Dictionary])
path, kind = sys.argv[1], sys.argv[2]
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
model = models[0].eval()
torch.manual_seed(0)
wave = torch.randn(1, 16000)
out = {"model": type(model).__module__ + "." + type(model).__name__,
       "task": type(task).__module__ + "." + type(task).__name__,
       "user_dir": cfg.common.user_dir}
with torch.no_grad():
    if kind == "pretraining":
        imported = import_fairseq_model(model).eval()
        res = model.extract_features(wave, padding_mask=None, mask=False)
        layers, _ = imported.extract_features(wave)
        encoded, _ = imported(wave)
        conv, _ = imported.feature_extractor(wave, None)
        reference_conv = model.feature_extractor(wave).transpose(1, 2)
        out["diff_last_layer"] = (layers[-1] - res["x"]).abs().max().item()
        out["diff_forward"] = (encoded - res["x"]).abs().max().item()
        out["diff_features"] = (conv - reference_conv).abs().max().item()
        out["shape"] = list(res["x"].shape)
    else:
        assert isinstance(model.w2v_encoder.w2v_model, Wav2Vec2Model)
        out["inner_model"] = type(model.w2v_encoder.w2v_model).__module__
        imported = import_fairseq_model(model.w2v_encoder).eval()
        emissions, _ = imported(wave)
        reference = model(source=wave, padding_mask=None)["encoder_out"].transpose(0, 1)
        out["diff_emissions"] = (emissions - reference).abs().max().item()
        out["shape"] = list(reference.shape)
        out["vocab"] = len(task.target_dictionary)
        out["emission_std"] = reference.std().item()
print("RESULT " + json.dumps(out))
"""


def load_without_eqssl(path, kind: str) -> dict:
    """Run NO_EQSSL_SCRIPT on ``path`` in a subprocess; its JSON result."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", NO_EQSSL_SCRIPT, str(path), kind], cwd="/", env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def field_names(config_class) -> set:
    return {f.name for f in dataclasses.fields(config_class)} | {"_name"}


def assert_stock_pretraining_cfg(cfg: dict) -> None:
    from fairseq.criterions.wav2vec_criterion import Wav2VecCriterionConfig
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config
    from fairseq.tasks.audio_pretraining import AudioPretrainingConfig

    assert cfg["model"]["_name"] == "wav2vec2"
    assert cfg["task"]["_name"] == "audio_pretraining"
    assert cfg["criterion"]["_name"] == "wav2vec"
    assert set(cfg["model"]) <= field_names(Wav2Vec2Config)
    assert set(cfg["task"]) <= field_names(AudioPretrainingConfig)
    assert set(cfg["criterion"]) <= field_names(Wav2VecCriterionConfig)
    assert "init_from" not in cfg["model"] and "inner_steps" not in cfg["task"]
    assert "collapse_perplexity" not in cfg["criterion"]
    assert cfg["common"]["user_dir"] is None


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
    """A tiny eqssl (CSSL) pre-training checkpoint after 2 updates."""
    save_dir = tmp_path_factory.mktemp("pretrain")
    # eq_wav2vec2_tiny's encoder is as wide as its feature encoder (64), so fairseq gives it no
    # post_extract_proj, which torchaudio's importer needs (like every released wav2vec 2.0).
    result = fairseq_train(corpus, save_dir, "--inner-steps", "0", "--max-update", "2",
                           "--encoder-embed-dim", "48")
    assert result.returncode == 0, result.stdout[-3000:]
    return save_dir / "checkpoint_last.pt"


def labelled_folder(corpus, folder) -> None:
    """A fine-tuning folder (train_1h, dev, dict.ltr.txt) on the toy corpus's read shard, with
    made-up letter transcripts: enough for CTC to run."""
    folder.mkdir()
    transcripts = ["A B | C |", "D E |", "F A | D E |", "B B C A |"]
    for source, name in (("train", "train_1h"), ("valid", "dev")):
        lines = (corpus / "read" / f"{source}.tsv").read_text().splitlines()
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
        labels = [transcripts[i % len(transcripts)] for i in range(len(lines) - 1)]
        (folder / f"{name}.ltr").write_text("\n".join(labels) + "\n")
    (folder / "dict.ltr.txt").write_text("".join(f"{c} {10 - i}\n" for i, c in enumerate("|ABCDEF")))



def assert_same_weights(source: dict, exported: dict) -> None:
    """Export changes the config only: the same tensors under the same names."""
    assert set(exported["model"]) == set(source["model"])
    for name, tensor in source["model"].items():
        assert torch.equal(exported["model"][name], tensor), name


def test_pretraining_checkpoint_loads_in_stock_fairseq_and_torchaudio(pretrained, tmp_path, capsys):
    out = tmp_path / "wav2vec2_stock.pt"
    assert main([str(pretrained), str(out)]) == 0  # the command line, eqssl-export IN OUT
    captured = capsys.readouterr()
    assert f"wrote {out} (stock fairseq wav2vec 2.0 pretraining checkpoint)" in captured.out
    assert "eqssl-export: warning" not in captured.err

    source, exported = load(pretrained), load(out)
    assert source["cfg"]["model"]["_name"].startswith("eq_wav2vec2")
    assert_stock_pretraining_cfg(exported["cfg"])
    assert exported["args"] is None and not exported.get("last_optimizer_state")
    assert exported["optimizer_history"][-1]["criterion_name"] == "Wav2vecCriterion"
    assert "metrics" not in exported["extra_state"]
    # The fields kept keep their values (the architecture especially).
    for key in ("encoder_layers", "encoder_embed_dim", "conv_feature_layers", "latent_vars", "final_dim"):
        assert exported["cfg"]["model"][key] == source["cfg"]["model"][key]
    assert exported["cfg"]["task"]["sample_rate"] == source["cfg"]["task"]["sample_rate"]
    assert_same_weights(source, exported)

    result = load_without_eqssl(out, "pretraining")
    assert result["model"] == "fairseq.models.wav2vec.wav2vec2.Wav2Vec2Model"
    assert result["task"] == "fairseq.tasks.audio_pretraining.AudioPretrainingTask"
    assert result["user_dir"] is None
    assert result["shape"][0] == 1 and result["shape"][2] == source["cfg"]["model"]["encoder_embed_dim"]
    assert result["diff_features"] < 1e-5
    assert result["diff_last_layer"] < 1e-5
    assert result["diff_forward"] < 1e-5


def test_finetuned_checkpoint_loads_in_stock_fairseq_and_torchaudio(pretrained, corpus, tmp_path):
    data = tmp_path / "labelled"
    labelled_folder(corpus, data)
    finetune = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/finetune", "--config-name",
                    "ctc_tiny", f"task.data={data}", f"model.w2v_path={pretrained}",
                    f"checkpoint.save_dir={tmp_path / 'ctc'}", "optimization.max_update=10",
                    "model.freeze_finetune_updates=0"])
    assert finetune.returncode == 0, finetune.stdout[-3000:]
    finetuned = tmp_path / "ctc" / "checkpoint_last.pt"
    source = load(finetuned)
    assert source["cfg"]["model"]["_name"] == "wav2vec_ctc"
    assert source["cfg"]["model"]["w2v_args"]["model"]["_name"].startswith("eq_wav2vec2")

    out = tmp_path / "ctc_stock.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PortabilityWarning)
        assert export_checkpoint(str(finetuned), str(out)) == "finetuned"
    exported = load(out)
    assert exported["cfg"]["model"]["_name"] == "wav2vec_ctc"
    assert exported["cfg"]["common"]["user_dir"] is None
    assert_stock_pretraining_cfg(exported["cfg"]["model"]["w2v_args"])
    assert exported["task_state"]["target_dictionary"].symbols == source["task_state"]["target_dictionary"].symbols
    assert not exported.get("last_optimizer_state")
    assert_same_weights(source, exported)

    result = load_without_eqssl(out, "finetuned")
    assert result["model"] == "fairseq.models.wav2vec.wav2vec2_asr.Wav2VecCtc"
    assert result["inner_model"] == "fairseq.models.wav2vec.wav2vec2"
    assert result["user_dir"] is None
    assert result["shape"][2] == result["vocab"] == len(source["task_state"]["target_dictionary"])
    assert result["emission_std"] > 0
    assert result["diff_emissions"] < 1e-5


def test_refuses_existing_output_and_inputs_that_are_not_wav2vec2(pretrained, tmp_path, capsys):
    existing = tmp_path / "taken.pt"
    existing.write_bytes(b"keep me")
    assert main([str(pretrained), str(existing)]) == 1
    err = capsys.readouterr().err
    assert str(existing) in err and "exists" in err
    assert existing.read_bytes() == b"keep me"

    missing = tmp_path / "missing.pt"
    with pytest.raises(ExportError, match=f"{missing}: no such file"):
        export_checkpoint(str(missing), str(tmp_path / "a.pt"))

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    assert main([str(text), str(tmp_path / "b.pt")]) == 1
    err = capsys.readouterr().err
    assert f"input {text}: not a PyTorch checkpoint" in err

    other = tmp_path / "transformer_lm.pt"
    torch.save({"args": None, "cfg": {"model": {"_name": "transformer_lm"}, "task": {"_name": "language_modeling"}},
                "model": {"w": torch.zeros(2)}, "optimizer_history": [{"num_updates": 0, "lr_scheduler_state": {}, "optimizer_name": "x"}],
                "extra_state": {}}, other)
    with pytest.raises(ExportError, match=f"{other}: holds a 'transformer_lm' model, not a pre-training checkpoint"):
        export_checkpoint(str(other), str(tmp_path / "c.pt"))

    weights_only = tmp_path / "state_dict.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, weights_only)
    with pytest.raises(ExportError, match=f"{weights_only}: not a"):
        export_checkpoint(str(weights_only), str(tmp_path / "d.pt"))
    assert not any((tmp_path / name).exists() for name in ("a.pt", "b.pt", "c.pt", "d.pt"))


def test_warns_when_torchaudio_cannot_import_the_architecture():
    """eq_wav2vec2_tiny as named (conv 64 channels = encoder 64) has no post_extract_proj."""
    from argparse import Namespace

    from eqssl.models.eq_wav2vec2 import eq_wav2vec2_tiny

    args = Namespace()
    eq_wav2vec2_tiny(args)
    tiny = {"_name": "wav2vec2", "conv_feature_layers": args.conv_feature_layers,
            "encoder_embed_dim": args.encoder_embed_dim}
    assert "post_extract_proj" in portability_warnings({"cfg": {"model": tiny}})[0]
    assert portability_warnings({"cfg": {"model": {**tiny, "encoder_embed_dim": 48}}}) == []
    assert portability_warnings({"cfg": {"model": {"_name": "wav2vec_ctc", "w2v_args": {"model": {"_name": "wav2vec2"}}}}}) == []
