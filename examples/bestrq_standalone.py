"""Run an exported eq_bestrq model with torch and torchaudio alone (no eqssl, no fairseq).

    eqssl-export checkpoint_best.pt bestrq.pt          # in the eqssl environment
    python examples/bestrq_standalone.py bestrq.pt clip.wav   # anywhere with torch + torchaudio

Prints the encoder output's shape and, for a fine-tuned (CTC) export, the greedy transcript.
Copy ``load`` and ``log_mel_features`` into your own code: they are the whole recipe.
"""

import sys
from typing import Callable, Tuple

import torch
import torchaudio


def log_mel_features(wav: torch.Tensor, sample_rate: int, n_mels: int, deltas: int,
                     stack_frames: int) -> torch.Tensor:
    """(samples,) 16 kHz audio in [-1, 1] → (frames, features): Kaldi log-mel (25 ms / 10 ms, no
    dither), deltas, each feature normalised over the utterance, ``stack_frames`` frames stacked."""
    mel = torchaudio.compliance.kaldi.fbank(wav.float().unsqueeze(0) * 32768, num_mel_bins=n_mels,
                                            sample_frequency=sample_rate, dither=0.0)
    parts = [mel]
    for _ in range(deltas):
        parts.append(torchaudio.functional.compute_deltas(parts[-1].T).T)
    features = torch.cat(parts, dim=-1)
    features = (features - features.mean(0)) / (features.std(0) + 1e-5)
    frames = features.shape[0] // stack_frames
    return features[: frames * stack_frames].reshape(frames, -1)


def load(path: str) -> Tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """``encode(wav) -> (frames, width)`` encoder output (or, fine-tuned, (frames, vocabulary)
    logits) of one clip, and the export dict."""
    exported = torch.load(path, weights_only=True)
    projection = torch.nn.Linear(*exported["input_projection"]["weight"].T.shape)
    projection.load_state_dict(exported["input_projection"])
    conformer = torchaudio.models.Conformer(**exported["conformer"])
    conformer.load_state_dict(exported["conformer_state"])
    head = torch.nn.Linear(*exported["head"]["weight"].T.shape)
    head.load_state_dict(exported["head"])
    for module in (projection, conformer, head):
        module.eval()

    @torch.no_grad()
    def encode(wav: torch.Tensor) -> torch.Tensor:
        features = log_mel_features(wav, **exported["features"])
        x, _ = conformer(projection(features).unsqueeze(0), torch.tensor([features.shape[0]]))
        return head(x[0]) if exported["kind"] == "finetuned" else x[0]

    return encode, exported


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
    if rate != exported["features"]["sample_rate"]:
        raise SystemExit(f"{sys.argv[2]}: {rate} Hz, the model expects {exported['features']['sample_rate']}")
    out = encode(torch.from_numpy(audio))
    print(tuple(out.shape))
    if exported["kind"] == "finetuned":
        print(greedy_transcript(out, exported["vocabulary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
