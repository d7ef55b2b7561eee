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
    from . import criterions, models, tasks  # noqa: F401  (registers the plugins)
