"""What the fairseq glue needs to know about fairseq's distributed wrappers."""

from typing import Optional

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


def torch_ddp(model: torch.nn.Module) -> Optional[DistributedDataParallel]:
    """torch's DistributedDataParallel inside fairseq's wrappers (the c10d backend), else None."""
    while isinstance(model, WRAPPERS):
        if isinstance(model, DistributedDataParallel):
            return model
        model = model.module
    return None
