"""fairseq model ``eq_wav2vec2``: fairseq's wav2vec 2.0, startable from any released checkpoint.

The network is fairseq's ``Wav2Vec2Model`` unchanged (same state dict, so eqssl checkpoints load
wherever wav2vec 2.0 ones do). What it adds is ``init_from``: start from a stock fairseq wav2vec
2.0 checkpoint (``wav2vec_small.pt``, XLS-R, …) or from an earlier eqssl round, taking the
architecture from that checkpoint.
"""


import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq.checkpoint_utils import load_checkpoint_to_cpu
from fairseq.data.data_utils import compute_mask_indices
from fairseq.dataclass.utils import merge_with_parent
from fairseq.models import register_model, register_model_architecture
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model
from fairseq.utils import safe_getattr
from omegaconf import open_dict

from ..checkpoints import CheckpointError, load_failure

logger = logging.getLogger(__name__)

# Fields that fix the shape of the network (and so of the state dict). With init_from they are
# taken from the checkpoint; everything else (dropout, masking, negatives) stays the recipe's.
ARCHITECTURE_FIELDS = (
    "extractor_mode", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
    "encoder_attention_heads", "activation_fn", "layer_type", "final_dim", "layer_norm_first",
    "conv_feature_layers", "conv_bias", "quantize_targets", "quantize_input", "same_quantizer",
    "target_glu", "quantizer_depth", "quantizer_factor", "latent_vars", "latent_groups",
    "latent_dim", "conv_pos", "conv_pos_groups", "pos_conv_depth", "max_positions",
    "depthwise_conv_kernel_size", "attn_type", "pos_enc_type", "adp_num", "adp_dim",
    "adp_act_fn", "adp_trf_idx",
)


@dataclass
class EqWav2Vec2Config(Wav2Vec2Config):
    init_from: Optional[str] = field(
        default=None,
        metadata={
            "help": "start from this wav2vec 2.0 pre-training checkpoint: a stock fairseq one "
            "(model wav2vec2, task audio_pretraining, e.g. wav2vec_small.pt or XLS-R) or an eqssl "
            "one (an earlier CSSL/PTLOC round). Its architecture replaces the model fields that "
            "fix the network's shape; optimizer and schedule start fresh. On resume the file is "
            "read again and checkpoint_last.pt's weights then replace it; the run's checkpoints "
            "record the architecture, so they load without it"
        },
    )


# Pre-training model families eqssl trains, by the model names their checkpoints record.
PRETRAINING_FAMILIES = {
    "eq_wav2vec2": ("wav2vec 2.0", ("wav2vec2", "eq_wav2vec2")),
    "eq_bestrq": ("BEST-RQ", ("eq_bestrq",)),
    "eq_cpc": ("CPC", ("eq_cpc",)),
}


def checkpoint_family(name: Optional[str]) -> Optional[str]:
    """The eqssl model (eq_wav2vec2, eq_bestrq, eq_cpc) that builds a checkpoint's recorded model name."""
    for family, (_, names) in PRETRAINING_FAMILIES.items():
        if name in names or str(name).startswith(family + "_"):
            return family
    return None


FINETUNED_MODELS = ("wav2vec_ctc", "wav2vec_seq2seq")
"""fairseq's models fine-tuned from a pre-training one (w2v_path / w2v_args)."""


def load_pretraining_checkpoint(path: str, family: Optional[str] = None, given_as: str = "model.init_from=") -> dict:
    """Load a pre-training checkpoint on CPU (of ``family`` if given: eq_wav2vec2, eq_bestrq or eq_cpc),
    with a one-line error for anything else, naming the file as the user gave it
    (``given_as``: ``model.init_from=`` for the model field, ``upstream `` for a command's argument)."""
    named = f"{given_as}{path}"
    if not os.path.isfile(path):
        raise CheckpointError(f"{named}: no such file")
    try:
        # Old releases pickle an argparse.Namespace; allow it and nothing else arbitrary.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = load_checkpoint_to_cpu(path)
    except Exception as error:
        raise CheckpointError(f"{named}: {load_failure(path, error)}") from None
    model_cfg = (state.get("cfg") or {}).get("model") if isinstance(state, dict) else None
    if not isinstance(state, dict) or "model" not in state or model_cfg is None:
        raise CheckpointError(f"{named}: not a fairseq checkpoint (no model weights/config)")
    name = model_cfg.get("_name") if hasattr(model_cfg, "get") else None
    found = checkpoint_family(name)
    wanted = [family] if family else list(PRETRAINING_FAMILIES)
    if found not in wanted:
        expected = " or ".join(f"{PRETRAINING_FAMILIES[f][0]} ({' / '.join(PRETRAINING_FAMILIES[f][1])})"
                               for f in wanted)
        raise CheckpointError(
            f"{named}: holds a {name!r} model, not a {expected} pre-training model"
            + ("; a fine-tuned checkpoint: give the pre-training checkpoint it started from"
               if name in FINETUNED_MODELS else "")
        )
    return state


def build_from_checkpoint_config(state: dict):
    """A freshly initialised network of the architecture a pre-training checkpoint records."""
    from fairseq.models import MODEL_DATACLASS_REGISTRY, MODEL_REGISTRY
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.create(dict(state["cfg"]["model"]))
    name = checkpoint_family(model_cfg.get("_name"))
    model_cfg.init_from = None
    model_cfg._name = name
    return MODEL_REGISTRY[name].build_model(merge_with_parent(MODEL_DATACLASS_REGISTRY[name](), model_cfg))


