"""fairseq model ``eq_cpc``: contrastive predictive coding (van den Oord et al. 2018, arXiv
1807.03748) with a causal Conformer context, the model of the PTLOC paper's multilingual results.

From the context c_t of frame t it tells the encoding z_{t+k} of the frame k steps ahead from
``num_negatives`` other frames of the same clip, for k = 1 … ``prediction_steps``:

    audio ─ 5 Conv1d, stride 160 ─ z_t ─┬─────────────────────────────────────────── z_{t+k}, N negatives ─┐
                                        └─ causal Conv1d (kernel 3) ─ causal Conformer ─ c_t ─ W_k ────────┴─ ⟨W_k c_t, z⟩

The paper gives only: raw audio, "a 1D convolutional layer with a kernel size of 3", a Conformer of
8 blocks x 512 (8 heads, kernel 31, 59M parameters), "a context length of 256 samples" and 12
positives and 12 negatives per instance. eqssl's reading of what it leaves open
(``/work/shared/METHOD.md``, "CPC as eqssl builds it"):

- Frame rate: CPC_audio's ``CPCEncoder`` (kernels 10/8/4/4/4, strides 5/4/2/2/2): one frame per
  160 samples (10 ms at 16 kHz), receptive field 465 samples. Its convolutions are unpadded, so
  a clip's valid frames see its own samples only; frame counts follow from sample counts by the
  convolution formula. Its norm is per frame over channels (CPC_audio's ChannelNorm, here
  LayerNorm): nothing pools over time or over the batch. Unlike CPC_audio its convolutions have
  no bias (as wav2vec 2.0's): see :class:`FrameEncoder`.
- Causality: c_t must not see z_{t+1…}, or predicting z_{t+k} is copying. The kernel-3 and the
  depthwise convolutions are padded on the left only, attention is masked upper-triangularly, and
  the convolution module normalises per frame (LayerNorm, not torchaudio's Batch/GroupNorm, which
  pool over time). Because valid frames are a prefix of the padded batch and nothing looks ahead,
  a clip's outputs also do not depend on the padding of its batch.
- Prediction: one linear map W_k per step (CPC_audio's ``PredictionNetwork``), no bias: the score
  is the bilinear ⟨W_k c_t, z⟩. W_k starts small so that an untrained model scores every
  candidate alike (loss log 13, accuracy 1/13), a baseline any learning must leave.
- Negatives: drawn from the same clip's valid frames other than the positive (wav2vec 1.0), from
  numpy's global generator, which the task seeds per batch. Within-clip negatives keep a shard's
  loss independent of its batch's size and make-up (CPC_audio draws across the batch, relying on
  one speaker per batch). A target frame's negatives are shared by every step k that predicts it,
  as CPC_audio does; scores are computed step by step, so memory grows as B·T·N·C, never B·T·K·T.
- Loss: InfoNCE, cross-entropy with the positive at index 0 (the criterion
  ``equilibrium_cpc``), averaged over every (clip, t, k) with t and t+k valid frames.
- "Context 256": 256 samples (16 ms) cannot hold 12 steps of 10 ms, so it is read as the crop of
  each training clip, which is the task's ``max_sample_size``; a clip must give at least
  ``prediction_steps + 1`` frames (:meth:`EqCpcModel.min_input_samples`). Read as 256 frames it
  is ``task.max_sample_size=41265`` (2.58 s).
"""


import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import merge_with_parent
from fairseq.models import BaseFairseqModel, register_model, register_model_architecture
from omegaconf import open_dict
from torch import nn

from ..checkpoints import CheckpointError
from ..data import receptive_field
from .eq_bestrq import _without_wrapper_keys
from .eq_wav2vec2 import _set_defaults, load_pretraining_checkpoint

logger = logging.getLogger(__name__)

# CPC_audio's CPCEncoder: (kernel, stride) of its five convolutions.
ENCODER_LAYERS = ((10, 5), (8, 4), (4, 2), (4, 2), (4, 2))
FRAME_SHIFT_SAMPLES = math.prod(stride for _, stride in ENCODER_LAYERS)  # 160 = 10 ms at 16 kHz
RECEPTIVE_FIELD_SAMPLES = receptive_field([(None, kernel, stride) for kernel, stride in ENCODER_LAYERS])  # 465

