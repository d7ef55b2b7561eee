"""``eqssl-export CKPT OUT_DIR --format hf``: a wav2vec 2.0 checkpoint as a Hugging Face folder.

The folder loads with ``transformers`` alone:

* a pre-training checkpoint (``eq_wav2vec2*`` or stock ``wav2vec2``) becomes
  ``Wav2Vec2ForPreTraining`` (``config.json``, ``model.safetensors``) with a
  ``Wav2Vec2FeatureExtractor`` (``preprocessor_config.json``);
* a fine-tuned one (fairseq's ``wav2vec_ctc``) becomes ``Wav2Vec2ForCTC`` with a
  ``Wav2Vec2Processor``: that feature extractor and a ``Wav2Vec2CTCTokenizer`` built from the
  checkpoint's target dictionary, so ``pipeline("automatic-speech-recognition", model=OUT_DIR)``
  transcribes.

The weights are mapped name by name from the fairseq state dict (``transformers``'
``modeling_wav2vec2.py`` is the reference for the names and shapes); every fairseq tensor is
placed or the export fails naming it, and the transformers model is loaded with ``strict=True``
before ``save_pretrained`` writes it. Two places are not a plain copy:

* fairseq builds no ``post_extract_proj`` when the feature encoder's last channel count equals
  ``encoder_embed_dim`` (``eq_wav2vec2_tiny`` as named: 64 and 64); transformers' feature
  projection always has a Linear, so it gets the identity (weight ``I``, bias 0), which
  reproduces fairseq exactly;
* a fine-tuned model's ``blank_weight`` (fairseq adds it to, or sets, the blank's logit at
  decoding time) is folded into the output layer's row 0.

Vocabulary: fairseq's CTC blank is the dictionary's index 0 (``<s>``), transformers' is
``pad_token_id``; as transformers' own conversion script does, index 0 is named ``<pad>`` and index
1 (fairseq's ``<pad>``) ``<s>``; no weight moves. ``|`` is the word delimiter of letter (``ltr``)
vocabularies. SentencePiece (``spm``) vocabularies are written with each piece's ``▁`` word mark
as a space, which makes the tokenizer's decoding (pieces joined, ends stripped) what fairseq's
``post_process(..., "sentencepiece")`` gives.

Checkpoints transformers' ``Wav2Vec2`` cannot express are refused with the fields that say why
(``REFUSED`` lists them), and so are BEST-RQ and CPC ones: transformers has neither model.
"""

import importlib
import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

from .export_fairseq import (
    FINETUNED,
    PRETRAINING,
    ExportError,
    check_weights_fit,
    export_state,
    load_input,
)
from .export_bestrq import is_bestrq
from .export_cpc import is_cpc

INSTALL_HINT = (
    "--format hf needs Hugging Face transformers, which is not installed here: "
    "pip install -e \".[hf]\" in the eqssl checkout (or pip install transformers)"
)

# fairseq's activation_fn choices and transformers' names for the same function.
ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",                    # torch's erf gelu in both
    "gelu_accurate": "gelu_accurate",  # the tanh approximation, same formula in both
    "gelu_fast": "gelu_accurate",      # fairseq's deprecated name for gelu_accurate
    "tanh": "tanh",
    "linear": "linear",
}

# What transformers' Wav2Vec2 cannot express, in words (the refusal messages say which applies).
REFUSED = {
    "layer_type": "only 'transformer' layers exist in transformers' Wav2Vec2 (fairseq's "
                  "'conformer' and adapter 'trf_adp' layers do not)",
    "pos_conv_depth": "transformers has one positional convolution (fairseq's pos_conv_depth 1)",
    "activation_fn": f"transformers has no equivalent (exported: {', '.join(sorted(ACTIVATIONS))})",
    "extractor_mode": "only 'default' (group norm) and 'layer_norm' feature encoders exist",
    "crop_seq_to_multiple": "fairseq then drops trailing frames; transformers keeps every frame",
    "quantize_input": "transformers feeds the transformer the projected features, not quantized ones",
    "quantize_targets": "Wav2Vec2ForPreTraining always quantizes its targets",
    "target_glu": "Wav2Vec2ForPreTraining has no GLU on its targets",
    "quantizer_depth": "transformers' quantizer projects with one Linear (fairseq's quantizer_depth 1)",
}

