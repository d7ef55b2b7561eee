"""``fairseq-train`` that records what each update all-reduces, and whose c10d backend runs on CPU.

    EQSSL_COMM_LOG=comm.jsonl python examples/fairseq_train_counting.py DATA [fairseq-train flags]

Each rank appends one JSON line per update to ``comm.jsonl.rank<R>``: the all-reduce calls and
bytes of the gradient (``grad_calls``, ``grad_bytes``: c10d's bucket all-reduces, or
``legacy_ddp``'s explicit one) and of everything else fairseq syncs in the update (logging
statistics: ``other_calls``, ``other_bytes``), the trainable parameters' bytes and the rank's
peak RSS so far. Without EQSSL_COMM_LOG it is plain ``fairseq-train``, save for the CPU change
below.

fairseq always builds torch's DistributedDataParallel with ``device_ids=[device_id]``, which
torch refuses for a CPU module; here those two arguments are left out for CPU modules, so that
fairseq's real c10d path (DDP's reducer and hooks, gloo's all-reduce) runs on CPU. The
gradient all-reduce goes through torch's own default hook (``allreduce_hook``), wrapped to count.
"""

import functools
import json
import os
import resource
import sys

from fairseq_cli.train import cli_main  # first: it sets up fairseq's log format

import fairseq.models.distributed_fairseq_model as distributed_fairseq_model
import torch
import torch.distributed as dist
from fairseq.distributed import LegacyDistributedDataParallel
from fairseq.trainer import Trainer
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

LOG = os.environ.get("EQSSL_COMM_LOG")
counts = {"grad_calls": 0, "grad_bytes": 0, "other_calls": 0, "other_bytes": 0}
in_gradient_reduce = False


def count(kind: str, tensor: torch.Tensor) -> None:
    counts[f"{kind}_calls"] += 1
    counts[f"{kind}_bytes"] += tensor.numel() * tensor.element_size()


def counting_allreduce_hook(process_group, bucket: dist.GradBucket):
    global in_gradient_reduce
    calls = counts["grad_calls"]
    in_gradient_reduce = True  # torch's hook calls dist.all_reduce, which counts it
    try:
        future = default_hooks.allreduce_hook(process_group, bucket)
    finally:
        in_gradient_reduce = False
    if counts["grad_calls"] == calls:  # it reached the process group some other way
        count("grad", bucket.buffer())
    return future


class CPUDistributedDataParallel(DistributedDataParallel):
    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        if all(p.device.type == "cpu" for p in module.parameters()):
            device_ids = output_device = None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)
        if LOG:
            self.register_comm_hook(kwargs.get("process_group"), counting_allreduce_hook)


def counting_all_reduce(all_reduce):
    @functools.wraps(all_reduce)
    def wrapper(tensor, *args, **kwargs):
        count("grad" if in_gradient_reduce else "other", tensor)
        return all_reduce(tensor, *args, **kwargs)
    return wrapper


def counting_legacy_reduce(all_reduce_grads):
    @functools.wraps(all_reduce_grads)
    def wrapper(self, *args, **kwargs):
        global in_gradient_reduce
        in_gradient_reduce = True
        try:
            return all_reduce_grads(self, *args, **kwargs)
        finally:
            in_gradient_reduce = False
    return wrapper


def recording_train_step(train_step):
    @functools.wraps(train_step)
    def wrapper(self, *args, **kwargs):
        for key in counts:
            counts[key] = 0
        result = train_step(self, *args, **kwargs)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        record = dict(counts, update=self.get_num_updates(),
                      parameter_bytes=sum(p.numel() * p.element_size() for p in trainable),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        with open(f"{LOG}.rank{dist.get_rank() if dist.is_initialized() else 0}", "a") as f:
            f.write(json.dumps(record) + "\n")
        return result
    return wrapper


distributed_fairseq_model.DistributedDataParallel = CPUDistributedDataParallel
if LOG:
    dist.all_reduce = counting_all_reduce(dist.all_reduce)
    LegacyDistributedDataParallel.all_reduce_grads = counting_legacy_reduce(
        LegacyDistributedDataParallel.all_reduce_grads)
    Trainer.train_step = recording_train_step(Trainer.train_step)

if __name__ == "__main__":
    sys.exit(cli_main())
