"""What the fairseq glue needs to know about fairseq's distributed wrappers."""

import torch
from fairseq.distributed import LegacyDistributedDataParallel, ModuleProxyWrapper
from torch.nn.parallel import DistributedDataParallel

WRAPPERS = (ModuleProxyWrapper, DistributedDataParallel, LegacyDistributedDataParallel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside fairseq's distributed wrappers.

    fairseq wraps the model as ModuleProxyWrapper(DistributedDataParallel(model)) (or
    LegacyDistributedDataParallel), so ``model.module`` is still a wrapper: passes through it
    would run DDP's all-reduce hooks, and it lacks the model's own methods.
    """
    while isinstance(model, WRAPPERS):
        model = model.module
    return model