# Fields of the pre-trained model that fairseq's Wav2VecEncoder takes from the fine-tuning config
# instead, when set there.
CTC_OVERRIDES = ("layer_type", "adp_num", "adp_dim", "adp_act_fn", "adp_trf_idx")

LABEL_UNITS = ("ltr", "spm")  # letters, SentencePiece: the label types eqssl-evaluate decodes
FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # fairseq Dictionary indices 0-3
HF_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]       # the same indices as transformers names them
SPM_WORD_MARK = "\u2581"


def _model_configs(stock: dict) -> Tuple[str, dict, Optional[dict], str]:
    """(kind, the full stock Wav2Vec2Config as a dict, the wav2vec_ctc config or None, the prefix
    under which the wav2vec 2.0 weights sit in the state dict)."""
    from fairseq.dataclass.utils import merge_with_parent
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config
    from omegaconf import OmegaConf

    model_cfg = stock["cfg"]["model"]
    if model_cfg["_name"] == "wav2vec_ctc":
        kind, ctc, prefix = FINETUNED, dict(model_cfg), "w2v_encoder.w2v_model."
        inner = dict(model_cfg["w2v_args"]["model"])
        for key in CTC_OVERRIDES:
            if ctc.get(key) is not None:
                inner[key] = ctc[key]
    else:
        kind, ctc, inner, prefix = PRETRAINING, None, dict(model_cfg), ""
    full = merge_with_parent(Wav2Vec2Config(), OmegaConf.create(inner))
    return kind, OmegaConf.to_container(full, resolve=True, enum_to_str=True), ctc, prefix


def refusal_reasons(cfg: dict, kind: str, fields: Optional[Dict[str, str]] = None) -> List[str]:
    """Why transformers' Wav2Vec2 cannot express this architecture (empty when it can).

    ``cfg`` is a full fairseq Wav2Vec2Config as a dict; each reason names its field, as
    ``fields`` spells it in the checkpoint's config (default ``model.<field>``)."""
    reasons = []

    def refuse(key: str) -> None:
        reasons.append(f"{(fields or {}).get(key, 'model.' + key)} is {cfg.get(key)!r}: {REFUSED[key]}")

    if cfg.get("layer_type", "transformer") != "transformer":
        refuse("layer_type")
    if int(cfg.get("pos_conv_depth", 1)) != 1:
        refuse("pos_conv_depth")
    if cfg.get("activation_fn") not in ACTIVATIONS:
        refuse("activation_fn")
    if cfg.get("extractor_mode") not in ("default", "layer_norm"):
        refuse("extractor_mode")
    if int(cfg.get("crop_seq_to_multiple", 1)) != 1:
        refuse("crop_seq_to_multiple")
    if cfg.get("quantize_input"):
        refuse("quantize_input")
    if kind == PRETRAINING:  # fine-tuning removes the quantizer, project_q, final_proj, target_glu
        if not cfg.get("quantize_targets"):
            refuse("quantize_targets")
        if cfg.get("target_glu"):
            refuse("target_glu")
        if int(cfg.get("quantizer_depth", 1)) != 1:
            refuse("quantizer_depth")
    return reasons


def conv_layers(cfg: dict) -> List[Tuple[int, int, int]]:
    """The feature encoder's (channels, kernel, stride) per layer."""
    return [tuple(layer) for layer in eval(cfg["conv_feature_layers"])]  # fairseq itself reads it with eval


