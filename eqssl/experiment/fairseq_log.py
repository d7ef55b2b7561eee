"""The one reader of fairseq's training logs (``common.log_format=simple``), for eqssl-reproduce,
the learning-curve and plotting scripts and the tests.

A validation line reads ``... | valid on 'valid' subset | loss 4.5 | accuracy_read 0.31 | ...``;
a training line ``... | train_inner | epoch 001:  10 / 16 loss=4.9, ..., num_updates=10, ...``
(fairseq-train) or ``[...][train_inner][INFO] - epoch 001: ...`` (fairseq-hydra-train).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional

_VALIDATION = re.compile(r"\| valid on '([^']+)' subset \| (.*)$")
_TRAINING = re.compile(r"(?:\| train_inner \| |\[train_inner\]\[\w+\] - )(.*)$")
_KEY_VALUE = re.compile(r"(\w[\w.-]*)=([-+\d.e]+|nan|inf)(?=,|$)")


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def validation_stats(line: str, subset: Optional[str] = "valid") -> Optional[Dict[str, float]]:
    """The numeric fields of one validation line of ``subset`` (any subset: None), else None."""
    match = _VALIDATION.search(line)
    if not match or (subset is not None and match.group(1) != subset):
        return None
    stats = {}
    for field in match.group(2).split(" | "):
        key, _, value = field.strip().rpartition(" ")
        number = _number(value)
        if key and number is not None:
            stats[key] = number
    return stats


def training_stats(line: str) -> Optional[Dict[str, float]]:
    """The numeric ``key=value`` fields of one ``train_inner`` line, else None."""
    match = _TRAINING.search(line)
    if not match:
        return None
    return {key: float(value) for key, value in _KEY_VALUE.findall(match.group(1).replace(", ", ","))}


def validations(lines: Iterable[str], subset: Optional[str] = "valid") -> List[Dict[str, float]]:
    """Every validation of ``subset`` in a log's lines, in order, as {field: value}."""
    return [stats for stats in (validation_stats(line, subset) for line in lines) if stats is not None]


def read_validations(path: str, subset: Optional[str] = "valid") -> List[Dict[str, float]]:
    """Every validation of ``subset`` in the log file at ``path``."""
    with open(path) as f:
        return validations(f, subset)


def trainings(lines: Iterable[str]) -> List[Dict[str, float]]:
    """Every ``train_inner`` line of a log's lines, in order, as {field: value}."""
    return [stats for stats in (training_stats(line) for line in lines) if stats is not None]


def per_shard(stats: Dict[str, float], prefix: str) -> Dict[str, float]:
    """{shard: value} of the fields named ``<prefix>_<shard>`` (e.g. ``accuracy_read``)."""
    return {key[len(prefix) + 1:]: value for key, value in stats.items() if key.startswith(prefix + "_")}
