"""eqssl: equilibrium-constrained self-supervised speech pre-training as a fairseq plugin.

``fairseq-train --user-dir eqssl`` imports this package; fairseq then imports ``tasks/`` and
``models/`` itself, but nothing imports ``criterions/``, so it is imported here. The algorithm
(``eqssl.bilevel``) does not import fairseq.
"""

__version__ = "0.1.0"

import warnings

try:
    with warnings.catch_warnings():
        # fairseq decorates functions with torch.jit.script as it is imported, which torch
        # deprecates: a notice for fairseq, not for whoever runs an eqssl command.
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        import fairseq  # noqa: F401
        import fairseq.models  # noqa: F401  (where those decorators are)
except ImportError:  # eqssl.bilevel alone works without fairseq
    pass
else:
    import argparse
    import collections
    import typing

    import omegaconf
    import torch
    from fairseq.data import Dictionary
    from fairseq.distributed.utils import _TensorPlaceholder

    # torch >= 2.6 loads with weights_only=True, which fairseq's load_checkpoint_to_cpu does not
    # override: fine-tuned checkpoints pickle their target Dictionary (task_state), and old
    # releases an argparse.Namespace. Resuming on several workers, fairseq's rank 0 loads the
    # checkpoint and broadcasts it pickled (tensors sent apart), its config now an OmegaConf
    # object, and every other rank unpickles it with torch.load too. All of these are plain
    # data; allow exactly them.
    torch.serialization.add_safe_globals([
        Dictionary, argparse.Namespace, collections.defaultdict, typing.Any,
        int, float, bool, str, bytes, dict, list, tuple, type(None),
        omegaconf.DictConfig, omegaconf.ListConfig, omegaconf.base.ContainerMetadata,
        omegaconf.base.Metadata, omegaconf.nodes.AnyNode, omegaconf.nodes.StringNode,
        omegaconf.nodes.IntegerNode, omegaconf.nodes.FloatNode, omegaconf.nodes.BooleanNode,
        _TensorPlaceholder,  # where fairseq's broadcast takes the tensors out of the pickle
    ])

    from . import criterions, models, tasks  # noqa: F401  (registers the plugins)
