"""The frozen-upstream probe and the no-pre-training control: the encoder stays frozen, the control
is freshly initialised, cached features are reused and a changed checkpoint gets its own."""

import math
import shutil

import pytest
import torch

from conftest import REPO, run

from eqssl.models.eq_wav2vec2 import build_from_checkpoint_config, load_pretraining_checkpoint, save_random_init
from eqssl.checkpoints import file_sha256
from eqssl.measures.ctc_probe import ProbeConfig, probe
from eqssl.measures.features import Upstream

CFG = ProbeConfig(updates=20, batch_size=4, seed=3)


@pytest.fixture(scope="module")
def checkpoint(multilingual_corpus, tmp_path_factory):
    """A tiny wav2vec 2.0 pre-trained for 6 updates on the tiny multilingual corpus."""
    save = tmp_path_factory.mktemp("pretrained")
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes" / "pretrain", "--config-name", "cssl_tiny",
                  f"task.data={multilingual_corpus / 'pretrain'}", f"checkpoint.save_dir={save}",
                  f"common.user_dir={REPO / 'eqssl'}", "optimization.max_update=6"])
    assert result.returncode == 0, result.stdout[-3000:]
    return save / "checkpoint_last.pt"


def weights(path):
    return load_pretraining_checkpoint(str(path))["model"]


def test_probe_leaves_the_encoder_bit_identical(checkpoint, multilingual_corpus, tmp_path):
    before_file, before = file_sha256(str(checkpoint)), weights(checkpoint)
    upstream = Upstream(str(checkpoint))
    in_memory = {k: v.clone() for k, v in upstream.model.state_dict().items()}
    result = probe(str(checkpoint), str(multilingual_corpus / "finetune" / "sv"), CFG, str(tmp_path), "sv",
                   upstream=upstream)
    assert math.isfinite(result["wer"]) and math.isfinite(result["cer"])
    assert result["final_train_loss"] > 0 and len(result["layer_weights"]) == 2  # one weight per layer
    assert all(not p.requires_grad for p in upstream.model.parameters())
    for key, value in upstream.model.state_dict().items():
        assert torch.equal(value, in_memory[key]), key
    assert file_sha256(str(checkpoint)) == before_file
    after = weights(checkpoint)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_control_is_the_same_architecture_with_fresh_weights(checkpoint, tmp_path):
    control = tmp_path / "random_init.pt"
    save_random_init(str(checkpoint), str(control), seed=5)
    trained, fresh = weights(checkpoint), weights(control)
    assert {k: v.shape for k, v in fresh.items()} == {k: v.shape for k, v in trained.items()}
    # Every tensor the 6 updates moved differs: nothing of the pre-trained weights is carried over.
    assert not any(torch.equal(fresh[k], trained[k]) for k in trained if trained[k].dtype.is_floating_point
                   and trained[k].std() > 0)
    torch.manual_seed(5)
    reference = build_from_checkpoint_config(load_pretraining_checkpoint(str(checkpoint))).state_dict()
    assert all(torch.equal(fresh[k], reference[k]) for k in reference)
    state = load_pretraining_checkpoint(str(control))
    assert state["optimizer_history"][-1]["num_updates"] == 0 and state["last_optimizer_state"] is None
    with pytest.raises(FileExistsError):
        save_random_init(str(checkpoint), str(control), seed=5)


def test_cached_features_are_reused_and_a_changed_checkpoint_gets_its_own(checkpoint, multilingual_corpus, tmp_path):
    folder = str(multilingual_corpus / "finetune" / "sv")
    cache, path = tmp_path / "cache", tmp_path / "checkpoint.pt"
    shutil.copy(checkpoint, path)
    first = probe(str(path), folder, CFG, str(cache), "sv")
    files = sorted(cache.rglob("*.pt"))
    assert [f.name for f in files] == ["test.pt", "train_1h.pt"]
    # The second probe reads the cache: zeroed cached features change its result, and nothing is recomputed.
    for cached in files:
        stored = torch.load(cached)
        stored["features"] = [torch.zeros_like(f) for f in stored["features"]]
        torch.save(stored, cached)
    mtimes = [f.stat().st_mtime_ns for f in files]
    zeroed = probe(str(path), folder, CFG, str(cache), "sv")
    assert zeroed["final_train_loss"] != pytest.approx(first["final_train_loss"])
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    # The same path with other weights (e.g. a redone stage) has another SHA-256: fresh features,
    # never the stale (here zeroed) ones.
    state = torch.load(path, weights_only=False)
    state["model"] = {k: v * 1.5 if v.dtype.is_floating_point else v for k, v in state["model"].items()}
    torch.save(state, path)
    again = probe(str(path), folder, CFG, str(cache), "sv")
    assert len(sorted(cache.rglob("*.pt"))) == 4
    assert again["upstream_sha256"] != first["upstream_sha256"]
    assert again["final_train_loss"] != pytest.approx(zeroed["final_train_loss"])


def test_repeated_heads_report_the_mean_of_single_probes_with_their_seeds(multilingual_corpus, tmp_path):
    """repeats=3 trains heads with seeds s, s+1000, s+2000 from the same features: its WER and CER
    are the mean of three single probes with those seeds, each head's scores are listed, and the
    first head's result is the single probe's own."""
    from dataclasses import replace

    folder, cache = str(multilingual_corpus / "finetune" / "sv"), str(tmp_path / "cache")
    singles = [probe("fbank", folder, replace(CFG, seed=CFG.seed + 1000 * r), cache, "sv") for r in range(3)]
    repeated = probe("fbank", folder, replace(CFG, repeats=3), cache, "sv")
    assert [h["seed"] for h in repeated["heads"]] == [3, 1003, 2003]
    for head, single in zip(repeated["heads"], singles):
        assert (head["wer"], head["cer"]) == (single["wer"], single["cer"])
    for key in ("wer", "cer"):
        assert repeated[key] == pytest.approx(sum(s[key] for s in singles) / 3)
    assert len({s["cer"] for s in singles}) > 1  # the seeds do train different heads
    assert repeated["final_train_loss"] == singles[0]["final_train_loss"] and "heads" not in singles[0]


def test_fbank_floor_and_cli(multilingual_corpus, tmp_path):
    out = tmp_path / "probe.json"
    result = run(["eqssl-probe", "fbank", multilingual_corpus / "finetune" / "sv", "--updates", "10",
                  "--cache", tmp_path / "cache", "--json", out])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "fbank on" in result.stdout and "CER" in result.stdout
    again = run(["eqssl-probe", "fbank", multilingual_corpus / "finetune" / "sv", "--json", out])
    assert again.returncode != 0 and "exists; not overwritten" in again.stdout
