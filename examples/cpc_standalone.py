"""Run an exported eq_cpc model with torch alone (no eqssl, no fairseq, no torchaudio).

    eqssl-export checkpoint_best.pt cpc.pt                # in the eqssl environment
    python examples/cpc_standalone.py cpc.pt clip.wav     # anywhere with torch (+ soundfile to read the wav)

Prints the output's shape; for a pre-training export also its CPC accuracy on the clip (the
positive z_{t+k} scored above every other frame of the clip, per step k), for a fine-tuned (CTC)
export the greedy transcript. Copy the classes and ``load`` into your own code: they are the
whole network (``eqssl/models/eq_cpc.py`` with its fairseq plumbing left out; the state dict's
names are eq_cpc's).
"""

import math
import sys
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# CPC_audio's CPCEncoder: (kernel, stride) of its five convolutions; one frame per 160 samples.
ENCODER_LAYERS = ((10, 5), (8, 4), (4, 2), (4, 2), (4, 2))


class FrameEncoder(nn.Module):
    """audio (B, samples) → z (B, frames, channels): five unpadded, bias-free convolutions, each
    followed by a per-frame LayerNorm over channels and a ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        sizes = [1] + [channels] * len(ENCODER_LAYERS)
        self.convolutions = nn.ModuleList(nn.Conv1d(sizes[i], sizes[i + 1], kernel, stride, bias=False)
                                          for i, (kernel, stride) in enumerate(ENCODER_LAYERS))
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in ENCODER_LAYERS)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = audio.unsqueeze(1)
        for convolution, norm in zip(self.convolutions, self.norms):
            x = F.relu(norm(convolution(x).transpose(1, 2))).transpose(1, 2)
        return x.transpose(1, 2)


def causal_conv1d(convolution: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``convolution`` over (B, T, C), padded on the left only: frame t sees t-kernel+1 … t."""
    x = F.pad(x.transpose(1, 2), (convolution.kernel_size[0] - 1, 0))
    return convolution(x).transpose(1, 2)


