"""The built-in corpus presets, mirroring the paper's two settings in miniature.

A speaker is an eSpeak NG voice (language or accent) with a voice variant, a speaking rate and
a pitch. Pre-training and "unseen" fine-tuning sets draw from disjoint variant pools, so the
unseen sets have speakers (and, by sampling, sentences) never heard in pre-training.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

PRETRAIN_VARIANTS = ("m1", "m2", "m3", "f1", "f2")
HELD_OUT_VARIANTS = ("m4", "m5", "f3", "f4")


@dataclass(frozen=True)
class SetSpec:
    """One shard (pre-training) or one labelled language/domain (fine-tuning)."""

    name: str
    language: str
    """wordfreq language of the text."""
    voices: Tuple[str, ...]
    """eSpeak NG voices (languages or accents) speakers are drawn from."""
    domain: str
    variants: Tuple[str, ...] = PRETRAIN_VARIANTS
    seen: bool = True
    """Whether this language/domain (and these speakers) occur in pre-training."""


@dataclass(frozen=True)
class Size:
    pretrain: Dict[str, int]
    finetune: Dict[str, int]
    words: Tuple[int, int]
    """Words per utterance; eSpeak NG speaks about 2.5 words a second."""


SIZES = {
    "tiny": Size({"train": 32, "valid": 8}, {"train_10m": 8, "train_1h": 16, "dev": 6, "test": 8}, (4, 12)),
    "small": Size({"train": 600, "valid": 60}, {"train_10m": 120, "train_1h": 720, "dev": 100, "test": 150}, (5, 30)),
    "full": Size({"train": 6000, "valid": 300}, {"train_10m": 120, "train_1h": 720, "dev": 300, "test": 500}, (5, 30)),
}


@dataclass(frozen=True)
class Preset:
    description: str
    pretrain: List[SetSpec] = field(default_factory=list)
    finetune: List[SetSpec] = field(default_factory=list)


US = ("en-us",)
PRESETS = {
    "multidomain": Preset(
        "English in several domains; fine-tuning on seen domains and on unseen ones "
        "(far-field meetings and unseen accents), with held-out speakers",
        pretrain=[
            SetSpec("read", "en", US, "read"),
            SetSpec("telephone", "en", US, "telephone"),
            SetSpec("broadcast", "en", US, "broadcast"),
            SetSpec("accent", "en", ("en-gb-scotland", "en-029", "en-gb-x-rp"), "accent"),
        ],
        finetune=[
            SetSpec("read", "en", US, "read", HELD_OUT_VARIANTS, seen=True),
            SetSpec("telephone", "en", US, "telephone", HELD_OUT_VARIANTS, seen=True),
            SetSpec("meeting", "en", US, "meeting", HELD_OUT_VARIANTS, seen=False),
            SetSpec("accent_unseen", "en", ("en-gb-x-gbcwmd", "en-us-nyc", "en-gb-x-gbclan"), "accent",
                    HELD_OUT_VARIANTS, seen=False),
        ],
    ),
    "multilingual": Preset(
        "read speech in English, French and Dutch for pre-training; fine-tuning on languages "
        "never seen in pre-training (Turkish, Swedish, Tamil, Finnish; Welsh, the paper's fourth, "
        "has no offline word list)",
        pretrain=[
            SetSpec("en", "en", US, "read"),
            SetSpec("fr", "fr", ("fr",), "read"),
            SetSpec("nl", "nl", ("nl",), "read"),
        ],
        finetune=[
            SetSpec(lang, lang, (lang,), "read", HELD_OUT_VARIANTS, seen=False)
            for lang in ("tr", "sv", "ta", "fi")
        ],
    ),
}