def hf_config_kwargs(cfg: dict, kind: str, ctc: Optional[dict], criterion: Optional[dict],
                     vocab_size: Optional[int]) -> dict:
    """``transformers.Wav2Vec2Config`` arguments for a fairseq Wav2Vec2Config (as a dict).

    The network's shape comes from the pre-training config; the training-time fields
    (dropout, masking, layerdrop) from the fine-tuning one for a fine-tuned model, as fairseq
    uses them there. Loss-sampling fields transformers has no place for (cross-sample and
    codebook negatives) do not change the network and are left out."""
    layers = conv_layers(cfg)
    train = ctc if ctc is not None else cfg
    final_dim = cfg["final_dim"] if cfg["final_dim"] > 0 else cfg["encoder_embed_dim"]
    kwargs = {
        "hidden_size": cfg["encoder_embed_dim"],
        "num_hidden_layers": cfg["encoder_layers"],
        "num_attention_heads": cfg["encoder_attention_heads"],
        "intermediate_size": cfg["encoder_ffn_embed_dim"],
        "hidden_act": ACTIVATIONS[cfg["activation_fn"]],
        "layer_norm_eps": 1e-5,  # fairseq's LayerNorm, GroupNorm and Fp32LayerNorm default
        "feat_extract_norm": "group" if cfg["extractor_mode"] == "default" else "layer",
        "feat_extract_activation": "gelu",
        "conv_dim": [c for c, _, _ in layers],
        "conv_kernel": [k for _, k, _ in layers],
        "conv_stride": [s for _, _, s in layers],
        "conv_bias": bool(cfg["conv_bias"]),
        "num_conv_pos_embeddings": cfg["conv_pos"],
        "num_conv_pos_embedding_groups": cfg["conv_pos_groups"],
        "do_stable_layer_norm": bool(cfg["layer_norm_first"]),
        "hidden_dropout": train.get("dropout", cfg["dropout"]),
        "attention_dropout": train.get("attention_dropout", cfg["attention_dropout"]),
        "activation_dropout": train.get("activation_dropout", cfg["activation_dropout"]),
        "feat_proj_dropout": train.get("dropout_input", cfg["dropout_input"]),
        "feat_quantizer_dropout": cfg["dropout_features"],
        "final_dropout": ctc.get("final_dropout", 0.0) if ctc is not None else 0.0,
        "layerdrop": ctc.get("layerdrop", 0.0) if ctc is not None else cfg["encoder_layerdrop"],
        "mask_time_prob": train.get("mask_prob", 0.0),
        "mask_time_length": train.get("mask_length", 10),
        "mask_time_min_masks": 2,  # fairseq's compute_mask_indices(min_masks=2)
        "mask_feature_prob": train.get("mask_channel_prob", 0.0),
        "mask_feature_length": train.get("mask_channel_length", 10),
        "mask_feature_min_masks": 0,
        "num_codevector_groups": cfg["latent_groups"],
        "num_codevectors_per_group": cfg["latent_vars"],
        "codevector_dim": cfg["latent_dim"] if cfg["latent_dim"] > 0 else final_dim,
        "proj_codevector_dim": final_dim,
        "contrastive_logits_temperature": cfg["logit_temp"],
        "num_negatives": cfg["num_negatives"],
    }
    kwargs["apply_spec_augment"] = kwargs["mask_time_prob"] > 0 or kwargs["mask_feature_prob"] > 0
    weights = (criterion or {}).get("loss_weights")
    if kind == PRETRAINING and weights:
        kwargs["diversity_loss_weight"] = float(weights[0])  # fairseq's prob_perplexity weight
    if kind == FINETUNED:
        kwargs.update(
            vocab_size=vocab_size,
            # the transformers names of fairseq's indices (see the module docstring)
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
            ctc_loss_reduction="sum",
            ctc_zero_infinity=bool((criterion or {}).get("zero_infinity", False)),
        )
    return kwargs


def _layer_rules(hf: str) -> List[Tuple[str, str]]:
    """(fairseq name inside the layer, transformers name under ``hf``) for one transformer layer."""
    pairs = [(f"self_attn.{p}_proj", f"attention.{p}_proj") for p in ("q", "k", "v", "out")]
    pairs += [("self_attn_layer_norm", "layer_norm"), ("fc1", "feed_forward.intermediate_dense"),
              ("fc2", "feed_forward.output_dense"), ("final_layer_norm", "final_layer_norm")]
    return [(f"{f}.{t}", f"{hf}.{h}.{t}") for f, h in pairs for t in ("weight", "bias")]


