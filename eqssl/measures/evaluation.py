"""WER/CER evaluation of a fine-tuned CTC checkpoint (wav2vec_ctc around wav2vec 2.0, BEST-RQ or
CPC) on labelled sets: loading, input checks, greedy CTC decoding and jiwer scoring. The command
line is ``eqssl-evaluate`` (eqssl.cli.evaluate), which documents the checks."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import jiwer
import numpy as np
import torch

from ..checkpoints import load_failure


class EvaluationError(Exception):
    """Bad input: the message names the file (and line) and what is wrong."""


@dataclass
class TestSet:
    """One labelled set: the manifest's clips and their reference transcripts."""

    name: str
    folder: str
    split: str
    manifest: str
    labels: str
    audio: List[str] = field(default_factory=list)          # absolute paths, manifest order
    sizes: List[int] = field(default_factory=list)          # samples per clip
    references: List[str] = field(default_factory=list)     # words, one per clip
    skipped_lines: List[int] = field(default_factory=list)  # label-file lines with empty reference


# ---------------------------------------------------------------------------------------------
# Scoring and decoding
# ---------------------------------------------------------------------------------------------

def score(references: List[str], hypotheses: List[str]) -> dict:
    """Corpus-level WER and CER (jiwer) with S/D/I counts and reference word/character counts.

    References must be non-empty (skip empty ones first); an empty hypothesis is all deletions.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("score(): no references")
    for i, reference in enumerate(references):
        if not reference.strip():
            raise ValueError(f"score(): reference {i} is empty (skip it and count it instead)")
    references = [" ".join(r.split()) for r in references]
    hypotheses = [" ".join(h.split()) for h in hypotheses]
    words = jiwer.process_words(references, hypotheses)
    chars = jiwer.process_characters(references, hypotheses)
    n_words = words.hits + words.substitutions + words.deletions
    n_chars = chars.hits + chars.substitutions + chars.deletions
    return {
        "wer": (words.substitutions + words.deletions + words.insertions) / n_words,
        "cer": (chars.substitutions + chars.deletions + chars.insertions) / n_chars,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "hits": words.hits,
        "words": n_words,
        "char_substitutions": chars.substitutions,
        "char_deletions": chars.deletions,
        "char_insertions": chars.insertions,
        "char_hits": chars.hits,
        "characters": n_chars,
        "utterances": len(references),
    }


POST_PROCESS = {"ltr": "letter", "spm": "sentencepiece"}
"""How fairseq turns each label unit type back into words."""


def greedy_decode(emissions: torch.Tensor, dictionary, lengths: Optional[Sequence[int]] = None,
                  post_process_as: str = "letter", progress: bool = True) -> List[str]:
    """Greedy CTC: arg-max per frame, collapse repeats, drop blanks (``dictionary.bos()``).

    ``emissions`` is (batch, frames, letters) (or (frames, letters) for one clip); ``lengths``
    the number of valid frames per clip (default: all). Returns words via fairseq's
    ``post_process(text, post_process_as)`` ("letter" for characters, "sentencepiece" for pieces).
    """
    from fairseq.data.data_utils import post_process

    if emissions.dim() == 2:
        emissions = emissions.unsqueeze(0)
    best = emissions.argmax(dim=-1).cpu()
    blank = dictionary.bos()
    specials = {blank, dictionary.pad(), dictionary.eos()}
    texts = []
    for i in range(best.size(0)):
        frames = best[i] if lengths is None else best[i, : int(lengths[i])]
        tokens = torch.unique_consecutive(frames).tolist()
        letters = [dictionary[t] for t in tokens if t not in specials]
        texts.append(post_process(" ".join(letters), post_process_as))
    return texts


# ---------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------

FINETUNE_RECIPES = {"eq_wav2vec2": "ctc_tiny", "eq_bestrq": "ctc_bestrq_tiny", "eq_cpc": "ctc_cpc_tiny"}
"""The CPU fine-tuning recipe of each pre-training family, named when one is given to evaluate."""


def load_checkpoint(path: str, device: str = "cpu"):
    """(model, task) of a fine-tuned CTC checkpoint, loaded by fairseq; error otherwise."""
    import eqssl  # noqa: F401  (registers eqssl's plugins and the safe globals for torch.load)
    from fairseq import checkpoint_utils

    if not os.path.isfile(path):
        raise EvaluationError(f"checkpoint {path}: no such file")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    except Exception as error:  # a truncated file, a text file, another framework's pickle, ...
        raise EvaluationError(f"checkpoint {path}: {load_failure(path, error)}") from None
    cfg = state.get("cfg")
    if cfg is None and state.get("args") is not None:
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf
        cfg = convert_namespace_to_omegaconf(state["args"])
    model_name = cfg.model.get("_name", None) if cfg is not None and cfg.get("model") else None
    task_name = cfg.task.get("_name", None) if cfg is not None and cfg.get("task") else None
    if model_name != "wav2vec_ctc" or task_name != "audio_finetuning":
        from ..models.eq_wav2vec2 import checkpoint_family

        recipe = FINETUNE_RECIPES.get(checkpoint_family(model_name), "ctc_tiny")
        raise EvaluationError(
            f"checkpoint {path}: not a fine-tuned CTC checkpoint (model {model_name!r}, task {task_name!r}; "
            "expected model 'wav2vec_ctc', task 'audio_finetuning'). A pre-training checkpoint "
            f"must be fine-tuned first (recipes/finetune/{recipe}.yaml).")
    if "target_dictionary" not in (state.get("task_state") or {}):
        raise EvaluationError(f"checkpoint {path}: the checkpoint carries no target dictionary (task_state)")
    try:
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    except Exception as error:
        raise EvaluationError(f"checkpoint {path}: fairseq could not build the model ({error})") from error
    model = models[0].eval().to(device)
    return model, task


def dictionary_symbols(dictionary) -> List[str]:
    """The dictionary's symbols in index order (specials included)."""
    return [dictionary[i] for i in range(len(dictionary))]


