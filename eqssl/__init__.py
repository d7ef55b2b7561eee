"""eqssl: equilibrium-constrained self-supervised speech pre-training as a fairseq plugin.

``fairseq-train --user-dir eqssl`` imports this package; fairseq then imports ``tasks/`` and
``models/`` itself, but nothing imports ``criterions/``, so it is imported here. The algorithm
(``eqssl.bilevel``) does not import fairseq.
"""

__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # eqssl.bilevel alone works without fairseq
    pass
else:
    import argparse

    import torch
    from fairseq.data import Dictionary

    # torch >= 2.6 loads with weights_only=True, which fairseq's load_checkpoint_to_cpu does not
    # override: fine-tuned checkpoints pickle their target Dictionary (task_state), and old
    # releases an argparse.Namespace. Both are plain data; allow exactly these two.
    torch.serialization.add_safe_globals([Dictionary, argparse.Namespace])

    from . import criterions, models, tasks  # noqa: F401  (registers the plugins)
