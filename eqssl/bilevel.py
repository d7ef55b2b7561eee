"""The first-order equilibrium gradient: Algorithm 1 of PTEC/PTLOC (arXiv 2508.19990).

For every shard ``i`` with loss ``g_i`` and weight ``w_i``::

    φ_i^0 = θ
    φ_i^k = φ_i^{k-1} - α ∇g_i(φ_i^{k-1})        k = 1 … K   (plain SGD, restarted each update)
    G_i   = ∇g_i(φ_i^K)

and ``Σ_i w_i G_i`` is added to ``θ.grad``; the outer optimizer then steps with it. The Hessian
products of the exact bilevel gradient are dropped (first-order approximation), so no
second-order graph is ever built. This is first-order MAML with the query batch equal to the
support batch, not Reptile.

Pure PyTorch on purpose: nothing here knows about fairseq. The fairseq task passes in what its
trainer needs (the loss-scaled ``backward``, a ``no_sync`` context for DDP) as arguments.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, ContextManager, List, Optional, Sequence

import numpy as np
import torch
from torch.profiler import record_function

Closure = Callable[[], torch.Tensor]


@dataclass
class ShardRecord:
    """What happened to one shard during one call of :func:`equilibrium_backward`."""

    loss_before: float
    """g_i(θ): the shard's loss at the shared parameters."""
    loss_after: float
    """g_i(φ_i^K): the loss after the K inner steps (equals ``loss_before`` when K = 0)."""
    weight: float
    """w_i, the weight its gradient entered the outer sum with."""
    inner_losses: List[float] = field(default_factory=list)
    """g_i(φ_i^k) for k = 0 … K-1, the losses the inner steps were taken on."""
    dropped: bool = False
    """True when a non-finite loss or gradient appeared: the shard added nothing to ``.grad``."""
    gradient_change: float = math.nan
    """‖∇g_i(φ_i^K) − ∇g_i(θ)‖ / ‖∇g_i(θ)‖: how much the inner steps changed the shard's gradient,
    i.e. how far PTLOC's update is from CSSL's (0 for K = 0); nan unless measured."""

    @property
    def gap(self) -> float:
        """The equilibrium gap g_i(θ) - g_i(φ_i^K): how far θ is from the shard's K-step optimum."""
        return self.loss_before - self.loss_after


class _GradientChange:
    """‖G − g‖ / ‖g‖ between a shard's gradient g at θ (kept from its first inner step) and G at
    φ^K, accumulated parameter by parameter from tensor hooks as the outer backward produces G,
    so that G is never stored: only ‖G‖², ⟨G, g⟩ and ‖g‖² are."""

    def __init__(self, params: Sequence[torch.Tensor], at_theta: List[Optional[torch.Tensor]],
                 theta_scale: float) -> None:
        self.params, self.at_theta, self.theta_scale = params, at_theta, theta_scale
        # Sums stay on the parameters' device until value(): no synchronisation per parameter.
        self.outer_sq: List[torch.Tensor] = []
        self.dot: List[torch.Tensor] = []
        self.handles: list = []

    def _hook(self, index: int, grad: torch.Tensor) -> None:
        outer = grad.detach().double()
        self.outer_sq.append(outer.pow(2).sum())
        if self.at_theta[index] is not None:
            self.dot.append((outer * self.at_theta[index]).sum())

    def __enter__(self) -> "_GradientChange":
        self.handles = [p.register_hook(partial(self._hook, i)) for i, p in enumerate(self.params)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def value(self, outer_scale: float) -> float:
        """The relative change, with G's backward scaled by ``outer_scale`` (weight × loss scale)."""
        def total(values: List[torch.Tensor]) -> float:
            return float(sum(v.double().cpu() for v in values)) if values else 0.0

        outer_sq, dot = total(self.outer_sq), total(self.dot)
        theta_sq = total([g.double().pow(2).sum() for g in self.at_theta if g is not None])
        if outer_scale <= 0 or theta_sq <= 0:
            return math.nan
        a, b = 1.0 / outer_scale, 1.0 / self.theta_scale  # G = a·(hooked), g = b·(kept)
        change_sq = a * a * outer_sq - 2 * a * b * dot + b * b * theta_sq
        change = math.sqrt(max(change_sq, 0.0)) / (b * math.sqrt(theta_sq))
        return change if math.isfinite(change) else math.nan


class _RandomState:
    """Snapshot of every random generator a loss may draw from (masks, negatives, dropout)."""

    def __init__(self, cuda_devices: Sequence[torch.device]) -> None:
        self.cuda_devices = list(cuda_devices)
        self.torch = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self.numpy = np.random.get_state()
        self.python = random.getstate()

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        for device, state in zip(self.cuda_devices, self.cuda):
            torch.cuda.set_rng_state(state, device)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


def _check_arguments(
    n_shards: int, inner_steps: int, inner_lr: float, weights: Optional[Sequence[float]]
) -> List[float]:
    """Validate the call and return the shard weights (uniform 1/M by default)."""
    if n_shards == 0:
        raise ValueError("equilibrium_backward needs at least one shard closure")
    if not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"inner_steps must be an integer >= 0, got {inner_steps!r}")
    if inner_steps > 0 and not (inner_lr > 0 and math.isfinite(inner_lr)):
        raise ValueError(f"inner_lr must be a finite number > 0, got {inner_lr!r}")
    if weights is None:
        return [1.0 / n_shards] * n_shards
    weights = [float(w) for w in weights]
    if len(weights) != n_shards:
        raise ValueError(f"got {len(weights)} weights for {n_shards} shard closures")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"shard weights must be finite and >= 0, got {weights}")
    return weights