# ---------------------------------------------------------------------------------------------
# Test sets
# ---------------------------------------------------------------------------------------------

def parse_set(spec: str) -> Tuple[str, str, str]:
    """``NAME=FOLDER:SPLIT`` -> (name, folder, split); the split is after the last ':'."""
    name, eq, rest = spec.partition("=")
    folder, colon, split = rest.rpartition(":")
    if not eq or not colon or not name or not folder or not split:
        raise EvaluationError(f"test set {spec!r}: expected NAME=FOLDER:SPLIT, e.g. sv=data/sv:test")
    return name, folder, split


def _read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def check_dictionary_file(folder: str, dictionary, units: str = "ltr") -> None:
    """Error when ``folder/dict.{units}.txt`` exists and its symbols differ from the checkpoint's."""
    from fairseq.data import Dictionary

    path = os.path.join(folder, f"dict.{units}.txt")
    if not os.path.exists(path):
        return
    try:
        data_symbols = dictionary_symbols(Dictionary.load(path))
    except Exception as error:
        raise EvaluationError(f"{path}: not a fairseq dictionary ({error})") from error
    model_symbols = dictionary_symbols(dictionary)
    if data_symbols != model_symbols:
        only_data = sorted(set(data_symbols) - set(model_symbols))
        only_model = sorted(set(model_symbols) - set(data_symbols))
        raise EvaluationError(
            f"{path}: dictionary mismatch with the checkpoint ({len(data_symbols)} symbols vs "
            f"{len(model_symbols)}; only in the data: {' '.join(only_data) or '-'}; only in the "
            f"checkpoint: {' '.join(only_model) or '-'}"
            f"{'; same symbols in another order' if not only_data and not only_model else ''}). "
            "The model was fine-tuned on another letter set; evaluate it on matching data.")


def load_test_set(name: str, folder: str, split: str, dictionary, units: str = "ltr") -> TestSet:
    """Read and check one set (manifest, labels, dictionary); nothing is decoded here."""
    from fairseq.data.data_utils import post_process

    manifest = os.path.join(folder, f"{split}.tsv")
    if not os.path.isfile(manifest):
        raise EvaluationError(f"{manifest}: manifest not found (set {name})")
    check_dictionary_file(folder, dictionary, units)
    wrd, ltr = os.path.join(folder, f"{split}.wrd"), os.path.join(folder, f"{split}.ltr")
    labels = wrd if os.path.isfile(wrd) else ltr
    if not os.path.isfile(labels):
        raise EvaluationError(f"{wrd}: no reference transcripts (neither {split}.wrd nor {split}.ltr)")

    rows = _read_lines(manifest)
    if not rows:
        raise EvaluationError(f"{manifest}: empty manifest (expected the audio root on line 1)")
    root, rows = rows[0].strip(), rows[1:]
    label_lines = _read_lines(labels)
    if len(label_lines) != len(rows):
        raise EvaluationError(
            f"{labels} has {len(label_lines)} lines but {manifest} has {len(rows)} clips "
            f"({len(rows) + 1} lines with the root line): the labels do not match the manifest")

    known = set(dictionary_symbols(dictionary))
    test_set = TestSet(name, folder, split, manifest, labels)
    for number, (row, label) in enumerate(zip(rows, label_lines), start=1):
        parts = row.split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise EvaluationError(f"{manifest}:{number + 1}: expected 'path<TAB>samples', got {row!r}")
        if labels == ltr:
            symbols = label.split()
            words = post_process(label, "letter")
        else:
            words = " ".join(label.split())
            symbols = list(words.replace(" ", "|")) + (["|"] if words else [])
        # SentencePiece spells any word with its pieces; only a character set can be outgrown.
        unknown = sorted({s for s in symbols if s not in known}) if units == "ltr" else []
        if unknown:
            raise EvaluationError(
                f"{labels}:{number}: characters not in the checkpoint's dictionary: "
                f"{' '.join(repr(s) for s in unknown)} (in {label!r})")
        if not words:
            test_set.skipped_lines.append(number)
            continue
        audio = os.path.join(root, parts[0])
        if not os.path.isfile(audio):
            raise EvaluationError(f"{manifest}:{number + 1}: audio file not found: {audio}")
        test_set.audio.append(audio)
        test_set.sizes.append(int(parts[1]))
        test_set.references.append(words)
    if not test_set.references:
        raise EvaluationError(f"{labels}: every reference is empty; nothing to score")
    return test_set


