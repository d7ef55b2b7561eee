"""fairseq model ``eq_bestrq``: BEST-RQ (Chiu et al. 2022, arXiv 2202.01855), the model of the
PTLOC paper's multi-domain results.

For masked frames it predicts the code that a *frozen* random-projection quantizer gives the input
features, so its targets never move (no quantizer to learn, no contrastive plateau):

    audio ─ log-mel (+Δ, ΔΔ), normalised per utterance ─ stack frames ─┬─ quantizer → targets
                                                                      └─ mask (noise) ─ linear ─ Conformer ─ linear → logits

The encoder is torchaudio's Conformer (``torchaudio.models.Conformer``), its layers run one by
one so that every layer's output is available (probe, fine-tuning). Stacking ``stack_frames``
10 ms frames is the model's subsampling (the paper stacks 2: 20 ms frames, 240 dimensions).

Determinism: the projection and codebook are drawn from ``quantizer_seed`` and stored in the
state dict (buffers), so a checkpoint carries its targets to resume, ``init_from``, fine-tuning and
export; they stay float32 whatever precision the network trains in. Masks are drawn like eqssl's
wav2vec 2.0 masks (from numpy's global generator) and the noise from torch's, both of which the
task seeds per batch, so a batch's loss is a function of the weights alone.
"""


import copy
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchaudio
from fairseq.data.data_utils import compute_mask_indices
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import merge_with_parent
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from omegaconf import DictConfig, open_dict
from torch import nn

from ..checkpoints import CheckpointError
from .eq_wav2vec2 import _numpy_drawn_seed, _set_defaults, load_pretraining_checkpoint

logger = logging.getLogger(__name__)

FRAME_LENGTH_SAMPLES = 400  # 25 ms at 16 kHz (Kaldi's default window)
FRAME_SHIFT_SAMPLES = 160  # 10 ms

# Fields that define the targets: a later round (init_from) must use the same ones.
QUANTIZER_FIELDS = ("sample_rate", "n_mels", "deltas", "stack_frames", "codebook_size",
                    "codebook_dim", "quantizer_seed")
# Fields that fix the encoder's shape: with init_from, taken from the checkpoint.
ARCHITECTURE_FIELDS = ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                       "encoder_attention_heads", "conv_kernel_size")


@dataclass
class EqBestRqConfig(FairseqDataclass):
    sample_rate: int = field(default=16000, metadata={"help": "audio sample rate the features expect"})
    n_mels: int = field(default=40, metadata={"help": "log-mel bins per 10 ms frame (Kaldi fbank, 25 ms window)"})
    deltas: int = field(default=2, metadata={"help": "0: log-mel only; 1: + delta; 2: + delta and delta-delta (the paper)"})
    stack_frames: int = field(
        default=2,
        metadata={"help": "adjacent 10 ms frames stacked into one model frame (the paper: 2, so "
                  "40 mels x 3 x 2 = 240 dimensions at 20 ms); the stacking is the subsampling"},
    )
    codebook_size: int = field(default=256, metadata={"help": "entries of the random-projection codebook (targets)"})
    codebook_dim: int = field(default=16, metadata={"help": "dimension the features are projected to before the codebook look-up"})
    quantizer_seed: int = field(
        default=1,
        metadata={"help": "seed of the frozen projection (Xavier) and codebook (unit-normalised "
                  "Gaussian); both are stored in the checkpoint, which wins over the seed on load"},
    )
    mask_prob: float = field(
        default=0.4,
        metadata={"help": "fraction of frames masked, fairseq's convention (mask_prob x frames / "
                  "mask_length spans, as wav2vec 2.0): the paper's per-frame start probability "
                  "0.02 with 20-frame spans is 0.4 here"},
    )
    mask_length: int = field(default=20, metadata={"help": "frames per masked span"})
    mask_noise_std: float = field(
        default=0.1 ** 0.5,
        metadata={"help": "masked frames are replaced by Gaussian noise of this standard deviation "
                  "(the paper: variance 0.1) in the normalised features"},
    )
    encoder_layers: int = field(default=10, metadata={"help": "Conformer blocks"})
    encoder_embed_dim: int = field(default=512, metadata={"help": "Conformer width"})
    encoder_ffn_embed_dim: int = field(default=2048, metadata={"help": "Conformer feed-forward width"})
    encoder_attention_heads: int = field(default=8, metadata={"help": "attention heads"})
    conv_kernel_size: int = field(default=31, metadata={"help": "depthwise convolution kernel of each block (odd)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the Conformer blocks and on the projected input"})
    init_from: Optional[str] = field(
        default=None,
        metadata={"help": "start from this eq_bestrq pre-training checkpoint (an earlier CSSL/PTLOC "
                  "round): its encoder shape replaces the recipe's, its quantizer (stored in it) "
                  "gives the targets, and the recipe's quantizer fields must match it"},
    )


