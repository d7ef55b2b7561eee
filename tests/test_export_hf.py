"""eqssl-export --format hf: wav2vec 2.0 checkpoints as Hugging Face transformers folders.

Real checkpoints through real fairseq and real transformers: the pre-training export's hidden
states, projections and quantized targets equal fairseq's (including eq_wav2vec2_tiny as named,
whose missing post_extract_proj becomes an identity); a CTC fine-tuned export's logits equal
fairseq's, and transformers' ASR pipeline, run where eqssl and fairseq cannot be imported,
transcribes clips to exactly eqssl-evaluate's greedy strings (letters, and a SentencePiece
vocabulary); what transformers cannot express, BEST-RQ, an occupied output folder and a missing
transformers are each one clear error.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from conftest import REPO, run
from eqssl.measures.evaluation import POST_PROCESS, decode_set, greedy_decode, load_checkpoint, load_test_set
from eqssl.cli.export import ExportError, main
from eqssl.cli.export_hf import REFUSED, export_hf
from test_bestrq import one_thread  # noqa: F401  (autouse: one thread per process)
from test_bestrq import pretrained as bestrq_checkpoint  # noqa: F401  (a fixture: 4 BEST-RQ updates)
from test_export import labelled_folder, pretrained  # noqa: F401  (pretrained: a fixture, 48-wide)

TOLERANCE = 1e-4
SPM_PIECES = ["\u2581", "\u2581a", "b", "\u2581cd", "e", "'s", "\u2581f"]  # replace "|ABCDEF"


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip(
        "transformers", reason="Hugging Face transformers is not installed (pip install -e \".[hf]\"); "
        "CI installs it")


def load_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def fairseq_model(path):
    """The model fairseq itself builds from checkpoint ``path``, in eval mode."""
    from fairseq import checkpoint_utils

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    return models[0].eval()


def clips(corpus, count: int = 2) -> list:
    """The first ``count`` clips of the read shard as (1, samples) tensors, and one of noise."""
    lines = (corpus / "read" / "train.tsv").read_text().splitlines()
    waves = []
    for line in lines[1:count + 1]:
        audio, rate = soundfile.read(os.path.join(lines[0], line.split("\t")[0]), dtype="float32")
        assert rate == 16000
        waves.append(torch.from_numpy(audio)[None])
    return waves + [torch.randn(1, 12000, generator=torch.Generator().manual_seed(0))]


def assert_close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    assert ours.shape == reference.shape, what
    assert reference.std() > 0.05, f"{what}: a trivial reference"
    difference = (ours - reference).abs().max().item()
    assert difference < TOLERANCE, f"{what}: differs by {difference}"


def with_model(source, out, cfg_changes: dict, task_changes: dict = None, seed: int = 0):
    """A copy of pre-training checkpoint ``source`` whose model config has ``cfg_changes`` (and
    task config ``task_changes``) and whose weights are a freshly built fairseq Wav2Vec2Model of
    that config."""
    from fairseq.dataclass.utils import merge_with_parent
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
    from omegaconf import OmegaConf

    state = load_state(source)
    state["cfg"]["model"] = {**state["cfg"]["model"], **cfg_changes}
    state["cfg"]["task"] = {**state["cfg"]["task"], **(task_changes or {})}
    stock = {k: v for k, v in state["cfg"]["model"].items() if k not in ("_name", "init_from")}
    torch.manual_seed(seed)
    state["model"] = Wav2Vec2Model(merge_with_parent(Wav2Vec2Config(), OmegaConf.create(stock))).state_dict()
    torch.save(state, out)
    return out


@pytest.fixture(scope="module")
def finetuned(corpus, pretrained, tmp_path_factory):  # noqa: F811
    """(checkpoint, labelled folder): ctc_tiny on made-up letter transcripts, 150 updates, enough
    for varied transcripts (words, double spaces) from the greedy decoder."""
    root = tmp_path_factory.mktemp("hf_finetune")
    data = root / "labelled"
    labelled_folder(corpus, data)
    result = run(["fairseq-hydra-train", "--config-dir", REPO / "recipes/finetune", "--config-name", "ctc_tiny",
                  f"task.data={data}", f"model.w2v_path={pretrained}", f"checkpoint.save_dir={root / 'ctc'}",
                  "optimization.max_update=150", "model.freeze_finetune_updates=0",
                  "checkpoint.save_interval_updates=1000", "dataset.validate_interval_updates=1000"])
    assert result.returncode == 0, result.stdout[-3000:]
    return root / "ctc" / "checkpoint_last.pt", data


def as_spm(finetuned_checkpoint, out, pieces=SPM_PIECES):
    """The fine-tuned checkpoint with SentencePiece labels: the same network, its letters renamed
    as the pieces of a (made-up) shared vocabulary, as units=spm fine-tuning would record it."""
    from fairseq.data import Dictionary

    state = load_state(finetuned_checkpoint)
    state["cfg"]["task"] = {**state["cfg"]["task"], "labels": "spm"}
    state["cfg"]["criterion"] = {**state["cfg"]["criterion"], "post_process": "sentencepiece"}
    dictionary = Dictionary()
    for piece in pieces:
        dictionary.add_symbol(piece)
    assert len(dictionary) == len(state["task_state"]["target_dictionary"])
    state["task_state"]["target_dictionary"] = dictionary
    torch.save(state, out)
    return out


def evaluate_hypotheses(checkpoint, folder, splits=("train_1h", "dev")) -> tuple:
    """(clip paths, eqssl-evaluate's greedy transcripts) over ``splits``, each clip decoded alone
    (--batch-size 1, as the pipeline takes one clip: with larger batches fairseq's group-norm
    feature encoder sees the batch's zero padding)."""
    model, task = load_checkpoint(str(checkpoint))
    units = task.cfg.labels
    paths, hypotheses = [], []
    for split in splits:
        test_set = load_test_set(split, str(folder), split, task.target_dictionary, units)
        hypotheses += decode_set(model, task, test_set, 1, "cpu", POST_PROCESS[units], progress=False)
        paths += test_set.audio
    return paths, hypotheses


# Runs where `import eqssl` and `import fairseq` fail: transformers' ASR pipeline on each folder's
# clips, given as 16 kHz numpy arrays (file paths would need ffmpeg). Prints one JSON line.
PIPELINE_SCRIPT = r"""
import json, sys
sys.modules["eqssl"] = None
sys.modules["fairseq"] = None
import soundfile
from transformers import pipeline

jobs, out = json.loads(sys.argv[1]), {}
for folder, paths in jobs.items():
    asr = pipeline("automatic-speech-recognition", model=folder)
    out[folder] = []
    for path in paths:
        audio, rate = soundfile.read(path, dtype="float32")
        out[folder].append(asr({"raw": audio, "sampling_rate": rate})["text"])
print("RESULT " + json.dumps(out))
"""


def transcribe_without_eqssl(jobs: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, json.dumps(jobs)], cwd="/", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# Pre-training checkpoints
# ---------------------------------------------------------------------------------------------


def assert_pretraining_outputs_match(transformers, checkpoint, folder, corpus) -> None:
    """Hidden states, feature-encoder output, projected states and projected quantized targets of
    Wav2Vec2ForPreTraining equal fairseq's on real clips and noise."""
    reference = fairseq_model(checkpoint)
    model = transformers.Wav2Vec2ForPreTraining.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        for i, wave in enumerate(clips(corpus)):
            ours = model(wave)
            hidden = model.wav2vec2(wave).last_hidden_state
            fairseq_out = reference.extract_features(wave, padding_mask=None, mask=False)
            features = reference.layer_norm(reference.feature_extractor(wave).transpose(1, 2))
            quantized = reference.quantizer(features, produce_targets=False)["x"]
            assert_close(hidden, fairseq_out["x"], f"clip {i}: last_hidden_state")
            assert_close(model.wav2vec2(wave).extract_features, features, f"clip {i}: extract_features")
            assert_close(ours.projected_states, reference.final_proj(fairseq_out["x"]), f"clip {i}: projected_states")
            assert_close(ours.projected_quantized_states, reference.project_q(quantized),
                         f"clip {i}: projected_quantized_states")


def test_pretraining_export_equals_fairseq(transformers, pretrained, corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "w2v_hf"
    assert main([str(pretrained), str(out), "--format", "hf"]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out} (transformers Wav2Vec2ForPreTraining with its feature extractor)" in captured.out
    assert "Traceback" not in captured.err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert not [name for name in os.listdir(tmp_path) if ".partial" in name]

    config = json.loads((out / "config.json").read_text())
    source = load_state(pretrained)["cfg"]["model"]
    assert config["architectures"] == ["Wav2Vec2ForPreTraining"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (48, source["encoder_layers"])
    assert config["conv_dim"][-1] == 64 and config["feat_extract_norm"] == "group"
    assert config["num_codevectors_per_group"] == source["latent_vars"]
    assert config["proj_codevector_dim"] == source["final_dim"]
    extractor = json.loads((out / "preprocessor_config.json").read_text())
    assert extractor["do_normalize"] is False and extractor["return_attention_mask"] is False
    assert extractor["sampling_rate"] == 16000
    assert_pretraining_outputs_match(transformers, pretrained, out, corpus)


def test_tiny_as_named_gets_an_identity_feature_projection(transformers, pretrained, corpus, tmp_path):  # noqa: F811
    """eq_wav2vec2_tiny as named (64 conv channels, 64-wide encoder) has no post_extract_proj;
    transformers' projection Linear gets the identity, and the outputs still equal fairseq's."""
    checkpoint = with_model(pretrained, tmp_path / "tiny64.pt", {"encoder_embed_dim": 64})
    assert fairseq_model(checkpoint).post_extract_proj is None
    out = tmp_path / "tiny64_hf"
    kind, _ = export_hf(str(checkpoint), str(out))
    assert kind == "pretraining"
    model = transformers.Wav2Vec2ForPreTraining.from_pretrained(str(out))
    projection = model.wav2vec2.feature_projection.projection
    assert torch.equal(projection.weight, torch.eye(64)) and torch.equal(projection.bias, torch.zeros(64))
    assert_pretraining_outputs_match(transformers, checkpoint, out, corpus)


def test_layer_norm_shape_equals_fairseq(transformers, pretrained, corpus, tmp_path):  # noqa: F811
    """The shape of wav2vec 2.0 LARGE and XLS-R (layer-norm feature encoder with biases, layer norm
    first), here with gelu_accurate, no masking (so no mask embedding in transformers: fairseq's is
    unused too) and a normalising task: transformers' stable-layer-norm model, an attention mask
    from the feature extractor, and fairseq's outputs."""
    checkpoint = with_model(pretrained, tmp_path / "large_shape.pt",
                            {"extractor_mode": "layer_norm", "layer_norm_first": True, "conv_bias": True,
                             "activation_fn": "gelu_accurate", "mask_prob": 0.0}, {"normalize": True})
    assert "mask_emb" in load_state(checkpoint)["model"]
    out = tmp_path / "hf"
    export_hf(str(checkpoint), str(out))
    config = json.loads((out / "config.json").read_text())
    assert (config["feat_extract_norm"], config["do_stable_layer_norm"]) == ("layer", True)
    assert (config["conv_bias"], config["hidden_act"]) == (True, "gelu_accurate")
    assert (config["mask_time_prob"], config["mask_feature_prob"]) == (0.0, 0.0)
    assert not hasattr(transformers.Wav2Vec2ForPreTraining.from_pretrained(str(out)).wav2vec2, "masked_spec_embed")
    assert_pretraining_outputs_match(transformers, checkpoint, out, corpus)

    extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(str(out))
    assert extractor.do_normalize is True and extractor.return_attention_mask is True
    # task.normalize: fairseq layer-normalises the clip (variance epsilon 1e-5), transformers
    # divides by sqrt(variance + 1e-7): the same up to that factor (docs/hf_export.md)
    audio = clips(corpus, 1)[0][0]
    ours = torch.from_numpy(extractor(audio.numpy(), sampling_rate=16000).input_values[0])
    fairseq_input = torch.nn.functional.layer_norm(audio, audio.shape)
    variance = audio.double().var(unbiased=False).item()
    factor = ((variance + 1e-5) / (variance + 1e-7)) ** 0.5
    assert factor > 1 + 1e-4  # a visible difference on this quiet clip
    assert torch.allclose(ours, fairseq_input * factor, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Fine-tuned (CTC) checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(transformers, finetuned, tmp_path_factory):
    """The fine-tuned checkpoint and its SentencePiece twin, exported: {units: (checkpoint, folder)}."""
    checkpoint, _ = finetuned
    root = tmp_path_factory.mktemp("hf_ctc")
    spm_checkpoint = as_spm(checkpoint, root / "spm.pt")
    folders = {}
    for units, source in (("ltr", checkpoint), ("spm", spm_checkpoint)):
        folders[units] = (source, root / f"{units}_hf")
        assert main([str(source), str(folders[units][1]), "--format", "hf"]) == 0
    return folders


def test_ctc_export_logits_equal_fairseq(transformers, exported, corpus):
    checkpoint, out = exported["ltr"]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "processor_config.json",
                                       "tokenizer_config.json", "vocab.json"]
    reference = fairseq_model(checkpoint)
    model = transformers.Wav2Vec2ForCTC.from_pretrained(str(out)).eval()
    with torch.no_grad():
        for i, wave in enumerate(clips(corpus)):
            fairseq_logits = reference.get_logits(reference(source=wave, padding_mask=None)).transpose(0, 1)
            assert_close(model(wave).logits, fairseq_logits, f"clip {i}: logits")

    symbols = load_state(checkpoint)["task_state"]["target_dictionary"].symbols
    vocab = json.loads((out / "vocab.json").read_text())
    # fairseq's blank, <s> at 0, is transformers' pad; the rest keep their indices
    assert vocab == {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{s: i for i, s in enumerate(symbols) if i > 3}}
    processor = transformers.Wav2Vec2Processor.from_pretrained(str(out))
    assert processor.tokenizer.pad_token_id == model.config.pad_token_id == 0
    assert processor.tokenizer.word_delimiter_token == "|"
    assert processor.feature_extractor.do_normalize is False  # the task's normalize
    assert processor.feature_extractor.return_attention_mask is False  # group-norm feature encoder


def test_pipeline_transcribes_as_eqssl_evaluate(exported, finetuned):
    """transformers' ASR pipeline (without eqssl or fairseq) gives eqssl-evaluate's strings, for a
    letter vocabulary and a SentencePiece one (whose pieces carry the word marks)."""
    _, data = finetuned
    spm_data = data.parent / "labelled_spm"  # the same clips, word references (.wrd) for units=spm
    spm_data.mkdir()
    for split in ("train_1h", "dev"):
        (spm_data / f"{split}.tsv").write_text((data / f"{split}.tsv").read_text())
        count = len((data / f"{split}.tsv").read_text().splitlines()) - 1
        (spm_data / f"{split}.wrd").write_text("a word\n" * count)
    expected, jobs = {}, {}
    for units, folder in (("ltr", data), ("spm", spm_data)):
        checkpoint, out = exported[units]
        paths, expected[str(out)] = evaluate_hypotheses(checkpoint, folder)
        jobs[str(out)] = paths
    transcripts = transcribe_without_eqssl(jobs)
    for out, hypotheses in expected.items():
        assert transcripts[out] == hypotheses, out
        # a model that says something: the comparison would catch a wrong blank, delimiter or order
        assert len(hypotheses) == 11 and len(set(hypotheses)) >= 5, hypotheses
        assert sum(" " in h for h in hypotheses) >= 2, hypotheses
    ltr, spm = (expected[str(exported[units][1])] for units in ("ltr", "spm"))
    assert any("  " in h for h in ltr), ltr  # two delimiters around a blank: two spaces, as fairseq
    assert any("cd" in h for h in spm) and ltr != spm


def random_emissions(size: int, rng) -> list:
    """Arg-max indices of random frames: blanks often, <unk> and every symbol (never fairseq's
    <pad> and </s>, see docs/hf_export.md)."""
    ids = rng.choice([0, 3, *range(4, size)], size=int(rng.integers(0, 30)))
    return np.where(rng.random(len(ids)) < 0.4, 0, ids).tolist()


@pytest.mark.parametrize("units", ["ltr", "spm"])
def test_tokenizer_decodes_any_frames_as_eqssl_evaluate(transformers, exported, units):
    """The exported tokenizer, as the pipeline calls it, against eqssl-evaluate's greedy_decode on
    one-hot emissions: repeats, blanks, <unk>, delimiters and pieces in every order."""
    checkpoint, out = exported[units]
    dictionary = load_state(checkpoint)["task_state"]["target_dictionary"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    rng = np.random.default_rng(0)
    for _ in range(500):
        ids = random_emissions(len(dictionary), rng)
        emissions = torch.nn.functional.one_hot(torch.tensor(ids, dtype=torch.long), len(dictionary)).float()
        expected = greedy_decode(emissions, dictionary, post_process_as=POST_PROCESS[units])[0] if ids else ""
        assert tokenizer.decode(ids, skip_special_tokens=False) == expected, ids
    # the documented difference: fairseq's <pad> and </s> (never CTC targets) are spelled out
    assert tokenizer.decode([5, 1, 6, 2, 7]).count("<s>") == 1


@pytest.mark.parametrize("mode", ["add", "set"])
def test_blank_weight_is_folded_into_the_output_layer(transformers, finetuned, corpus, tmp_path, mode):
    checkpoint, _ = finetuned
    state = load_state(checkpoint)
    state["cfg"]["model"] = {**state["cfg"]["model"], "blank_weight": 1.5, "blank_mode": mode}
    weighted = tmp_path / f"blank_{mode}.pt"
    torch.save(state, weighted)
    out = tmp_path / "hf"
    export_hf(str(weighted), str(out))
    reference = fairseq_model(weighted)
    model = transformers.Wav2Vec2ForCTC.from_pretrained(str(out)).eval()
    wave = clips(corpus, 1)[0]
    with torch.no_grad():
        fairseq_logits = reference.get_logits(reference(source=wave, padding_mask=None)).transpose(0, 1)
        assert_close(model(wave).logits, fairseq_logits, f"blank_mode {mode}")


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("layer_type", "conformer"), ("pos_conv_depth", 2),
                                          ("target_glu", True), ("quantize_input", True)])
def test_architecture_transformers_cannot_express_is_refused(pretrained, tmp_path, capsys, field, value):  # noqa: F811
    checkpoint = with_model(pretrained, tmp_path / f"{field}.pt", {field: value})
    fairseq_model(checkpoint)  # a checkpoint fairseq loads
    out = tmp_path / "hf"
    assert main([str(checkpoint), str(out), "--format", "hf"]) == 1
    err = capsys.readouterr().err
    assert err.count("eqssl-export: error:") == 1 and "Traceback" not in err
    assert f"{checkpoint}: transformers' Wav2Vec2 cannot express this checkpoint: model.{field} is {value!r}: " in err
    assert REFUSED[field] in err
    assert not out.exists() and os.listdir(tmp_path) == [f"{field}.pt"]


def test_spm_vocabulary_with_a_bar_piece_is_refused(finetuned, tmp_path):
    checkpoint = as_spm(finetuned[0], tmp_path / "bar.pt", ["|", *SPM_PIECES[1:]])
    with pytest.raises(ExportError, match=f"{tmp_path / 'bar.pt'}: the SentencePiece dictionary has a '\\|' piece"):
        export_hf(str(checkpoint), str(tmp_path / "hf"))


def test_bestrq_is_refused(bestrq_checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main([str(bestrq_checkpoint), str(out), "--format", "hf"]) == 1
    err = capsys.readouterr().err
    assert f"{bestrq_checkpoint}: a BEST-RQ (eq_bestrq) checkpoint; transformers has no BEST-RQ model" in err
    assert "Traceback" not in err and not out.exists()


def test_existing_output_is_never_overwritten(transformers, pretrained, tmp_path, capsys):  # noqa: F811
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("keep me")
    taken = tmp_path / "taken.bin"
    taken.write_bytes(b"keep me")
    for existing in (occupied, taken):
        assert main([str(pretrained), str(existing), "--format", "hf"]) == 1
        err = capsys.readouterr().err
        assert f"{existing}: already exists; not overwriting it" in err
    assert os.listdir(occupied) == ["keep.txt"] and (occupied / "keep.txt").read_text() == "keep me"
    assert taken.read_bytes() == b"keep me"
    empty = tmp_path / "empty"  # an empty folder is taken, as a new one would be
    empty.mkdir()
    assert main([str(pretrained), str(empty), "--format", "hf"]) == 0
    assert "config.json" in os.listdir(empty)
    assert sorted(os.listdir(tmp_path)) == ["empty", "occupied", "taken.bin"]


def test_without_transformers_the_command_says_how_to_install_it(pretrained, tmp_path):  # noqa: F811
    script = ("import sys; sys.modules['transformers'] = None\n"
              "from eqssl.cli.export import main\nsys.exit(main(sys.argv[1:]))")
    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-c", script, str(pretrained), str(out), "--format", "hf"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("eqssl-export: error:")]
    assert errors == ["eqssl-export: error: --format hf needs Hugging Face transformers, which is not "
                      "installed here: pip install -e \".[hf]\" in the eqssl checkout (or pip install transformers)"]
    assert "Traceback" not in result.stderr and not out.exists()