# ---------------------------------------------------------------------------------------------
# Decoding a set
# ---------------------------------------------------------------------------------------------

def read_audio(path: str, sample_rate: int, normalize: bool) -> torch.Tensor:
    """One mono clip as float32, layer-normalised when the model was trained that way."""
    import soundfile as sf
    import torch.nn.functional as F

    wav, rate = sf.read(path, dtype="float32")
    if rate != sample_rate:
        raise EvaluationError(f"{path}: sample rate {rate} Hz, the model expects {sample_rate} Hz")
    if wav.ndim != 1:
        raise EvaluationError(f"{path}: {wav.shape[1]} channels, expected mono audio")
    source = torch.from_numpy(np.ascontiguousarray(wav))
    if normalize:
        with torch.no_grad():
            source = F.layer_norm(source, source.shape)
    return source


@torch.no_grad()
def decode_set(model, task, test_set: TestSet, batch_size: int, device: str,
               post_process_as: str = "letter", progress: bool = True) -> List[str]:
    """Greedy hypotheses in manifest order; clips batched by length, with a progress bar."""
    from tqdm import tqdm

    sample_rate = int(task.cfg.sample_rate)
    normalize = bool(task.cfg.normalize)
    order = sorted(range(len(test_set.audio)), key=lambda i: test_set.sizes[i])
    hypotheses: List[Optional[str]] = [None] * len(order)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=test_set.name, unit="batch", file=sys.stderr, disable=not progress):
        waves = [read_audio(test_set.audio[i], sample_rate, normalize) for i in batch]
        longest = max(w.numel() for w in waves)
        source = torch.zeros(len(waves), longest)
        padding_mask = torch.zeros(len(waves), longest, dtype=torch.bool)
        for row, wave in enumerate(waves):
            source[row, : wave.numel()] = wave
            padding_mask[row, wave.numel():] = True
        net_output = model(source=source.to(device), padding_mask=padding_mask.to(device))
        emissions = model.get_logits(net_output).transpose(0, 1).float()  # (B, T, V)
        frame_padding = net_output.get("padding_mask")
        if frame_padding is not None:
            lengths = (~frame_padding).sum(dim=-1).tolist()
        else:
            lengths = [emissions.size(1)] * len(batch)
        for i, text in zip(batch, greedy_decode(emissions, task.target_dictionary, lengths, post_process_as)):
            hypotheses[i] = text
    return [h if h is not None else "" for h in hypotheses]



# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def evaluate(checkpoint: str, sets: Sequence[str], batch_size: int = 8, device: str = "cpu",
             progress: bool = True) -> dict:
    """Load, check every set, decode and score; returns the report that --json writes."""
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1, got {batch_size}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError("--device cuda: no CUDA device is available")
    parsed = [parse_set(spec) for spec in sets]
    names = [name for name, _, _ in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvaluationError(f"test set names used twice: {', '.join(duplicates)}")
    model, task = load_checkpoint(checkpoint, device)
    dictionary = task.target_dictionary
    units = getattr(task.cfg, "labels", None) or "ltr"
    if units not in POST_PROCESS:
        raise EvaluationError(f"{checkpoint}: fine-tuned on '{units}' labels; eqssl-evaluate reads ltr or spm")
    test_sets = [load_test_set(name, folder, split, dictionary, units) for name, folder, split in parsed]
    results: Dict[str, dict] = {}
    for test_set in test_sets:
        hypotheses = decode_set(model, task, test_set, batch_size, device, POST_PROCESS[units], progress)
        result = score(test_set.references, hypotheses)
        result.update({
            "folder": os.path.abspath(test_set.folder), "split": test_set.split,
            "manifest": os.path.abspath(test_set.manifest),
            "references": os.path.abspath(test_set.labels),
            "clips": len(test_set.references) + len(test_set.skipped_lines),
            "skipped_empty_references": len(test_set.skipped_lines),
            "skipped_lines": test_set.skipped_lines,
        })
        results[test_set.name] = result
    return {
        "checkpoint": os.path.abspath(checkpoint),
        "decoder": f"greedy CTC (arg-max, repeats collapsed, blank <s> dropped), post_process {POST_PROCESS[units]}",
        "device": device,
        "dictionary": dictionary_symbols(dictionary),
        "sets": results,
    }