def log_mel_features(wav: torch.Tensor, n_mels: int, deltas: int, stack_frames: int,
                     sample_rate: int = 16000) -> torch.Tensor:
    """(samples,) audio → (frames, n_mels x (1 + deltas) x stack_frames) features: Kaldi log-mel,
    deltas, each feature normalised to zero mean and unit variance over the utterance, stacked."""
    mel = torchaudio.compliance.kaldi.fbank(
        wav.float().unsqueeze(0) * 32768, num_mel_bins=n_mels, sample_frequency=sample_rate, dither=0.0)
    parts = [mel]
    for _ in range(deltas):
        parts.append(torchaudio.functional.compute_deltas(parts[-1].T).T)
    features = torch.cat(parts, dim=-1)
    features = (features - features.mean(0)) / (features.std(0) + 1e-5)
    frames = features.shape[0] // stack_frames
    return features[: frames * stack_frames].reshape(frames, -1)


class RandomProjectionQuantizer(nn.Module):
    """BEST-RQ's frozen quantizer: the code of a frame is the nearest unit-norm codebook entry to
    its L2-normalised random projection. Projection and codebook are buffers (saved, never trained)."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        projection = nn.init.xavier_uniform_(torch.empty(input_dim, codebook_dim), generator=generator)
        codebook = F.normalize(torch.randn(codebook_size, codebook_dim, generator=generator), dim=-1)
        self.register_buffer("projection", projection)
        self.register_buffer("codebook", codebook)

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) → (...) codes; for unit vectors the nearest is the largest dot product."""
        projected = F.normalize(features.float() @ self.projection, dim=-1)
        return (projected @ self.codebook.T).argmax(dim=-1)

    def _apply(self, fn, recurse=True):
        # .half() / .to(bfloat16) would round the codebook and change the targets: follow the
        # device only.
        device = fn(torch.zeros((), device=self.codebook.device)).device
        self.projection = self.projection.to(device)
        self.codebook = self.codebook.to(device)
        return self


def check_init_checkpoint(path: str, cfg: EqBestRqConfig) -> dict:
    """The init_from checkpoint, refused with the reason unless it is an eq_bestrq pre-training
    checkpoint whose quantizer fields equal the recipe's."""
    state = load_pretraining_checkpoint(path, family="eq_bestrq")
    source = state["cfg"]["model"]
    for key in QUANTIZER_FIELDS:
        if key in source and source[key] != cfg[key]:
            raise CheckpointError(
                f"model.{key}={cfg[key]} but model.init_from={path} was pre-trained with "
                f"{key}={source[key]}: the targets would change; set model.{key}={source[key]}"
            )
    return state