def save_random_init(source: str, out: str, seed: int) -> str:
    """The no-pre-training control: a checkpoint with source's architecture and config but freshly
    initialised weights (torch seed ``seed``), with no optimizer state and 0 updates. It fine-tunes
    and probes like any pre-training checkpoint. Refuses to overwrite ``out``."""
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; not overwritten")
    state = load_pretraining_checkpoint(source)
    torch.manual_seed(seed)
    model = build_from_checkpoint_config(state)
    history = dict(state["optimizer_history"][-1], num_updates=0)
    history.pop("optimizer", None)
    control = {"cfg": state["cfg"], "model": model.state_dict(), "optimizer_history": [history],
               "extra_state": {"eqssl_random_init": {"architecture_from": os.path.abspath(source), "seed": seed}},
               "last_optimizer_state": None}
    tmp = out + ".tmp"
    torch.save(control, tmp)
    os.replace(tmp, out)
    return out


@register_model("eq_wav2vec2", dataclass=EqWav2Vec2Config)
class EqWav2Vec2Model(Wav2Vec2Model):
    """fairseq's wav2vec 2.0; see the module docstring."""

    @classmethod
    def build_model(cls, cfg: EqWav2Vec2Config, task=None):
        # A named size (_name: eq_wav2vec2_tiny) arrives as a partial config: fill in the defaults.
        cfg = merge_with_parent(EqWav2Vec2Config(), cfg)
        if cfg.no_mask_overlap or cfg.no_mask_channel_overlap:
            raise ValueError(
                "model.no_mask_overlap / no_mask_channel_overlap run fairseq code that uses np.int, "
                "removed in numpy 1.24; eqssl pins numpy 2, so leave them false"
            )
        state = None
        if cfg.init_from:
            state = load_pretraining_checkpoint(cfg.init_from, family="eq_wav2vec2")
            source = state["cfg"]["model"]
            with open_dict(cfg):
                for key in ARCHITECTURE_FIELDS:
                    if key in source and key in cfg:
                        cfg[key] = source[key]
        model = cls(cfg)
        if state is not None:
            weights = model.upgrade_state_dict(state["model"]) or state["model"]
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise CheckpointError(
                    f"model.init_from={cfg.init_from}: weights do not fit the architecture "
                    f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
                )
            logger.info("initialised from %s (%s, %d updates)", cfg.init_from, source.get("_name"),
                        (state.get("optimizer_history") or [{}])[-1].get("num_updates", 0))
        return model

    def apply_mask(self, x, padding_mask, mask_indices=None, mask_channel_indices=None):
        # fairseq draws the time masks from np.random.default_rng(None), i.e. fresh OS entropy
        # on every call: no two runs (and no two evaluations of one shard's loss) mask alike.
        # Drawing their seed from numpy's global generator makes them follow np.random.seed,
        # which the equilibrium update and resuming rely on.
        batch, frames, channels = x.shape
        if self.mask_prob > 0 and mask_indices is None:
            mask_indices = torch.from_numpy(compute_mask_indices(
                (batch, frames), padding_mask, self.mask_prob, self.mask_length,
                self.mask_selection, self.mask_other, min_masks=2,
                no_overlap=self.no_mask_overlap, min_space=self.mask_min_space,
                require_same_masks=self.cfg.require_same_masks, mask_dropout=self.cfg.mask_dropout,
                **_numpy_drawn_seed(batch),
            )).to(x.device)
        if self.mask_channel_prob > 0 and not self.mask_channel_before and mask_channel_indices is None:
            mask_channel_indices = torch.from_numpy(compute_mask_indices(
                (batch, channels), None, self.mask_channel_prob, self.mask_channel_length,
                self.mask_channel_selection, self.mask_channel_other,
                no_overlap=self.no_mask_channel_overlap, min_space=self.mask_channel_min_space,
                **_numpy_drawn_seed(batch),
            )).to(x.device).unsqueeze(1).expand(-1, frames, -1)
        return super().apply_mask(x, padding_mask, mask_indices, mask_channel_indices)

    def actualised_config(self) -> dict:
        """The shape fields this model was built with, to write back into the run's config so
        that its checkpoints rebuild without the init_from file."""
        return {key: self.cfg[key] for key in ARCHITECTURE_FIELDS if key in self.cfg}


def _numpy_drawn_seed(batch: int) -> dict:
    """compute_mask_indices arguments that seed each example's mask from np.random."""
    return {"seed": int(np.random.randint(2**31 - 1)), "epoch": 1, "indices": torch.arange(batch)}


def _set_defaults(args, **defaults) -> None:
    for key, value in defaults.items():
        setattr(args, key, safe_getattr(args, key, value))


@register_model_architecture("eq_wav2vec2", "eq_wav2vec2_tiny")
def eq_wav2vec2_tiny(args) -> None:
    """A few hundred thousand parameters: several updates per second on 2 CPU cores; for tests and demos."""
    _set_defaults(
        args,
        encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
        encoder_attention_heads=2, final_dim=32, latent_vars=32, latent_groups=2,
        conv_feature_layers="[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2",
        conv_pos=16, conv_pos_groups=4, quantize_targets=True, num_negatives=10,
        mask_prob=0.5, mask_length=5, feature_grad_mult=0.1, encoder_layerdrop=0.0,
        dropout_input=0.1, dropout_features=0.1,
    )


@register_model_architecture("eq_wav2vec2", "eq_wav2vec2_base")
def eq_wav2vec2_base(args) -> None:
    """The published wav2vec 2.0 BASE shape (95M parameters), as fairseq's wav2vec2_base_librispeech."""
    _set_defaults(
        args,
        encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
        encoder_attention_heads=12, final_dim=256, latent_vars=320, latent_groups=2,
        quantize_targets=True, encoder_layerdrop=0.05, dropout_input=0.1, dropout_features=0.1,
        feature_grad_mult=0.1,
    )