def weight_names(cfg: dict, kind: str, hf_names: List[str]) -> Dict[str, str]:
    """fairseq name (without the fine-tuned prefix) -> transformers name, for every tensor the
    architecture may have. ``hf_names`` (the transformers model's state dict keys) settles how
    the positional convolution's weight norm is stored there."""
    base = "wav2vec2."
    names = {"mask_emb": base + "masked_spec_embed"}
    for i, _ in enumerate(conv_layers(cfg)):
        for t in ("weight", "bias"):
            layer = f"{base}feature_extractor.conv_layers.{i}."
            names[f"feature_extractor.conv_layers.{i}.0.{t}"] = f"{layer}conv.{t}"
            norm = f"{layer}layer_norm.{t}"
            if cfg["extractor_mode"] == "layer_norm":
                names[f"feature_extractor.conv_layers.{i}.2.1.{t}"] = norm
            elif i == 0:  # default mode: GroupNorm on the first layer only
                names[f"feature_extractor.conv_layers.0.2.{t}"] = norm
    pos = f"{base}encoder.pos_conv_embed.conv."
    # torch's weight norm: a parametrization in transformers (original0 = g, original1 = v) where
    # torch has one, fairseq's older weight_g / weight_v otherwise
    parametrized = pos + "parametrizations.weight.original0" in hf_names
    names["encoder.pos_conv.0.bias"] = pos + "bias"
    names["encoder.pos_conv.0.weight_g"] = pos + ("parametrizations.weight.original0" if parametrized else "weight_g")
    names["encoder.pos_conv.0.weight_v"] = pos + ("parametrizations.weight.original1" if parametrized else "weight_v")
    for t in ("weight", "bias"):
        names[f"layer_norm.{t}"] = f"{base}feature_projection.layer_norm.{t}"
        names[f"post_extract_proj.{t}"] = f"{base}feature_projection.projection.{t}"
        names[f"encoder.layer_norm.{t}"] = f"{base}encoder.layer_norm.{t}"
    for i in range(cfg["encoder_layers"]):
        for f, h in _layer_rules(f"{base}encoder.layers.{i}"):
            names[f"encoder.layers.{i}.{f}"] = h
    if kind == PRETRAINING:
        names["quantizer.vars"] = "quantizer.codevectors"
        for t in ("weight", "bias"):
            names[f"quantizer.weight_proj.{t}"] = f"quantizer.weight_proj.{t}"
            names[f"project_q.{t}"] = f"project_q.{t}"
            names[f"final_proj.{t}"] = f"project_hid.{t}"
    return names


def map_weights(weights: Dict[str, torch.Tensor], cfg: dict, kind: str, prefix: str,
                hf_shapes: Dict[str, torch.Size], ctc: Optional[dict], path: str) -> Dict[str, torch.Tensor]:
    """The transformers state dict for a fairseq one. Every fairseq tensor is placed (or, for
    ``mask_emb`` of a model that never masks, known to be unused by both) and every transformers
    tensor filled with the same shape; anything else is an ExportError naming the tensors."""
    names = weight_names(cfg, kind, list(hf_shapes))
    remaining = dict(weights)
    mapped: Dict[str, torch.Tensor] = {}
    for key in list(remaining):
        if not key.startswith(prefix) or key[len(prefix):] not in names:
            continue
        target = names[key[len(prefix):]]
        if target == "wav2vec2.masked_spec_embed" and target not in hf_shapes:
            remaining.pop(key)  # masking is off (mask probabilities 0): fairseq never reads it either
            continue
        mapped[target] = remaining.pop(key)
    if kind == FINETUNED:
        for t in ("weight", "bias"):
            if f"w2v_encoder.proj.{t}" in remaining:
                mapped[f"lm_head.{t}"] = remaining.pop(f"w2v_encoder.proj.{t}").clone()
        _fold_blank_weight(mapped, ctc or {}, path)
    projection = "wav2vec2.feature_projection.projection."
    if projection + "weight" not in mapped and projection + "weight" in hf_shapes:
        width = cfg["encoder_embed_dim"]
        if conv_layers(cfg)[-1][0] == width:  # fairseq has no post_extract_proj: the identity is exact
            mapped[projection + "weight"] = torch.eye(width)
            mapped[projection + "bias"] = torch.zeros(width)
    if remaining:
        raise ExportError(f"{path}: tensors with no place in transformers' Wav2Vec2: {_names(remaining)}")
    missing = set(hf_shapes) - set(mapped)
    unexpected = set(mapped) - set(hf_shapes)
    wrong = [f"{k} {tuple(mapped[k].shape)} for {tuple(hf_shapes[k])}"
             for k in sorted(set(mapped) & set(hf_shapes)) if tuple(mapped[k].shape) != tuple(hf_shapes[k])]
    if missing or unexpected or wrong:
        raise ExportError(f"{path}: the weights do not fit transformers' Wav2Vec2 (no tensor for "
                          f"{_names(missing)}; no place for {_names(unexpected)}; "
                          f"wrong shape: {_names(wrong)})")
    return mapped


