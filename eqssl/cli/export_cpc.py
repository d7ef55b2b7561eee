"""Export an eq_cpc checkpoint (pre-training, or wav2vec_ctc fine-tuned) as plain PyTorch data.

fairseq has no CPC with a causal Conformer, so there is no stock checkpoint to write; instead
``eqssl-export`` writes a ``torch.save`` file of tensors, numbers, booleans and strings only (it
loads with ``torch.load(path, weights_only=True)``, without eqssl or fairseq)::

    {"format": "eqssl-cpc/1",
     "kind": "pretraining" | "finetuned",
     "config": {sample_rate, normalize, encoder_channels, context_kernel_size, encoder_layers,
                encoder_embed_dim, encoder_ffn_embed_dim, encoder_attention_heads,
                conv_kernel_size, prediction_steps, num_negatives},
     "network": {...},           # state dict of eq_cpc's encoder, context convolution and blocks,
                                 # under eq_cpc's own names (encoder.*, context_convolution.*, blocks.*)
     "heads": {...},             # pretraining only: the prediction maps W_k (heads.<k-1>.weight)
     "head": {weight, bias},     # finetuned only: the CTC layer over the vocabulary
     "vocabulary": [symbol, ...]}  # finetuned only; index 0 is the CTC blank

``normalize`` is the task's: whether each clip was scaled to zero mean and unit variance before
the network. ``examples/cpc_standalone.py`` rebuilds the network from it with torch alone and is
the reference for anyone loading it elsewhere.
"""

from .export_bestrq import _take

FORMAT = "eqssl-cpc/1"
CONFIG_FIELDS = ("sample_rate", "encoder_channels", "context_kernel_size", "encoder_layers", "encoder_embed_dim",
                 "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_kernel_size", "prediction_steps",
                 "num_negatives")
NETWORK = ("encoder.", "context_convolution.", "blocks.")
"""The prefixes of eq_cpc's state dict that every export carries (the heads are pre-training's)."""


class CpcExportError(ValueError):
    """A CPC checkpoint that cannot be exported; the message names the file."""


def encoder_config(state: dict) -> dict:
    """The eq_cpc model config of a checkpoint: its own, or the one inside a wav2vec_ctc model."""
    model_cfg = state["cfg"]["model"]
    if model_cfg.get("_name") == "wav2vec_ctc":
        return (model_cfg.get("w2v_args") or {}).get("model") or {}
    return model_cfg


def is_cpc(state: dict) -> bool:
    """Whether a fairseq checkpoint holds eq_cpc, pre-trained or inside a wav2vec_ctc model."""
    return str(encoder_config(state).get("_name")).startswith("eq_cpc")


def export_cpc_state(state: dict, path: str = "<checkpoint>") -> dict:
    """The plain export of an eq_cpc checkpoint; every tensor of it is placed or it is an error."""
    from ..models.eq_cpc import EqCpcConfig

    model_cfg = state["cfg"]["model"]
    finetuned = model_cfg.get("_name") == "wav2vec_ctc"
    cpc_cfg = encoder_config(state)
    defaults = EqCpcConfig()
    config = {key: int(cpc_cfg[key]) if key in cpc_cfg and cpc_cfg[key] is not None else int(getattr(defaults, key))
              for key in CONFIG_FIELDS}
    task_cfg = (model_cfg["w2v_args"].get("task") if finetuned else state["cfg"].get("task")) or {}
    config["normalize"] = bool(task_cfg.get("normalize", False))
    prefix = "w2v_encoder.w2v_model." if finetuned else ""
    weights = dict(state["model"])
    network = {}
    for part in NETWORK:
        network.update({part + k: v for k, v in _take(weights, prefix + part).items()})
    exported = {"format": FORMAT, "kind": "finetuned" if finetuned else "pretraining", "config": config,
                "network": network}
    heads = _take(weights, prefix + "heads.")
    if finetuned:
        # fine-tuning drops the prediction heads (remove_pretraining_modules); none should be left
        exported["head"] = _take(weights, "w2v_encoder.proj.")
        dictionary = (state.get("task_state") or {}).get("target_dictionary")
        if dictionary is None:
            raise CpcExportError(f"{path}: a fine-tuned checkpoint without its target dictionary")
        exported["vocabulary"] = [str(symbol) for symbol in dictionary.symbols]
        if not exported["head"]:
            raise CpcExportError(f"{path}: no weights for the CTC layer (w2v_encoder.proj); not a wav2vec_ctc "
                                 "model around eq_cpc")
    else:
        exported["heads"] = heads
        if len(heads) != config["prediction_steps"]:
            raise CpcExportError(f"{path}: {len(heads)} prediction maps for prediction_steps="
                                 f"{config['prediction_steps']}; not an eq_cpc pre-training network")
    if weights:
        raise CpcExportError(f"{path}: tensors the export does not account for: {sorted(weights)[:5]}")
    missing = [part.rstrip(".") for part in NETWORK if not any(k.startswith(part) for k in network)]
    if missing:
        raise CpcExportError(f"{path}: no weights for {missing}; not an eq_cpc network")
    return exported
