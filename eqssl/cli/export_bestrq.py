"""Export an eq_bestrq checkpoint (pre-training, or wav2vec_ctc fine-tuned) as plain PyTorch data.

fairseq has no BEST-RQ, so there is no stock checkpoint to write; instead ``eqssl-export`` writes a
``torch.save`` file of tensors, numbers and strings only (it loads with ``torch.load(path,
weights_only=True)``, without eqssl or fairseq)::

    {"format": "eqssl-bestrq/1",
     "kind": "pretraining" | "finetuned",
     "features": {sample_rate, n_mels, deltas, stack_frames},   # Kaldi fbank, 25/10 ms, no dither
     "conformer": {input_dim, num_heads, ffn_dim, num_layers, depthwise_conv_kernel_size,
                   dropout, use_group_norm},                   # torchaudio.models.Conformer(**...)
     "input_projection": {weight, bias},                       # torch.nn.Linear(feature_dim, input_dim)
     "conformer_state": {...},                                  # Conformer.load_state_dict
     "head": {weight, bias},       # pretraining: Linear to the codebook; finetuned: Linear to the vocabulary
     "quantizer": {projection, codebook},                        # pretraining only: the frozen targets
     "vocabulary": [symbol, ...]}                                # finetuned only; index 0 is the CTC blank

``examples/bestrq_standalone.py`` rebuilds the network from it with torch and torchaudio alone
(features, encoder, head) and is the reference for anyone loading it elsewhere.
"""

from typing import Dict, List

import torch

FORMAT = "eqssl-bestrq/1"
FEATURE_FIELDS = ("sample_rate", "n_mels", "deltas", "stack_frames")


class BestRqExportError(ValueError):
    """A BEST-RQ checkpoint that cannot be exported; the message names the file."""


def is_bestrq(state: dict) -> bool:
    """Whether a fairseq checkpoint holds eq_bestrq, pre-trained or inside a wav2vec_ctc model."""
    model_cfg = state["cfg"]["model"]
    if model_cfg.get("_name") == "wav2vec_ctc":
        model_cfg = (model_cfg.get("w2v_args") or {}).get("model") or {}
    return str(model_cfg.get("_name")).startswith("eq_bestrq")


def _take(weights: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Remove and return the tensors under ``prefix`` (prefix stripped)."""
    keys = [k for k in weights if k.startswith(prefix)]
    return {k[len(prefix):]: weights.pop(k) for k in keys}


def export_bestrq_state(state: dict, path: str = "<checkpoint>") -> dict:
    """The plain export of an eq_bestrq checkpoint; every tensor of it is placed or it is an error."""
    model_cfg = state["cfg"]["model"]
    finetuned = model_cfg.get("_name") == "wav2vec_ctc"
    encoder_cfg = model_cfg["w2v_args"]["model"] if finetuned else model_cfg
    prefix = "w2v_encoder.w2v_model." if finetuned else ""
    weights = dict(state["model"])
    exported = {
        "format": FORMAT,
        "kind": "finetuned" if finetuned else "pretraining",
        "features": {key: int(encoder_cfg[key]) for key in FEATURE_FIELDS},
        "conformer": {
            "input_dim": int(encoder_cfg["encoder_embed_dim"]),
            "num_heads": int(encoder_cfg["encoder_attention_heads"]),
            "ffn_dim": int(encoder_cfg["encoder_ffn_embed_dim"]),
            "num_layers": int(encoder_cfg["encoder_layers"]),
            "depthwise_conv_kernel_size": int(encoder_cfg["conv_kernel_size"]),
            "dropout": float(encoder_cfg["dropout"]),
            "use_group_norm": True,
        },
        "input_projection": _take(weights, prefix + "input_projection."),
        "conformer_state": _take(weights, prefix + "encoder."),
    }
    if finetuned:
        # the pre-training head and quantizer are in the state dict but unused by fine-tuning
        _take(weights, prefix + "head.")
        _take(weights, prefix + "quantizer.")
        exported["head"] = _take(weights, "w2v_encoder.proj.")
        dictionary = (state.get("task_state") or {}).get("target_dictionary")
        if dictionary is None:
            raise BestRqExportError(f"{path}: a fine-tuned checkpoint without its target dictionary")
        exported["vocabulary"] = [str(symbol) for symbol in dictionary.symbols]
    else:
        exported["head"] = _take(weights, "head.")
        exported["quantizer"] = _take(weights, "quantizer.")
    if weights:
        raise BestRqExportError(f"{path}: tensors the export does not account for: {sorted(weights)[:5]}")
    empty = [name for name in ("input_projection", "conformer_state", "head") if not exported[name]]
    if empty:
        raise BestRqExportError(f"{path}: no weights for {empty}; not an eq_bestrq network")
    return exported


def vocabulary(exported: dict) -> List[str]:
    """The fine-tuned export's output symbols (index 0, fairseq's <s>, is the CTC blank)."""
    return list(exported.get("vocabulary") or [])