def _names(names, shown: int = 8) -> str:
    """Up to ``shown`` sorted names, and how many more."""
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "none") + more


def _fold_blank_weight(mapped: Dict[str, torch.Tensor], ctc: dict, path: str) -> None:
    """fairseq's ``get_logits`` adds ``blank_weight`` to (mode add) or sets (mode set) the blank's
    logit; the same in the output layer's row 0."""
    blank_weight = float(ctc.get("blank_weight") or 0.0)
    if blank_weight == 0:
        return
    mode = ctc.get("blank_mode", "add")
    if mode == "add":
        mapped["lm_head.bias"][0] += blank_weight
    elif mode == "set":
        mapped["lm_head.weight"][0] = 0.0
        mapped["lm_head.bias"][0] = blank_weight
    else:
        raise ExportError(f"{path}: model.blank_mode is {mode!r}, which fairseq does not know either")


def vocabulary(symbols: List[str], units: str, path: str) -> Dict[str, int]:
    """The ``Wav2Vec2CTCTokenizer`` vocabulary (token -> index) for a fairseq target dictionary."""
    if list(symbols[:4]) != FAIRSEQ_SPECIALS:
        raise ExportError(
            f"{path}: the target dictionary starts {list(symbols[:4])}, not fairseq's {FAIRSEQ_SPECIALS}: "
            "its CTC blank (index 0) cannot be named for transformers")
    tokens = HF_SPECIALS + list(symbols[4:])
    if units == "spm":
        if "|" in symbols:
            raise ExportError(
                f"{path}: the SentencePiece dictionary has a '|' piece, which transformers' tokenizer "
                "always decodes as its word delimiter (a space) while fairseq keeps it")
        tokens = HF_SPECIALS + [s.replace(SPM_WORD_MARK, " ") for s in symbols[4:]]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        repeated = sorted({t for t in tokens if tokens.count(t) > 1})
        raise ExportError(f"{path}: the target dictionary has repeated symbols {repeated}")
    return vocab


def _import_transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ExportError(INSTALL_HINT) from None