class CausalConvolutionModule(nn.Module):
    """LayerNorm → pointwise → GLU → depthwise (left-padded) → LayerNorm → SiLU → pointwise."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = causal_conv1d(self.depthwise, F.glu(self.pointwise_in(self.layer_norm(x)), dim=-1))
        return self.pointwise_out(F.silu(self.norm(y)))


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    """LayerNorm → Linear → SiLU → Linear (eq_cpc's dropouts, identities at inference, keep the indices)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Identity(), nn.Linear(hidden, dim))


class CausalConformerBlock(nn.Module):
    """Macaron FFN x 0.5, self-attention masked to the past, causal convolution, FFN x 0.5, LayerNorm."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, kernel_size: int) -> None:
        super().__init__()
        self.ffn1 = feed_forward(dim, ffn_dim)
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.convolution = CausalConvolutionModule(dim, kernel_size)
        self.ffn2 = feed_forward(dim, ffn_dim)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ffn1(x)
        y = self.attention_norm(x)
        x = x + self.attention(y, y, y, attn_mask=future, need_weights=False)[0]
        x = x + self.convolution(x)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


class Cpc(nn.Module):
    """The network: ``forward(audio (B, samples))`` gives (z (B, T, channels), every block's
    output (B, T, dim)); ``heads[k - 1]`` maps a context c_t to its prediction of z_{t+k}."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.encoder = FrameEncoder(config["encoder_channels"])
        self.context_convolution = nn.Conv1d(config["encoder_channels"], config["encoder_embed_dim"],
                                             config["context_kernel_size"])
        self.blocks = nn.ModuleList(
            CausalConformerBlock(config["encoder_embed_dim"], config["encoder_ffn_embed_dim"],
                                 config["encoder_attention_heads"], config["conv_kernel_size"])
            for _ in range(config["encoder_layers"]))
        self.heads = nn.ModuleList(nn.Linear(config["encoder_embed_dim"], config["encoder_channels"], bias=False)
                                   for _ in range(config["prediction_steps"]))

    def forward(self, audio: torch.Tensor) -> Tuple[torch.Tensor, list]:
        z = self.encoder(audio)
        x = causal_conv1d(self.context_convolution, z)
        frames = x.shape[1]
        future = torch.triu(torch.ones(frames, frames, dtype=torch.bool, device=x.device), diagonal=1)
        outputs = []
        for block in self.blocks:
            x = block(x, future)
            outputs.append(x)
        return z, outputs


def load(path: str) -> Tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """``encode(wav) -> (frames, dim)`` the last block's output of one clip (fine-tuned:
    (frames, vocabulary) CTC logits), and the export dict; ``exported["model"]`` is the Cpc network."""
    exported = torch.load(path, weights_only=True)
    if exported.get("format") != "eqssl-cpc/1":
        raise ValueError(f"{path}: not an eqssl CPC export (format {exported.get('format')!r})")
    config = exported["config"]
    model = Cpc(config)
    if exported["kind"] == "finetuned":
        model.heads = None  # fine-tuning drops the prediction maps
    model.load_state_dict({**exported["network"], **{f"heads.{k}": v for k, v in exported.get("heads", {}).items()}})
    model.eval()
    head = None
    if exported["kind"] == "finetuned":
        head = nn.Linear(*exported["head"]["weight"].T.shape)
        head.load_state_dict(exported["head"])
        head.eval()
    exported["model"] = model

    @torch.no_grad()
    def encode(wav: torch.Tensor) -> torch.Tensor:
        wav = wav.float()
        if config["normalize"]:
            wav = F.layer_norm(wav, wav.shape)
        x = model(wav.unsqueeze(0))[1][-1][0]
        return head(x) if head is not None else x

    return encode, exported


@torch.no_grad()
def accuracy_per_step(model: Cpc, wav: torch.Tensor) -> list:
    """Per step k: how often ⟨W_k c_t, z_{t+k}⟩ beats ⟨W_k c_t, z_j⟩ for every other frame j of the clip."""
    z, outputs = model(wav.float().unsqueeze(0))
    z, c = z[0], outputs[-1][0]
    found = []
    for k, head in enumerate(model.heads, start=1):
        if z.shape[0] <= k:
            break
        scores = head(c[:-k]) @ z.T  # (T-k, T)
        targets = torch.arange(k, z.shape[0])
        positive = scores[torch.arange(len(targets)), targets]
        scores[torch.arange(len(targets)), targets] = -math.inf
        found.append(float((positive > scores.max(-1).values).float().mean()))
    return found


def greedy_transcript(logits: torch.Tensor, vocabulary: list) -> str:
    """Best path, repeats merged, blanks (index 0) and fairseq's other specials (<pad>, </s>)
    dropped as eqssl-evaluate does, '|' as the word boundary."""
    skip = {0} | {i for i, symbol in enumerate(vocabulary) if symbol in ("<pad>", "</s>")}
    best = torch.unique_consecutive(logits.argmax(-1)).tolist()
    return "".join(vocabulary[i] for i in best if i not in skip).replace("|", " ").strip()


def main() -> int:
    import soundfile

    encode, exported = load(sys.argv[1])
    audio, rate = soundfile.read(sys.argv[2], dtype="float32")
    if rate != exported["config"]["sample_rate"]:
        raise SystemExit(f"{sys.argv[2]}: {rate} Hz, the model expects {exported['config']['sample_rate']}")
    wav = torch.from_numpy(audio)
    if wav.numel() < 465:
        raise SystemExit(f"{sys.argv[2]}: {wav.numel()} samples, shorter than the encoder's receptive field (465)")
    out = encode(wav)
    print(tuple(out.shape))
    if exported["kind"] == "finetuned":
        print(greedy_transcript(out, exported["vocabulary"]))
    else:
        if exported["config"]["normalize"]:
            wav = F.layer_norm(wav, wav.shape)
        steps = accuracy_per_step(exported["model"], wav)
        print("accuracy per step k against every other frame: "
              + " ".join(f"k{k}={a:.3f}" for k, a in enumerate(steps, start=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