def _padded_convolution(module, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """torchaudio's Conformer convolution module on (B, T, C) with padded frames kept out: they
    are zeroed before the depthwise convolution (the zeros an unpadded clip sees past its end)
    and left out of the GroupNorm's statistics. torchaudio convolves and normalises over the
    padding, so a clip's output would depend on the longest clip of its batch."""
    pointwise, glu, depthwise, norm, activation, pointwise_out, dropout = module.sequential
    if not isinstance(norm, nn.GroupNorm) or norm.num_groups != 1:
        raise TypeError("eq_bestrq's Conformer must use GroupNorm(1, channels) (use_group_norm=True)")
    valid = (~padding).unsqueeze(1)  # (B, 1, T)
    y = depthwise(glu(pointwise(module.layer_norm(x).transpose(1, 2))).masked_fill(~valid, 0.0))
    count = valid.sum(-1, keepdim=True).float() * y.shape[1]  # (B, 1, 1) values per clip
    y32 = y.float().masked_fill(~valid, 0.0)
    mean = y32.sum((1, 2), keepdim=True) / count
    var = ((y32 - mean).masked_fill(~valid, 0.0) ** 2).sum((1, 2), keepdim=True) / count
    y = ((y32 - mean) * torch.rsqrt(var + norm.eps)).to(y.dtype)
    y = y * norm.weight[:, None] + norm.bias[:, None]
    return dropout(pointwise_out(activation(y))).transpose(1, 2)


def conformer_block(block, x: torch.Tensor, padding: Optional[torch.Tensor]) -> torch.Tensor:
    """torchaudio's ``ConformerLayer.forward`` on (T, B, C), ``padding`` (B, T) True at padding,
    with the convolution module of :func:`_padded_convolution`: a clip's frames come out the same
    in any batch (without padding it is torchaudio's own forward)."""
    if padding is None:
        return block(x, None)

    def convolution(x):
        return x + _padded_convolution(block.conv_module, x.transpose(0, 1), padding).transpose(0, 1)

    x = block.ffn1(x) * 0.5 + x
    if block.convolution_first:
        x = convolution(x)
    residual = x
    x = block.self_attn_layer_norm(x)
    x, _ = block.self_attn(query=x, key=x, value=x, key_padding_mask=padding, need_weights=False)
    x = block.self_attn_dropout(x) + residual
    if not block.convolution_first:
        x = convolution(x)
    x = block.ffn2(x) * 0.5 + x
    return block.final_layer_norm(x)


# Keys fairseq's wav2vec_ctc wrapper writes into any encoder's config before building it.
CTC_WRAPPER_KEYS = ("checkpoint_activations", "layer_type", "adp_num", "adp_dim", "adp_act_fn", "adp_trf_idx")


def _without_wrapper_keys(cfg):
    """A copy of a model config without the wav2vec_ctc wrapper's keys (meaningless here)."""
    if not isinstance(cfg, DictConfig) or not any(key in cfg for key in CTC_WRAPPER_KEYS):
        return cfg
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in CTC_WRAPPER_KEYS:
            cfg.pop(key, None)
    return cfg


@register_model("eq_bestrq", dataclass=EqBestRqConfig)
class EqBestRqModel(BaseFairseqModel):
    """BEST-RQ with a torchaudio Conformer; see the module docstring."""

    audio_dtype = torch.float64
    """The dtype the task hands the audio in: fairseq's fp16/bf16 trainer casts every float32
    tensor of a batch to 16 bits, which would change the log-mel features and so the targets
    (2-12 % of them on a toy batch); float64 it leaves alone."""

    def __init__(self, cfg: EqBestRqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        feature_dim = cfg.n_mels * (1 + cfg.deltas) * cfg.stack_frames
        self.feature_dim = feature_dim
        self.quantizer = RandomProjectionQuantizer(feature_dim, cfg.codebook_size, cfg.codebook_dim,
                                                   cfg.quantizer_seed)
        self.input_projection = nn.Linear(feature_dim, cfg.encoder_embed_dim)
        self.dropout_input = nn.Dropout(cfg.dropout)
        # GroupNorm in the convolution module, not BatchNorm: no running statistics, so a batch's
        # loss depends on the weights alone (inner steps, the gap, workers that must agree).
        self.encoder = torchaudio.models.Conformer(
            input_dim=cfg.encoder_embed_dim, num_heads=cfg.encoder_attention_heads,
            ffn_dim=cfg.encoder_ffn_embed_dim, num_layers=cfg.encoder_layers,
            depthwise_conv_kernel_size=cfg.conv_kernel_size, dropout=cfg.dropout, use_group_norm=True,
        )
        self.head = nn.Linear(cfg.encoder_embed_dim, cfg.codebook_size)
        self.num_updates = 0

    @classmethod
    def build_model(cls, cfg: EqBestRqConfig, task=None) -> "EqBestRqModel":
        cfg = merge_with_parent(EqBestRqConfig(), _without_wrapper_keys(cfg))
        if cfg.conv_kernel_size % 2 == 0:
            raise ValueError(f"model.conv_kernel_size must be odd, got {cfg.conv_kernel_size}")
        if task is not None and getattr(task.cfg, "sample_rate", cfg.sample_rate) != cfg.sample_rate:
            raise ValueError(f"task.sample_rate={task.cfg.sample_rate} but model.sample_rate="
                             f"{cfg.sample_rate}: the log-mel features are defined at the model's rate")
        state = None
        if cfg.init_from:
            state = check_init_checkpoint(cfg.init_from, cfg)
            with open_dict(cfg):
                for key in ARCHITECTURE_FIELDS:
                    cfg[key] = state["cfg"]["model"][key]
        model = cls(cfg)
        if state is not None:
            missing, unexpected = model.load_state_dict(state["model"], strict=False)
            if missing or unexpected:
                raise CheckpointError(
                    f"model.init_from={cfg.init_from}: weights do not fit the architecture "
                    f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
            logger.info("initialised from %s (%d updates)", cfg.init_from,
                        (state.get("optimizer_history") or [{}])[-1].get("num_updates", 0))
        return model

    def actualised_config(self) -> dict:
        """Shape fields to write back into the run's config (checkpoints rebuild without init_from)."""
        return {key: self.cfg[key] for key in ARCHITECTURE_FIELDS}

    def min_input_samples(self) -> int:
        """Shortest clip that gives one full masked span plus one frame: anything shorter has no target."""
        frames = self.cfg.stack_frames * (self.cfg.mask_length + 1)
        return FRAME_LENGTH_SAMPLES + FRAME_SHIFT_SAMPLES * (frames - 1)

    def set_num_updates(self, num_updates: int) -> None:
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def features(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batched audio (B, samples) → features (B, frames, feature_dim) float32, zero-padded,
        and the frame padding mask (B, frames), True at padding."""
        lengths = (source.shape[1] - padding_mask.sum(1) if padding_mask is not None
                   else torch.full((source.shape[0],), source.shape[1]))
        per_clip = []
        for wav, length in zip(source, lengths.tolist()):
            if length < FRAME_LENGTH_SAMPLES + FRAME_SHIFT_SAMPLES * (2 * self.cfg.stack_frames - 1):
                raise ValueError(f"a clip of {length} samples is too short for two model frames")
            per_clip.append(log_mel_features(wav[:length], self.cfg.n_mels, self.cfg.deltas,
                                             self.cfg.stack_frames, self.cfg.sample_rate))
        frames = torch.tensor([f.shape[0] for f in per_clip], device=source.device)
        features = nn.utils.rnn.pad_sequence(per_clip, batch_first=True).to(source.device)
        frame_padding = torch.arange(features.shape[1], device=source.device)[None, :] >= frames[:, None]
        return features, frame_padding

    def _mask(self, features: torch.Tensor, frame_padding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Replace spans of frames by Gaussian noise; the mask (B, frames), True where masked."""
        batch, frames, _ = features.shape
        mask = torch.from_numpy(compute_mask_indices(
            (batch, frames), frame_padding if frame_padding.any() else None, self.cfg.mask_prob,
            self.cfg.mask_length, min_masks=1, **_numpy_drawn_seed(batch),
        )).to(features.device) & ~frame_padding
        noise = torch.randn(features.shape, dtype=features.dtype).to(features.device) * self.cfg.mask_noise_std
        return torch.where(mask[..., None], noise, features), mask

    def _encode(self, features: torch.Tensor, frame_padding: torch.Tensor,
                layer: Optional[int] = None) -> List[torch.Tensor]:
        """Input projection and Conformer blocks (up to ``layer``, 0-based): each block's (T, B, C) output."""
        x = self.input_projection(features.to(self.input_projection.weight.dtype))
        x = self.dropout_input(x.masked_fill(frame_padding[..., None], 0.0)).transpose(0, 1)
        key_padding = frame_padding if frame_padding.any() else None
        outputs: List[torch.Tensor] = []
        for i, block in enumerate(self.encoder.conformer_layers):
            x = conformer_block(block, x, key_padding)
            outputs.append(x)
            if layer is not None and i == layer:
                break
        return outputs

    def extract_features(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                         mask: bool = False, layer: Optional[int] = None, **kwargs) -> Dict[str, object]:
        """What fairseq's ``wav2vec_ctc`` encoder wrapper and the probe call: ``x`` (B, T, C) the
        last (or ``layer``-th, 0-based) block's output, ``padding_mask`` (B, T), ``layer_results``
        [(T, B, C), None, None] per block; with ``mask`` the masked input as in pre-training."""
        features, frame_padding = self.features(source, padding_mask)
        masked = None
        if mask:
            features, masked = self._mask(features, frame_padding)
        outputs = self._encode(features, frame_padding, layer)
        return {"x": outputs[-1].transpose(0, 1), "padding_mask": frame_padding,
                "layer_results": [(x, None, None) for x in outputs], "mask_indices": masked,
                "features": features}

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                mask: bool = True, **kwargs) -> Dict[str, torch.Tensor]:
        """Pre-training pass: ``logits`` (masked frames, codebook_size) and their ``targets``."""
        features, frame_padding = self.features(source, padding_mask)
        targets = self.quantizer(features)
        masked_features, masked = self._mask(features, frame_padding)
        x = self._encode(masked_features, frame_padding)[-1].transpose(0, 1)
        return {"logits": self.head(x[masked]).float(), "targets": targets[masked],
                "frames": int((~frame_padding).sum())}

    def remove_pretraining_modules(self, last_layer: Optional[int] = None) -> None:
        """For fine-tuning: the quantizer and the code head go (their weights are ignored on load)."""
        self.quantizer = None
        self.head = None
        if last_layer is not None:
            self.encoder.conformer_layers = nn.ModuleList(
                block for i, block in enumerate(self.encoder.conformer_layers) if i <= last_layer)


@register_model_architecture("eq_bestrq", "eq_bestrq_tiny")
def eq_bestrq_tiny(args) -> None:
    """About 0.2M parameters: many updates per second on 2 CPU cores; for tests and the main job."""
    _set_defaults(args, encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
                  encoder_attention_heads=2, conv_kernel_size=15, dropout=0.0)


@register_model_architecture("eq_bestrq", "eq_bestrq_small")
def eq_bestrq_small(args) -> None:
    """About 1M parameters: the CPU experiment's size."""
    _set_defaults(args, encoder_layers=4, encoder_embed_dim=96, encoder_ffn_embed_dim=384,
                  encoder_attention_heads=4, conv_kernel_size=15, dropout=0.1)


@register_model_architecture("eq_bestrq", "eq_bestrq_base")
def eq_bestrq_base(args) -> None:
    """The paper's Conformer: 10 blocks x 512, 8 heads, kernel 31 (about 70M parameters)."""
    _set_defaults(args, encoder_layers=10, encoder_embed_dim=512, encoder_ffn_embed_dim=2048,
                  encoder_attention_heads=8, conv_kernel_size=31, dropout=0.1)
