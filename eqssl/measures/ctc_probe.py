"""The CTC probe: how much of a labelled set a frozen encoder's features already spell (SUPERB's ASR
protocol; the paper's "one linear layer + CTC").

A learnable softmax-weighted sum of the layers, then a CTC head (``linear``: one linear layer, as
the paper; ``bilstm``: SUPERB's ASR downstream in small, a 2-layer BiLSTM then a linear layer) over
the set's letter dictionary (``dict.ltr.txt``; CTC blank = fairseq's ``<s>``), trained with Adam for
a fixed number of updates on the train split, then greedy-CTC WER / CER on the test split, scored
exactly as ``eqssl-evaluate`` scores fine-tuned models. The head's own seed moves its CER by
several points: the deterministic phone probe (eqssl.measures.phone_probe) does not.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from .features import Upstream, cached_features


@dataclass
class ProbeConfig:
    head: str = "linear"
    """'linear' (the paper's one linear layer + CTC) or 'bilstm' (SUPERB's ASR downstream, small)."""
    hidden: int = 128
    """BiLSTM units per direction (bilstm head only)."""
    updates: int = 1500
    """Adam updates; fixed, the same for every upstream."""
    batch_size: int = 16
    """Clips per update."""
    lr: float = 2e-3
    seed: int = 1
    train_split: str = "train_1h"
    test_split: str = "test"
    repeats: int = 1
    """Heads trained from the same features with seeds seed, seed + 1000, ...; the WER and CER
    reported are their mean (the head's own seed moves a probe's CER by several points)."""


class ProbeHead(torch.nn.Module):
    """Softmax-weighted sum of the upstream's layers, then a CTC head."""

    def __init__(self, layers: int, dim: int, letters: int, head: str, hidden: int) -> None:
        super().__init__()
        self.layer_weights = torch.nn.Parameter(torch.zeros(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.lstm = torch.nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True) \
            if head == "bilstm" else None
        self.output = torch.nn.Linear(2 * hidden if self.lstm is not None else dim, letters)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(batch, layers, frames, dim) -> (batch, frames, letters) log-probabilities."""
        weights = torch.softmax(self.layer_weights, 0)
        x = self.norm((features * weights[None, :, None, None]).sum(1))
        if self.lstm is not None:
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            x, _ = self.lstm(packed)
            x, _ = torch.nn.utils.rnn.pad_packed_sequence(x, batch_first=True, total_length=features.size(2))
        return torch.log_softmax(self.output(x), dim=-1)


def _pad(features: List[torch.Tensor]) -> tuple:
    lengths = torch.tensor([f.size(1) for f in features])
    batch = torch.zeros(len(features), features[0].size(0), int(lengths.max()), features[0].size(2))
    for i, f in enumerate(features):
        batch[i, :, : f.size(1)] = f.float()
    return batch, lengths


def letters_of(words: str, dictionary) -> List[int]:
    """fairseq's .ltr spelling of a transcript (letters, '|' after every word) as indices."""
    return [dictionary.index(s) for s in list("|".join(words.split())) + ["|"]]


def probe(upstream_source: str, folder: str, cfg: ProbeConfig, cache: str, name: str = "set",
          upstream: Optional[Upstream] = None) -> dict:
    """Train the probe on FOLDER's train split and score its test split; returns WER, CER and more."""
    from fairseq.data import Dictionary

    from .evaluation import EvaluationError, load_test_set, score

    if not os.path.isfile(os.path.join(folder, "dict.ltr.txt")):
        raise EvaluationError(f"folder {folder}: no dict.ltr.txt; expected a labelled set "
                              "(SPLIT.tsv, SPLIT.wrd or .ltr, dict.ltr.txt)")
    dictionary = Dictionary.load(os.path.join(folder, "dict.ltr.txt"))
    train_set = load_test_set(name, folder, cfg.train_split, dictionary)
    test_set = load_test_set(name, folder, cfg.test_split, dictionary)
    upstream = upstream or Upstream(upstream_source)
    train_x = cached_features(upstream, folder, cfg.train_split, cache, train_set.audio)
    test_x = cached_features(upstream, folder, cfg.test_split, cache, test_set.audio)
    targets = [torch.tensor(letters_of(r, dictionary)) for r in train_set.references]
    heads = []
    for repeat in range(cfg.repeats):
        seed = cfg.seed + 1000 * repeat
        head, losses = train_head(train_x, targets, len(dictionary), dictionary.bos(), cfg, seed)
        hypotheses = decode(head, test_x, dictionary)
        tail = losses[-max(1, cfg.updates // 10):]
        heads.append((seed, head, hypotheses, score(test_set.references, hypotheses), sum(tail) / len(tail)))
    _, head, hypotheses, result, final_loss = heads[0]
    result.update(upstream=upstream_source, upstream_sha256=upstream.key, config=asdict(cfg),
                  final_train_loss=final_loss, layer_weights=torch.softmax(head.layer_weights, 0).tolist(),
                  examples=[{"reference": r, "hypothesis": h} for r, h in zip(test_set.references[:3], hypotheses[:3])])
    if cfg.repeats > 1:  # the first head's counts and examples stay; WER and CER are the heads' mean
        result["heads"] = [{"seed": seed, "wer": scored["wer"], "cer": scored["cer"], "final_train_loss": loss}
                           for seed, _, _, scored, loss in heads]
        for key in ("wer", "cer"):
            result[key] = sum(h[key] for h in result["heads"]) / cfg.repeats
    result["head_state"] = head.state_dict()
    return result


def train_head(train_x: List[torch.Tensor], targets: List[torch.Tensor], letters: int, blank: int,
               cfg: ProbeConfig, seed: int) -> tuple:
    """One probe head trained with CTC from cached features; (the head in eval mode, its losses)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = ProbeHead(train_x[0].size(0), train_x[0].size(2), letters, cfg.head, cfg.hidden)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    warmup = max(1, cfg.updates // 10)  # linear warm-up over a tenth of the updates, then linear decay
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (cfg.updates - step) / max(1, cfg.updates - warmup))))
    losses = []
    for _ in range(cfg.updates):
        chosen = torch.randperm(len(train_x), generator=generator)[: cfg.batch_size].tolist()
        x, lengths = _pad([train_x[i] for i in chosen])
        y = [targets[i] for i in chosen]
        log_probs = head(x, lengths)
        loss = F.ctc_loss(log_probs.transpose(0, 1), torch.cat(y), lengths, torch.tensor([len(t) for t in y]),
                          blank=blank, zero_infinity=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return head.eval(), losses


def decode(head: ProbeHead, test_x: List[torch.Tensor], dictionary) -> List[str]:
    """Greedy CTC transcripts of the test features, 32 clips at a time."""
    from .evaluation import greedy_decode

    hypotheses = []
    with torch.no_grad():
        for i in range(0, len(test_x), 32):
            x, lengths = _pad(test_x[i: i + 32])
            hypotheses += greedy_decode(head(x, lengths), dictionary, lengths.tolist(), progress=False)
    return hypotheses