def _check_output(dst: str) -> str:
    """The absolute folder to write; an ExportError if it exists and is not an empty folder."""
    if os.path.lexists(dst) and not (os.path.isdir(dst) and not os.path.islink(dst) and not os.listdir(dst)):
        raise ExportError(f"{dst}: already exists; not overwriting it (name a new or empty folder)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise ExportError(f"{dst}: no such folder {parent}")
    return os.path.abspath(dst)


def plan(src: str) -> dict:
    """Read checkpoint ``src`` and decide the export without transformers: kind, fairseq configs,
    vocabulary. Raises the ExportError that refuses it, naming ``src`` and the fields."""
    state = load_input(src)
    if is_bestrq(state):
        raise ExportError(
            f"{src}: a BEST-RQ (eq_bestrq) checkpoint; transformers has no BEST-RQ model, so --format hf "
            "cannot write it (eqssl-export's default --format pt writes it as plain PyTorch for "
            "torchaudio's Conformer)")
    if is_cpc(state):
        raise ExportError(
            f"{src}: a CPC (eq_cpc) checkpoint; transformers has no CPC model, so --format hf cannot write "
            "it (eqssl-export's default --format pt writes it as plain PyTorch, which "
            "examples/cpc_standalone.py rebuilds with torch alone)")
    stock = export_state(state, src)
    kind, cfg, ctc, prefix = _model_configs(stock)
    where = "model." if kind == PRETRAINING else "model.w2v_args.model."
    overridden = {key for key in CTC_OVERRIDES if ctc and ctc.get(key) is not None}
    fields = {key: ("model." if key in overridden else where) + key for key in REFUSED}
    reasons = refusal_reasons(cfg, kind, fields)
    task = stock["cfg"].get("task") or {}
    symbols, units = None, None
    if kind == FINETUNED:
        units = task.get("labels") or "ltr"
        if units not in LABEL_UNITS:
            reasons.append(f"task.labels is {units!r}: only letter (ltr) and SentencePiece (spm) "
                           "labels have a known transformers tokenizer")
        dictionary = (stock.get("task_state") or {}).get("target_dictionary")
        if dictionary is None:
            reasons.append("no target dictionary (task_state) for the tokenizer")
        else:
            symbols = [str(s) for s in dictionary.symbols]
    if reasons:
        raise ExportError(f"{src}: transformers' Wav2Vec2 cannot express this checkpoint: "
                          + "; ".join(reasons))
    check_weights_fit(stock, src)
    return {"kind": kind, "stock": stock, "cfg": cfg, "ctc": ctc, "prefix": prefix, "task": task,
            "units": units, "vocab": vocabulary(symbols, units, src) if kind == FINETUNED else None}


def export_hf(src: str, dst: str) -> Tuple[str, str]:
    """Write the Hugging Face folder of checkpoint ``src`` to ``dst`` (new, or an empty folder;
    never overwritten); returns (kind, what was written in words)."""
    dst = _check_output(dst)
    p = plan(src)
    kind, vocab = p["kind"], p["vocab"]
    transformers = _import_transformers()
    config = transformers.Wav2Vec2Config(**hf_config_kwargs(
        p["cfg"], kind, p["ctc"], p["stock"]["cfg"].get("criterion"), len(vocab) if vocab else None))
    model_class = transformers.Wav2Vec2ForCTC if kind == FINETUNED else transformers.Wav2Vec2ForPreTraining
    model = model_class(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    weights = map_weights(p["stock"]["model"], p["cfg"], kind, p["prefix"], shapes, p["ctc"], src)
    model.load_state_dict(weights, strict=True)
    model.eval()
    feature_extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=int(p["task"].get("sample_rate", 16000)), padding_value=0.0,
        do_normalize=bool(p["task"].get("normalize", False)),
        # as transformers does: layer-norm feature encoders take an attention mask, group-norm
        # ones (which normalise over time, padding included) are fed zero-padded audio alone
        return_attention_mask=config.feat_extract_norm == "layer",
    )

    partial = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=os.path.dirname(dst))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # a folder as mkdir makes it (mkdtemp's is private)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # one line of output, as for the other formats
    try:
        model.save_pretrained(partial)
        if kind == FINETUNED:
            vocab_file = os.path.join(partial, "vocab.json")
            with open(vocab_file, "w", encoding="utf-8") as f:
                json.dump(vocab, f, ensure_ascii=False)
            tokenizer = transformers.Wav2Vec2CTCTokenizer(
                vocab_file, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                # letters: '|' between words. SentencePiece: the '▁' marks are spaces already and
                # there is no '|' piece; transformers 5 reloads any other delimiter as '|' anyway
                word_delimiter_token="|", replace_word_delimiter_char=" ",
                do_lower_case=False, clean_up_tokenization_spaces=False,
            )
            processor = transformers.Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)
            processor.save_pretrained(partial)
        else:
            feature_extractor.save_pretrained(partial)
        os.replace(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if kind == FINETUNED:
        return kind, f"transformers Wav2Vec2ForCTC with its processor, {p['units']} vocabulary of {len(vocab)}"
    return kind, "transformers Wav2Vec2ForPreTraining with its feature extractor"