HEAD_INIT_SCALE = 0.1
"""W_k ~ N(0, (HEAD_INIT_SCALE / sqrt(d·C))²): scores of about 0.1 x rms(c) x rms(z) at any size, so
the untrained loss is log 13 to 0.001 bits. Not zero: equal scores are ties, which the criterion
counts as failures, and zero heads pass no gradient to the rest of the network at the first step."""

# Fields that fix the network's shape (and state dict): with init_from, taken from the checkpoint.
# num_negatives and dropout are the loss's and the recipe's, not the weights'.
ARCHITECTURE_FIELDS = ("encoder_channels", "context_kernel_size", "encoder_layers", "encoder_embed_dim",
                       "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_kernel_size",
                       "prediction_steps")
# Fields a later round must keep: the weights learned their meaning at this rate.
MATCHING_FIELDS = ("sample_rate",)


@dataclass
class EqCpcConfig(FairseqDataclass):
    sample_rate: int = field(
        default=16000,
        metadata={"help": "audio sample rate the encoder expects: its stride of 160 samples is 10 ms "
                  "and its receptive field 465 samples (29 ms) at 16 kHz; task.sample_rate must match"},
    )
    encoder_channels: int = field(
        default=512,
        metadata={"help": "channels of the convolutional encoder (CPC_audio: 512), the dimension of "
                  "the targets z"},
    )
    context_kernel_size: int = field(
        default=3,
        metadata={"help": "kernel of the convolution from z to the Conformer's width (the paper: 3), "
                  "padded on the left only so that it sees frames t-2..t"},
    )
    encoder_layers: int = field(default=8, metadata={"help": "causal Conformer blocks (the paper: 8)"})
    encoder_embed_dim: int = field(default=512, metadata={"help": "Conformer width d (the paper: 512)"})
    encoder_ffn_embed_dim: int = field(default=2048, metadata={"help": "Conformer feed-forward width"})
    encoder_attention_heads: int = field(default=8, metadata={"help": "attention heads (the paper: 8 x 64)"})
    conv_kernel_size: int = field(
        default=31,
        metadata={"help": "depthwise convolution kernel of each block (the paper: 31); padded on the "
                  "left only, so each block sees kernel-1 past frames and no future one"},
    )
    prediction_steps: int = field(
        default=12,
        metadata={"help": "K: frames ahead predicted from each context, one linear head W_k per step "
                  "(the paper's 12 positives per instance); clips need K+1 frames"},
    )
    num_negatives: int = field(
        default=12,
        metadata={"help": "N: negatives per target, other frames of the same clip drawn uniformly "
                  "(the paper: 12); chance accuracy is 1/(N+1)"},
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout in the Conformer blocks and on its input"})
    init_from: Optional[str] = field(
        default=None,
        metadata={"help": "start from this eq_cpc pre-training checkpoint (an earlier CSSL/PTLOC round): "
                  "its shape fields replace the recipe's and model.sample_rate must match it; "
                  "num_negatives and dropout stay the recipe's"},
    )


def frame_counts(samples: torch.Tensor) -> torch.Tensor:
    """Frames the unpadded encoder gives clips of ``samples`` samples (0 below the receptive field).
    Nested floors of integer divisions compose, so the five layers' formula is one."""
    return torch.clamp((samples - RECEPTIVE_FIELD_SAMPLES) // FRAME_SHIFT_SAMPLES + 1, min=0)


class FrameEncoder(nn.Module):
    """CPC_audio's ``CPCEncoder`` without padding or biases: audio (B, samples) → z (B, frames, channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        sizes = [1] + [channels] * len(ENCODER_LAYERS)
        # No bias (as wav2vec 2.0's feature encoder): each layer is then positively homogeneous and
        # its per-frame norm makes z independent of a frame's level. With CPC_audio's biases, the bias
        # dominates quiet audio (the toy corpus, rms 0.08): z barely varies over time at the start
        # (std 0.08 against 0.33 without) and training stalled near chance in our runs.
        self.convolutions = nn.ModuleList(
            nn.Conv1d(sizes[i], sizes[i + 1], kernel, stride, bias=False)
            for i, (kernel, stride) in enumerate(ENCODER_LAYERS))
        # Per frame over channels (CPC_audio's ChannelNorm): no statistic crosses frames or clips.
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in ENCODER_LAYERS)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        # Each Conv1d runs as a height-1 conv2d on channels-last tensors, whose memory is (B, T, C):
        # the per-frame LayerNorm then reads its channels contiguously and no layer copies its
        # output between layouts (the copies were a quarter of a tiny model's update on CPU).
        x = audio[:, None, None, :]  # (B, 1, 1, samples)
        for convolution, norm in zip(self.convolutions, self.norms):
            y = F.conv2d(x, convolution.weight.unsqueeze(2), stride=(1, convolution.stride[0]))
            y = F.relu(norm(y.permute(0, 2, 3, 1)))  # (B, 1, T, C)
            x = y.permute(0, 3, 1, 2)  # (B, C, 1, T), channels-last in memory
        return y.squeeze(1)


def causal_conv1d(convolution: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``convolution`` over (B, T, C) with kernel-1 zeros on the left only: frame t sees t-kernel+1..t."""
    x = F.pad(x.transpose(1, 2), (convolution.kernel_size[0] - 1, 0))
    return convolution(x).transpose(1, 2)


class CausalConvolutionModule(nn.Module):
    """Conformer convolution module, causal: LayerNorm → pointwise → GLU → depthwise (left-padded)
    → LayerNorm → SiLU → pointwise → dropout. The second norm is per frame where torchaudio's
    Batch/GroupNorm pools over time (and so over the future)."""

    def __init__(self, dim: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = causal_conv1d(self.depthwise, F.glu(self.pointwise_in(self.layer_norm(x)), dim=-1))
        return self.dropout(self.pointwise_out(F.silu(self.norm(y))))


def feed_forward(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """Conformer feed-forward module: LayerNorm → Linear → SiLU → dropout → Linear → dropout."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class CausalConformerBlock(nn.Module):
    """torchaudio's ``ConformerLayer`` (macaron FFN x 0.5, self-attention, convolution, FFN x 0.5,
    LayerNorm), on (B, T, C), unable to see later frames: see :class:`CausalConvolutionModule`
    and the attention mask of :meth:`EqCpcModel._contexts`."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.ffn1 = feed_forward(dim, ffn_dim, dropout)
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.attention_dropout = nn.Dropout(dropout)
        self.convolution = CausalConvolutionModule(dim, kernel_size, dropout)
        self.ffn2 = feed_forward(dim, ffn_dim, dropout)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, future: torch.Tensor, key_padding: Optional[torch.Tensor]) -> torch.Tensor:
        """``future`` (T, T) True where the key is later than the query; ``key_padding`` (B, T)."""
        x = x + 0.5 * self.ffn1(x)
        y = self.attention_norm(x)
        y, _ = self.attention(y, y, y, attn_mask=future, key_padding_mask=key_padding, need_weights=False)
        x = x + self.attention_dropout(y)
        x = x + self.convolution(x)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


def check_init_checkpoint(path: str, cfg: EqCpcConfig) -> dict:
    """The init_from checkpoint, refused with the reason unless it is an eq_cpc pre-training
    checkpoint of the recipe's sample rate."""
    state = load_pretraining_checkpoint(path, family="eq_cpc")
    source = state["cfg"]["model"]
    for key in MATCHING_FIELDS:
        if key in source and source[key] != cfg[key]:
            raise CheckpointError(
                f"model.{key}={cfg[key]} but model.init_from={path} was pre-trained with "
                f"{key}={source[key]}; set model.{key}={source[key]}")
    return state


@register_model("eq_cpc", dataclass=EqCpcConfig)
class EqCpcModel(BaseFairseqModel):
    """CPC with a causal Conformer context; see the module docstring."""

    def __init__(self, cfg: EqCpcConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = FrameEncoder(cfg.encoder_channels)
        self.context_convolution = nn.Conv1d(cfg.encoder_channels, cfg.encoder_embed_dim, cfg.context_kernel_size)
        self.dropout_input = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            CausalConformerBlock(cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads,
                                 cfg.conv_kernel_size, cfg.dropout)
            for _ in range(cfg.encoder_layers))
        self.heads = nn.ModuleList(
            nn.Linear(cfg.encoder_embed_dim, cfg.encoder_channels, bias=False) for _ in range(cfg.prediction_steps))
        std = HEAD_INIT_SCALE / math.sqrt(cfg.encoder_embed_dim * cfg.encoder_channels)
        for head in self.heads:
            nn.init.normal_(head.weight, std=std)
        self.num_updates = 0

    @classmethod
    def build_model(cls, cfg: EqCpcConfig, task=None) -> "EqCpcModel":
        cfg = merge_with_parent(EqCpcConfig(), _without_wrapper_keys(cfg))
        for key in ("context_kernel_size", "conv_kernel_size", "prediction_steps", "num_negatives"):
            if cfg[key] < 1:
                raise ValueError(f"model.{key} must be >= 1, got {cfg[key]}")
        if task is not None and getattr(task.cfg, "sample_rate", cfg.sample_rate) != cfg.sample_rate:
            raise ValueError(f"task.sample_rate={task.cfg.sample_rate} but model.sample_rate="
                             f"{cfg.sample_rate}: the encoder's frame shift (160 samples) and receptive "
                             f"field are defined at the model's rate")
        state = None
        if cfg.init_from:
            state = check_init_checkpoint(cfg.init_from, cfg)
            with open_dict(cfg):
                for key in ARCHITECTURE_FIELDS:
                    cfg[key] = state["cfg"]["model"][key]
        model = cls(cfg)
        crop = getattr(getattr(task, "cfg", None), "max_sample_size", None)
        if crop is not None and crop < model.min_input_samples():
            raise ValueError(
                f"task.max_sample_size={crop} crops every clip below the {model.min_input_samples()} samples "
                f"that model.prediction_steps={cfg.prediction_steps} needs (prediction_steps + 1 frames); "
                f"raise task.max_sample_size or lower model.prediction_steps")
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
        """Shortest clip with prediction_steps + 1 frames, i.e. one target at every step k."""
        return RECEPTIVE_FIELD_SAMPLES + FRAME_SHIFT_SAMPLES * self.cfg.prediction_steps

    def set_num_updates(self, num_updates: int) -> None:
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def targets(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, T, C), the frame padding mask (B, T) True at padding, and frames per clip (B,)."""
        samples = (source.shape[1] - padding_mask.sum(1) if padding_mask is not None
                   else torch.full((source.shape[0],), source.shape[1], device=source.device))
        short = samples < RECEPTIVE_FIELD_SAMPLES
        if short.any():
            raise ValueError(f"a clip of {int(samples[short][0])} samples is shorter than the encoder's "
                             f"receptive field ({RECEPTIVE_FIELD_SAMPLES} samples): it gives no frame")
        z = self.encoder(source.to(self.context_convolution.weight.dtype))
        frames = frame_counts(samples)
        padding = torch.arange(z.shape[1], device=z.device)[None, :] >= frames[:, None]
        return z, padding, frames

    def _contexts(self, z: torch.Tensor, padding: torch.Tensor, layer: Optional[int] = None) -> List[torch.Tensor]:
        """Causal kernel-3 convolution and Conformer blocks (up to ``layer``, 0-based): each block's (B, T, C)."""
        x = self.dropout_input(causal_conv1d(self.context_convolution, z))
        frames = x.shape[1]
        future = torch.triu(torch.ones(frames, frames, dtype=torch.bool, device=x.device), diagonal=1)
        # Redundant for valid frames (a prefix, never looking ahead), it keeps padding out of padded rows.
        key_padding = padding if padding.any() else None
        outputs: List[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, future, key_padding)
            outputs.append(x)
            if layer is not None and i == layer:
                break
        return outputs

    def _negative_indices(self, frames: torch.Tensor, length: int) -> torch.Tensor:
        """(B, length, N) frame indices: for target frame j of clip b, N frames of b drawn uniformly
        from its valid frames other than j (r in [0, frames-1), r + (r >= j)), from np.random."""
        batch, n = len(frames), self.cfg.num_negatives
        drawn = np.zeros((batch, length, n), dtype=np.int64)
        for b, count in enumerate(frames.tolist()):
            drawn[b, :count] = np.random.randint(0, count - 1, size=(count, n))
        r = torch.from_numpy(drawn).to(frames.device)
        position = torch.arange(length, device=frames.device)[None, :, None]
        return r + (r >= position).long()

    def extract_features(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                         mask: bool = False, layer: Optional[int] = None, **kwargs) -> Dict[str, object]:
        """What fairseq's ``wav2vec_ctc`` encoder wrapper and the probe call: ``x`` (B, T, C) the
        last (or ``layer``-th, 0-based) block's output, ``padding_mask`` (B, T), ``layer_results``
        [(T, B, C), None, None] per block. ``mask`` is ignored: CPC masks nothing."""
        z, padding, _ = self.targets(source, padding_mask)
        outputs = self._contexts(z, padding, layer)
        return {"x": outputs[-1], "padding_mask": padding,
                "layer_results": [(x.transpose(0, 1), None, None) for x in outputs], "features": z}

    def forward(self, source: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                **kwargs) -> Dict[str, object]:
        """Pre-training pass: ``scores`` (targets, 1 + N) float32, positive at index 0, of every
        (clip, t, k) with t and t+k valid frames; ``steps`` (targets,) their k - 1; ``frames`` the
        valid frames; ``z_std`` (0-dim) z's standard deviation over time, mean over channels and clips
        (near 0: collapse)."""
        z, padding, frames = self.targets(source, padding_mask)
        if int(frames.min()) < self.cfg.prediction_steps + 1:
            raise ValueError(
                f"a clip of {int(frames.min())} frames is shorter than model.prediction_steps + 1 = "
                f"{self.cfg.prediction_steps + 1} frames ({self.min_input_samples()} samples): raise "
                f"task.min_sample_size / task.max_sample_size or lower model.prediction_steps")
        contexts = self._contexts(z, padding)[-1]
        length = z.shape[1]
        negatives = z[torch.arange(len(z), device=z.device)[:, None, None], self._negative_indices(frames, length)]
        scores, steps = [], []
        for k, head in enumerate(self.heads, start=1):
            predicted = head(contexts[:, : length - k])  # (B, T-k, C) from c_t, for z_{t+k}
            positive = (predicted * z[:, k:]).sum(-1, keepdim=True)
            # Broadcast multiply-and-sum, not einsum: no copy of the negatives per step.
            negative = (predicted.unsqueeze(2) * negatives[:, k:]).sum(-1)
            target = ~padding[:, k:]  # t + k valid, hence t too
            scores.append(torch.cat([positive, negative], dim=-1)[target].float())
            steps.append(torch.full((int(target.sum()),), k - 1, dtype=torch.long, device=z.device))
        with torch.no_grad():
            valid = (~padding).unsqueeze(-1).float()
            z32 = z.float()
            mean = (z32 * valid).sum(1) / frames[:, None]
            variance = (((z32 - mean[:, None]) * valid) ** 2).sum(1) / (frames[:, None] - 1)
            z_std = variance.sqrt().mean()
        return {"scores": torch.cat(scores), "steps": torch.cat(steps), "frames": int(frames.sum()),
                "z_std": z_std, "prediction_steps": self.cfg.prediction_steps}

    def remove_pretraining_modules(self, last_layer: Optional[int] = None) -> None:
        """For fine-tuning: the prediction heads go (their weights are ignored on load)."""
        self.heads = None
        if last_layer is not None:
            self.blocks = nn.ModuleList(block for i, block in enumerate(self.blocks) if i <= last_layer)


@register_model_architecture("eq_cpc", "eq_cpc_tiny")
def eq_cpc_tiny(args) -> None:
    """0.27M parameters (0.05M of them the 12 heads): about 7 CSSL updates of 3 shards per second
    on one CPU thread; for tests."""
    _set_defaults(args, encoder_channels=64, encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
                  encoder_attention_heads=2, conv_kernel_size=15, dropout=0.0)


@register_model_architecture("eq_cpc", "eq_cpc_small")
def eq_cpc_small(args) -> None:
    """1.38M parameters (0.15M of them the heads): a CPU experiment's size."""
    _set_defaults(args, encoder_channels=128, encoder_layers=4, encoder_embed_dim=96, encoder_ffn_embed_dim=384,
                  encoder_attention_heads=4, conv_kernel_size=15, dropout=0.1)


@register_model_architecture("eq_cpc", "eq_cpc_base")
def eq_cpc_base(args) -> None:
    """The paper's: 512 encoder channels, kernel-3 convolution, 8 causal Conformer blocks x 512,
    8 heads, kernel 31: 57.7M parameters, 3.1M of them the 12 maps W_k (the paper says 59M)."""
    _set_defaults(args, encoder_channels=512, encoder_layers=8, encoder_embed_dim=512, encoder_ffn_embed_dim=2048,
                  encoder_attention_heads=8, conv_kernel_size=31, dropout=0.1)