def _sgd_update(p: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
    """p ← p - lr·grad; in bfloat16 rounded stochastically (up with probability equal to the
    fraction of the way to the next representable value), so that the step is kept on average.

    bfloat16 has 8 significant bits: rounded to nearest, a step smaller than half a unit in the
    last place of its weight (2^-9 of it) is lost and a larger one is biased. On the tiny model
    this lost 4 % of the inner step's effect on the outer gradient; stochastic rounding, 2 %.
    """
    if p.dtype != torch.bfloat16:
        p.add_(grad, alpha=-lr)
        return
    exact = p.float().add_(grad.float(), alpha=-lr)
    bits = exact.view(torch.int32)  # bfloat16 is the upper half of a float32
    bits.add_(torch.randint_like(bits, 0, 1 << 16)).bitwise_and_(-(1 << 16))
    p.copy_(exact)  # exact: the lower 16 bits are zero


def _sgd_step_in_backward(loss: torch.Tensor, params: Sequence[torch.Tensor], lr: float,
                          keep: Optional[List[Optional[torch.Tensor]]] = None) -> bool:
    """One inner SGD step φ ← φ - lr ∇loss(φ), applied to each parameter as soon as backward has
    finished its gradient (PyTorch's optimizer-in-backward pattern), so that at most one
    parameter's inner gradient exists at a time instead of a whole copy. Returns whether every
    gradient was finite. The parameters' ``.grad`` (the outer sum so far) is left as found.
    ``keep``: a list as long as ``params`` that receives a float32 copy of each gradient.

    Safe because a parameter's gradient is complete only after every node that used it has run
    its backward; were its value still needed, autograd's version check would raise.
    """
    outer_grads = [p.grad for p in params]  # references, not copies
    # A NaN or inf anywhere makes its sum non-finite. Unlike torch.isfinite this writes no mask:
    # one read of each gradient while it is still in cache. In float32 (fp16 gradients are
    # accumulated in it too) the sum overflows only for gradients that are unusable anyway.
    checksums: List[torch.Tensor] = []

    def step(p: torch.Tensor, index: int) -> None:
        with torch.no_grad():
            checksums.append(p.grad.sum(dtype=torch.float32))
            if keep is not None:
                keep[index] = p.grad.to(torch.float32, copy=True)
            _sgd_update(p, p.grad, lr)
        p.grad = None

    for p in params:
        p.grad = None
    handles = [p.register_post_accumulate_grad_hook(partial(step, index=i)) for i, p in enumerate(params)]
    try:
        torch.autograd.backward(loss, inputs=list(params))
    finally:
        for handle in handles:
            handle.remove()
        for p, grad in zip(params, outer_grads):
            p.grad = grad
    if not checksums:
        return True
    return bool(torch.isfinite(torch.stack([c.to(checksums[0].device) for c in checksums])).all())


@record_function("eqssl.update")  # the profiler labels serve examples/benchmark_update_cost.py
def equilibrium_backward(
    model: torch.nn.Module,
    closures: Sequence[Closure],
    inner_steps: int,
    inner_lr: float,
    weights: Optional[Sequence[float]] = None,
    *,
    inner_closures: Optional[Sequence[Closure]] = None,
    backward: Optional[Callable[[torch.Tensor], None]] = None,
    outer_context: Optional[Callable[[int], ContextManager]] = None,
    inner_loss_scale: float = 1.0,
    same_randomness: bool = True,
    measure_gradient_change: bool = False,
    outer_loss_scale: float = 1.0,
) -> List[ShardRecord]:
    """Add the first-order equilibrium gradient ``Σ_i w_i ∇g_i(φ_i^K)`` to every trainable ``.grad``.

    Args:
        model: the module whose trainable parameters are θ. They are exactly (bitwise) as on
            entry when this returns; only their ``.grad`` changes.
        closures: one zero-argument callable per shard returning its scalar loss g_i at the
            module's current parameters.
        inner_steps: K, plain SGD steps per shard from θ. 0 gives the plain weighted average
            gradient at θ, i.e. conventional (CSSL) training.
        inner_lr: α, the inner SGD learning rate (ignored when ``inner_steps`` is 0).
        weights: w_i; uniform 1/M when None.
        inner_closures: losses for the inner steps when they must be computed differently from
            the outer pass, e.g. on the module unwrapped from DistributedDataParallel so that
            the inner backward passes trigger no gradient all-reduce. Default: ``closures``.
        backward: runs the outer backward pass on ``w_i * g_i(φ_i^K)``; fairseq passes
            ``optimizer.backward`` so that its fp16 loss scale is applied. Default:
            ``loss.backward()``.
        outer_context: ``outer_context(i)`` is entered around shard i's outer forward and
            backward, e.g. ``model.no_sync()`` for all shards but the last under DDP.
        inner_loss_scale: the inner losses are multiplied by this before differentiation and
            the gradients divided by it again, so that fp16 gradients do not underflow while α
            keeps its meaning.
        same_randomness: evaluate each shard's loss with the same random state (masks,
            negatives, dropout) at every point, so that g_i is one deterministic function of the
            parameters and ``loss_before - loss_after`` measures adaptation, not sampling noise.
        measure_gradient_change: fill each record's ``gradient_change`` (K >= 1). Costs a float32
            copy of the gradient at θ, kept from the first inner step, and a few dot products;
            ``.grad`` is the same as without it.
        outer_loss_scale: the factor ``backward`` multiplies the loss by (fairseq's fp16 loss
            scale), divided out of the measured gradient change.

    Returns:
        One :class:`ShardRecord` per shard, in the order of ``closures``.

    A shard whose loss or inner gradient becomes non-finite is dropped from the update: it adds
    nothing to ``.grad`` and its record has ``dropped=True``.
    """
    weights = _check_arguments(len(closures), inner_steps, inner_lr, weights)
    if inner_closures is None:
        inner_closures = closures
    elif len(inner_closures) != len(closures):
        raise ValueError(f"got {len(inner_closures)} inner closures for {len(closures)} shards")
    if backward is None:
        backward = torch.Tensor.backward
    if outer_context is None:
        outer_context = lambda i: contextlib.nullcontext()  # noqa: E731

    params = [p for p in model.parameters() if p.requires_grad]
    cuda_devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
    # The one extra copy of the trainable parameters that φ_i is rebuilt from for every shard.
    with record_function("eqssl.copy_theta"):
        theta = [p.detach().clone() for p in params] if inner_steps > 0 else []

    records = []
    try:
        for i, (closure, inner_closure) in enumerate(zip(closures, inner_closures)):
            rng = _RandomState(cuda_devices) if same_randomness else None
            record = ShardRecord(math.nan, math.nan, weights[i])
            at_theta: Optional[List[Optional[torch.Tensor]]] = (
                [None] * len(params) if measure_gradient_change and inner_steps > 0 else None)
            for step in range(inner_steps):
                if rng is not None:
                    rng.restore()
                with record_function("eqssl.inner_forward"):
                    loss = inner_closure()
                    record.inner_losses.append(loss.item())
                if not math.isfinite(record.inner_losses[-1]):
                    record.dropped = True
                    break
                with record_function("eqssl.inner_backward_and_step"):
                    finite = _sgd_step_in_backward(loss * inner_loss_scale, params, inner_lr / inner_loss_scale,
                                                   keep=at_theta if step == 0 else None)
                del loss
                if not finite:
                    record.dropped = True  # θ is restored below; nothing reached .grad
                    break
            if not record.dropped:
                if rng is not None:
                    rng.restore()
                change = _GradientChange(params, at_theta, inner_loss_scale) if at_theta is not None else None
                with outer_context(i), record_function("eqssl.outer_forward_backward"):
                    loss = closure()
                    record.loss_after = loss.item()
                    if math.isfinite(record.loss_after):
                        with change if change is not None else contextlib.nullcontext():
                            backward(loss * weights[i])
                    else:
                        record.dropped = True
                    del loss
                if change is not None and not record.dropped:
                    record.gradient_change = change.value(weights[i] * outer_loss_scale)
                del change, at_theta
            record.loss_before = record.inner_losses[0] if record.inner_losses else record.loss_after
            if theta:
                with torch.no_grad(), record_function("eqssl.restore_theta"):
                    torch._foreach_copy_(params, theta)
            records.append(record)
    finally:
        # Also on an exception (e.g. out of memory): leave θ as it was found.
        if theta:
            with torch.no_grad():
                torch._foreach_copy_(params, theta)
    return records
