"""Tests for :func:`eqssl.bilevel.equilibrium_backward` (first-order equilibrium gradient).

Every expected value is computed independently of the implementation: closed forms on
quadratics, or explicit SGD with ``torch.func`` on a small network.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

try:
    from eqssl.bilevel import ShardRecord, equilibrium_backward
except ImportError:  # run as plain `pytest` without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from eqssl.bilevel import ShardRecord, equilibrium_backward

DTYPE = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class Vector(nn.Module):
    """A module whose only parameter is one vector θ."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())


def random_spd(dim: int, generator: torch.Generator, low: float = 0.5, high: float = 3.0):
    """A random symmetric positive definite matrix with eigenvalues in [low, high]."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DTYPE))
    eig = low + (high - low) * torch.rand(dim, generator=generator, dtype=DTYPE)
    return q @ torch.diag(eig) @ q.T


def quadratic_problem(n_shards: int = 3, dim: int = 4, seed: int = 0):
    """θ and per-shard (A_i, c_i) for g_i(θ) = 0.5 (θ - c_i)^T A_i (θ - c_i)."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(dim, generator=gen, dtype=DTYPE)
    shards = [
        (random_spd(dim, gen), torch.randn(dim, generator=gen, dtype=DTYPE))
        for _ in range(n_shards)
    ]
    return theta, shards


def quadratic_closure(model: Vector, A: torch.Tensor, c: torch.Tensor):
    def closure() -> torch.Tensor:
        e = model.theta - c
        return 0.5 * e @ A @ e

    return closure


def quadratic_closed_form(theta, A, c, K, alpha):
    """(φ^K, g(θ), g(φ^K), G = ∇g(φ^K)) for one quadratic shard."""
    M = torch.eye(len(theta), dtype=DTYPE) - alpha * A
    e_K = torch.linalg.matrix_power(M, K) @ (theta - c)
    e_0 = theta - c
    return c + e_K, float(0.5 * e_0 @ A @ e_0), float(0.5 * e_K @ A @ e_K), A @ e_K


def make_mlp(seed: int = 0, dropout: float = 0.0, dtype=DTYPE) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 6), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(6, 2))
    return nn.Sequential(*layers).to(dtype)


def random_batches(n_shards: int, seed: int = 1, n: int = 7, dtype=DTYPE):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 3, generator=gen, dtype=DTYPE).to(dtype),
            torch.randn(n, 2, generator=gen, dtype=DTYPE).to(dtype),
        )
        for _ in range(n_shards)
    ]


def mse_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: ((model(x) - y) ** 2).mean()


def grads_of(model: nn.Module):
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def snapshot(model: nn.Module):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_bitwise(model: nn.Module, before) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"parameter {n} changed"


# --------------------------------------------------------------------------------------------
# 1. Closed form on quadratics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("weights", [None, [0.2, 0.5, 1.3]])
def test_quadratic_matches_closed_form(K, weights):
    """.grad = Σ w_i A_i (I - αA_i)^K (θ - c_i); loss_before/after/inner_losses match g_i."""
    alpha = 0.15
    theta, shards = quadratic_problem()
    model = Vector(theta)
    closures = [quadratic_closure(model, A, c) for A, c in shards]

    records = equilibrium_backward(model, closures, K, alpha, weights)

    w = weights if weights is not None else [1.0 / len(shards)] * len(shards)
    expected = torch.zeros_like(theta)
    assert len(records) == len(shards)
    for (A, c), wi, rec in zip(shards, w, records):
        _, before, after, G = quadratic_closed_form(theta, A, c, K, alpha)
        expected += wi * G
        assert isinstance(rec, ShardRecord)
        assert not rec.dropped
        assert rec.weight == pytest.approx(wi, rel=0, abs=0)
        assert rec.loss_before == pytest.approx(before, rel=1e-12)
        assert rec.loss_after == pytest.approx(after, rel=1e-12)
        assert rec.gap == pytest.approx(before - after, rel=1e-9, abs=1e-14)
        assert len(rec.inner_losses) == K
        inner = [quadratic_closed_form(theta, A, c, k, alpha)[2] for k in range(K)]
        assert rec.inner_losses == pytest.approx(inner, rel=1e-12)
    torch.testing.assert_close(model.theta.grad, expected, **TIGHT)
    assert torch.equal(model.theta.detach(), theta)


def test_quadratic_inner_steps_reduce_loss():
    """With a stable step size every shard's gap is positive (φ^K is closer to c_i)."""
    theta, shards = quadratic_problem()
    model = Vector(theta)
    records = equilibrium_backward(model, [quadratic_closure(model, A, c) for A, c in shards], 3, 0.15)
    assert all(r.gap > 0 for r in records)


# --------------------------------------------------------------------------------------------
# 2. Independent torch.func reference on an MLP
# --------------------------------------------------------------------------------------------


def func_reference(model, batches, K, alpha, weights):
    """Σ w_i ∇g_i(φ_i^K) with φ_i^K from K explicit SGD steps, plus per-shard losses."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_fn(params, x, y):
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    grad_fn = grad(loss_fn)
    total = {n: torch.zeros_like(t) for n, t in theta.items()}
    losses = []
    for (x, y), w in zip(batches, weights):
        phi = dict(theta)
        inner = []
        for _ in range(K):
            inner.append(float(loss_fn(phi, x, y)))
            g = grad_fn(phi, x, y)
            phi = {n: phi[n] - alpha * g[n] for n in phi}
        G = grad_fn(phi, x, y)
        for n in total:
            total[n] = total[n] + w * G[n]
        losses.append((float(loss_fn(theta, x, y)), float(loss_fn(phi, x, y)), inner))
    return total, losses


@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("weights", [None, [0.7, 0.1, 2.0]])
def test_mlp_matches_torch_func_reference(K, weights):
    """.grad on a tanh MLP equals an explicit functional SGD + grad computation."""
    alpha = 0.3
    model = make_mlp()
    batches = random_batches(3)
    w = weights if weights is not None else [1 / 3] * 3
    expected, losses = func_reference(model, batches, K, alpha, w)

    records = equilibrium_backward(model, [mse_closure(model, x, y) for x, y in batches], K, alpha, weights)

    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], **TIGHT)
    for rec, (before, after, inner) in zip(records, losses):
        assert rec.loss_before == pytest.approx(before, rel=1e-12)
        assert rec.loss_after == pytest.approx(after, rel=1e-12)
        assert rec.inner_losses == pytest.approx(inner, rel=1e-12)


def test_mlp_inner_steps_change_the_gradient():
    """K=3 gives a different gradient than K=0 (the inner steps actually do something)."""
    batches = random_batches(3)
    grads = []
    for K in (0, 3):
        model = make_mlp()
        equilibrium_backward(model, [mse_closure(model, x, y) for x, y in batches], K, 0.3)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (8.0, 1024.0)])
def test_gradient_change_matches_torch_func_and_leaves_grad_unchanged(K, scales):
    """record.gradient_change is ‖∇g_i(φ_i^K) − ∇g_i(θ)‖ / ‖∇g_i(θ)‖ computed with torch.func,
    whatever the inner and outer loss scales; measuring it changes no gradient."""
    alpha, weights = 0.3, [0.7, 0.1, 2.0]
    inner_scale, outer_scale = scales
    model = make_mlp()
    batches = random_batches(3)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_fn(params, x, y):
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    expected = []
    for x, y in batches:
        phi = dict(theta)
        for _ in range(K):
            g = grad(loss_fn)(phi, x, y)
            phi = {n: phi[n] - alpha * g[n] for n in phi}
        at_theta = torch.cat([t.flatten() for t in grad(loss_fn)(theta, x, y).values()])
        at_phi = torch.cat([t.flatten() for t in grad(loss_fn)(phi, x, y).values()])
        expected.append(float((at_phi - at_theta).norm() / at_theta.norm()))

    plain = make_mlp()
    equilibrium_backward(plain, [mse_closure(plain, x, y) for x, y in batches], K, alpha, weights,
                         backward=lambda loss: (loss * outer_scale).backward(), inner_loss_scale=inner_scale)
    records = equilibrium_backward(model, [mse_closure(model, x, y) for x, y in batches], K, alpha, weights,
                                   backward=lambda loss: (loss * outer_scale).backward(),
                                   inner_loss_scale=inner_scale, measure_gradient_change=True,
                                   outer_loss_scale=outer_scale)
    assert [r.gradient_change for r in records] == pytest.approx(expected, rel=1e-6)  # g(θ) kept in float32
    assert min(expected) > 1e-3  # the inner steps did change the gradient
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_gradient_change_is_not_measured_without_inner_steps():
    model = make_mlp()
    batches = random_batches(2)
    records = equilibrium_backward(model, [mse_closure(model, x, y) for x, y in batches], 0, 0.3,
                                   measure_gradient_change=True)
    assert all(math.isnan(r.gradient_change) for r in records)


# --------------------------------------------------------------------------------------------
# 3. K = 0 is the plain weighted average gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, [0.25, 3.0, 0.5]])
def test_k0_equals_plain_weighted_average_gradient(weights):
    """K=0 gives Σ w_i ∇g_i(θ), computed here with one ordinary backward (inner_lr ignored)."""
    model = make_mlp()
    ref = copy.deepcopy(model)
    batches = random_batches(3)
    w = weights if weights is not None else [1 / 3] * 3

    sum(wi * mse_closure(ref, x, y)() for wi, (x, y) in zip(w, batches)).backward()
    records = equilibrium_backward(
        model, [mse_closure(model, x, y) for x, y in batches], 0, 0.0, weights
    )

    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TIGHT)
    for rec in records:
        assert rec.inner_losses == []
        assert rec.loss_before == rec.loss_after
        assert rec.gap == 0.0


# --------------------------------------------------------------------------------------------
# 4. Accumulation into .grad
# --------------------------------------------------------------------------------------------


def test_gradients_accumulate_over_calls():
    """Two identical calls leave twice the gradient of one call (added, not overwritten)."""
    batches = random_batches(2)
    model = make_mlp()
    closures = [mse_closure(model, x, y) for x, y in batches]
    equilibrium_backward(model, closures, 2, 0.2)
    once = grads_of(model)
    equilibrium_backward(model, closures, 2, 0.2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n], **TIGHT)


def test_gradients_add_to_preset_grad():
    """A pre-existing .grad is kept and the equilibrium gradient is added to it."""
    batches = random_batches(2)
    fresh = make_mlp()
    equilibrium_backward(fresh, [mse_closure(fresh, x, y) for x, y in batches], 2, 0.2)
    result = grads_of(fresh)

    model = make_mlp()
    preset = {}
    for n, p in model.named_parameters():
        preset[n] = torch.randn_like(p)
        p.grad = preset[n].clone()
    equilibrium_backward(model, [mse_closure(model, x, y) for x, y in batches], 2, 0.2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, preset[n] + result[n], **TIGHT)


# --------------------------------------------------------------------------------------------
# 5. Parameters are restored bitwise
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parameters_bitwise_unchanged_after_inner_steps(dtype):
    """After K=3 inner steps on several shards every parameter is bitwise as on entry."""
    model = make_mlp(dtype=dtype)
    before = snapshot(model)
    batches = random_batches(3, dtype=dtype)
    equilibrium_backward(model, [mse_closure(model, x, y) for x, y in batches], 3, 0.37)
    assert_params_bitwise(model, before)


def test_parameters_restored_when_a_closure_raises():
    """An exception in the middle of a shard's inner steps still leaves θ bitwise intact."""
    model = make_mlp()
    before = snapshot(model)
    (x0, y0), (x1, y1) = random_batches(2)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:  # second inner step, after one SGD step was already taken
            raise RuntimeError("boom")
        return ((model(x1) - y1) ** 2).mean()

    with pytest.raises(RuntimeError, match="boom"):
        equilibrium_backward(model, [mse_closure(model, x0, y0), failing], 3, 0.5)
    assert_params_bitwise(model, before)


# --------------------------------------------------------------------------------------------
# 6. Frozen and unused parameters
# --------------------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.frozen = nn.Linear(3, 3).to(DTYPE)
        self.frozen.requires_grad_(False)
        self.trunk = nn.Linear(3, 4).to(DTYPE)
        self.head_a = nn.Linear(4, 1).to(DTYPE)
        self.head_b = nn.Linear(4, 1).to(DTYPE)

    def forward(self, x, head):
        h = torch.tanh(self.trunk(torch.tanh(self.frozen(x))))
        return (self.head_a if head == "a" else self.head_b)(h)


def test_frozen_parameter_gets_no_grad_and_is_not_stepped():
    """A requires_grad=False parameter ends with grad None and unchanged value."""
    model = TwoHeads()
    frozen_before = {n: p.clone() for n, p in model.frozen.named_parameters()}
    (xa, ya), (xb, yb) = random_batches(2, dtype=DTYPE)
    ya, yb = ya[:, :1], yb[:, :1]
    closures = [
        lambda: ((model(xa, "a") - ya) ** 2).mean(),
        lambda: ((model(xb, "a") - yb) ** 2).mean(),
    ]
    equilibrium_backward(model, closures, 3, 0.5)
    for n, p in model.frozen.named_parameters():
        assert p.grad is None
        assert torch.equal(p, frozen_before[n])
    assert model.trunk.weight.grad is not None


@pytest.mark.parametrize("K", [0, 2])
def test_unused_head_receives_nothing_from_other_shard(K):
    """Shard A uses only head_a, shard B only head_b: each head's grad is its own shard's term."""
    alpha, weights = 0.4, [0.3, 1.7]
    (xa, ya), (xb, yb) = random_batches(2, dtype=DTYPE)
    ya, yb = ya[:, :1], yb[:, :1]

    def closures_for(m):
        return [
            lambda: ((m(xa, "a") - ya) ** 2).mean(),
            lambda: ((m(xb, "b") - yb) ** 2).mean(),
        ]

    model = TwoHeads()
    equilibrium_backward(model, closures_for(model), K, alpha, weights)

    # Each shard alone, with its weight: the head it does not use must stay at None.
    only = []
    for i in range(2):
        m = TwoHeads()
        equilibrium_backward(m, [closures_for(m)[i]], K, alpha, [weights[i]])
        unused = m.head_b if i == 0 else m.head_a
        assert all(p.grad is None for p in unused.parameters())
        only.append(m)

    for pa, pa_only in zip(model.head_a.parameters(), only[0].head_a.parameters()):
        torch.testing.assert_close(pa.grad, pa_only.grad, **TIGHT)
    for pb, pb_only in zip(model.head_b.parameters(), only[1].head_b.parameters()):
        torch.testing.assert_close(pb.grad, pb_only.grad, **TIGHT)
    for p, p0, p1 in zip(model.trunk.parameters(), only[0].trunk.parameters(), only[1].trunk.parameters()):
        torch.testing.assert_close(p.grad, p0.grad + p1.grad, **TIGHT)


# --------------------------------------------------------------------------------------------
# 7. same_randomness
# --------------------------------------------------------------------------------------------


def dropout_setup():
    model = make_mlp(dropout=0.5)
    model.train()
    batches = random_batches(2)
    return model, [mse_closure(model, x, y) for x, y in batches], batches


def test_same_randomness_k0_loss_before_equals_loss_after():
    """With dropout and K=0 the record's loss_before equals loss_after."""
    model, closures, _ = dropout_setup()
    for rec in equilibrium_backward(model, closures, 0, 0.1):
        assert rec.loss_before == rec.loss_after


def test_same_randomness_is_deterministic_given_seed():
    """Two K=1 calls after the same torch.manual_seed give identical gradients and records."""
    results = []
    for _ in range(2):
        model, closures, _ = dropout_setup()
        torch.manual_seed(1234)
        records = equilibrium_backward(model, closures, 1, 0.3)
        results.append((grads_of(model), [(r.loss_before, r.loss_after) for r in records]))
    for n in results[0][0]:
        assert torch.equal(results[0][0][n], results[1][0][n])
    assert results[0][1] == results[1][1]


@pytest.mark.parametrize("K", [1, 3])
def test_same_randomness_uses_one_dropout_mask_per_shard(K):
    """Dropout result equals a manual reference replaying the shard's RNG state at every φ^k."""
    alpha = 0.3
    model, closures, batches = dropout_setup()
    ref = copy.deepcopy(model)
    params = [p for p in ref.parameters()]

    torch.manual_seed(99)
    expected = [torch.zeros_like(p) for p in params]
    theta = [p.detach().clone() for p in params]
    for x, y in batches:
        state = torch.get_rng_state()
        for _ in range(K):
            torch.set_rng_state(state)
            gs = torch.autograd.grad(((ref(x) - y) ** 2).mean(), params)
            with torch.no_grad():
                for p, g in zip(params, gs):
                    p -= alpha * g
        torch.set_rng_state(state)
        gs = torch.autograd.grad(((ref(x) - y) ** 2).mean(), params)
        for e, g in zip(expected, gs):
            e += 0.5 * g
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)

    torch.manual_seed(99)
    equilibrium_backward(model, closures, K, alpha)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, **TIGHT)


def test_same_randomness_removes_sampling_noise_from_gap():
    """With a negligible inner step the gap is ~0 under same_randomness, but not without it."""
    model, closures, _ = dropout_setup()
    torch.manual_seed(5)
    same = equilibrium_backward(model, closures, 1, 1e-9, same_randomness=True)
    torch.manual_seed(5)
    diff = equilibrium_backward(model, closures, 1, 1e-9, same_randomness=False)
    assert all(abs(r.gap) < 1e-6 for r in same)
    assert any(abs(r.gap) > 1e-3 for r in diff)


# --------------------------------------------------------------------------------------------
# 8. Non-finite shards are dropped
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [0, 2])
@pytest.mark.parametrize("bad", ["nan", "inf", "log_negative"])
def test_nonfinite_shard_is_dropped(K, bad):
    """A shard with a NaN/inf loss adds nothing; the others contribute their weighted gradients."""
    alpha, weights = 0.15, [0.4, 0.9, 1.1]
    theta, shards = quadratic_problem()
    model = Vector(theta)
    closures = [quadratic_closure(model, A, c) for A, c in shards]
    good = closures[1]
    if bad == "nan":
        closures[1] = lambda: good() * float("nan")
    elif bad == "inf":
        closures[1] = lambda: good() * float("inf")
    else:
        closures[1] = lambda: torch.log(-1.0 - good())

    records = equilibrium_backward(model, closures, K, alpha, weights)

    assert [r.dropped for r in records] == [False, True, False]
    expected = sum(
        weights[i] * quadratic_closed_form(theta, *shards[i], K, alpha)[3] for i in (0, 2)
    )
    torch.testing.assert_close(model.theta.grad, expected, **TIGHT)
    assert torch.equal(model.theta.detach(), theta)
    assert torch.isfinite(model.theta.grad).all()


def exp_square_model():
    """g(θ) = Σ exp(θ²) at θ = 1: one inner step with α = 1000 sends θ to about -5400."""
    return Vector(torch.ones(2, dtype=DTYPE))


@pytest.mark.parametrize("K", [1, 2])
def test_shard_overflowing_after_inner_step_is_dropped(K):
    """A shard whose loss overflows to inf only after an inner step (K=1: outer, K=2: inner) is dropped."""
    model = exp_square_model()
    theta = model.theta.detach().clone()
    w_good = 0.6
    c = torch.tensor([0.5, -0.25], dtype=DTYPE)
    closures = [
        lambda: torch.exp(model.theta**2).sum(),
        lambda: 0.5 * ((model.theta - c) ** 2).sum(),
    ]
    records = equilibrium_backward(model, closures, K, 1000.0, [0.4, w_good])

    assert records[0].dropped and not records[1].dropped
    assert math.isfinite(records[0].loss_before)
    assert records[0].loss_before == pytest.approx(2 * math.e, rel=1e-12)
    # The good shard: g = 0.5 |θ - c|², φ^K - c = (1 - α)^K (θ - c), G = φ^K - c.
    expected = w_good * (1 - 1000.0) ** K * (theta - c)
    torch.testing.assert_close(model.theta.grad, expected, **TIGHT)
    assert torch.equal(model.theta.detach(), theta)


@pytest.mark.parametrize("case", ["sqrt_at_zero", "where_nan_trap"])
def test_shard_with_nonfinite_inner_gradient_is_dropped(case):
    """A finite loss with a non-finite gradient is dropped during the inner steps.

    ``where_nan_trap`` stays finite (= 2) even at θ = NaN, so only the inner-gradient check can
    catch it: without that check the outer pass would add a NaN gradient.
    """
    start = 0.0 if case == "sqrt_at_zero" else -1.0
    model = Vector(torch.full((2,), start, dtype=DTYPE))
    theta = model.theta.detach().clone()
    c = torch.tensor([1.0, 2.0], dtype=DTYPE)
    if case == "sqrt_at_zero":
        bad = lambda: torch.sqrt(model.theta).sum()  # noqa: E731
    else:
        bad = lambda: torch.where(  # noqa: E731
            model.theta > 0, torch.sqrt(model.theta), torch.ones_like(model.theta)
        ).sum()
    assert math.isfinite(float(bad().detach()))
    closures = [bad, lambda: 0.5 * ((model.theta - c) ** 2).sum()]
    records = equilibrium_backward(model, closures, 1, 0.1, [1.0, 1.0])
    assert records[0].dropped and not records[1].dropped
    torch.testing.assert_close(model.theta.grad, (1 - 0.1) * (theta - c), **TIGHT)
    assert torch.equal(model.theta.detach(), theta)


def test_all_shards_dropped_leaves_grad_untouched():
    """If every shard is non-finite, .grad stays None and parameters are unchanged."""
    model = Vector(torch.ones(3, dtype=DTYPE))
    records = equilibrium_backward(model, [lambda: model.theta.sum() * float("nan")] * 2, 2, 0.1)
    assert all(r.dropped for r in records)
    assert model.theta.grad is None
    assert torch.equal(model.theta.detach(), torch.ones(3, dtype=DTYPE))


# --------------------------------------------------------------------------------------------
# 9. Argument validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(inner_steps=-1, inner_lr=0.1),
        dict(inner_steps=1, inner_lr=0.0),
        dict(inner_steps=2, inner_lr=-0.1),
        dict(inner_steps=1, inner_lr=float("nan")),
        dict(inner_steps=1, inner_lr=float("inf")),
        dict(inner_steps=1.5, inner_lr=0.1),
        dict(inner_steps=1, inner_lr=0.1, weights=[1.0]),
        dict(inner_steps=1, inner_lr=0.1, weights=[1.0, 1.0, 1.0]),
        dict(inner_steps=1, inner_lr=0.1, weights=[1.0, -0.5]),
        dict(inner_steps=1, inner_lr=0.1, weights=[1.0, float("nan")]),
        dict(inner_steps=1, inner_lr=0.1, inner_closures=[lambda: None]),
    ],
    ids=[
        "negative_steps", "zero_lr", "negative_lr", "nan_lr", "inf_lr", "float_steps",
        "too_few_weights", "too_many_weights", "negative_weight", "nan_weight",
        "inner_closures_length",
    ],
)
def test_invalid_arguments_raise(kwargs):
    """Bad inner_steps / inner_lr / weights / inner_closures raise ValueError before any work."""
    model = Vector(torch.ones(2, dtype=DTYPE))
    called = []

    def closure():
        called.append(1)
        return model.theta.sum()

    steps, lr = kwargs.pop("inner_steps"), kwargs.pop("inner_lr")
    with pytest.raises(ValueError):
        equilibrium_backward(model, [closure, closure], steps, lr, **kwargs)
    assert called == []
    assert model.theta.grad is None


def test_no_closures_raises():
    """An empty list of shard closures raises ValueError."""
    with pytest.raises(ValueError):
        equilibrium_backward(Vector(torch.ones(2, dtype=DTYPE)), [], 1, 0.1)


# --------------------------------------------------------------------------------------------
# 10. backward, outer_context and inner_loss_scale hooks
# --------------------------------------------------------------------------------------------


def test_custom_backward_scales_added_gradient():
    """backward=lambda l: (8*l).backward() adds 8x the default gradient; it gets w_i * g_i."""
    theta, shards = quadratic_problem()
    weights = [0.5, 1.0, 2.0]
    plain = Vector(theta)
    equilibrium_backward(plain, [quadratic_closure(plain, A, c) for A, c in shards], 2, 0.1, weights)

    model = Vector(theta)
    seen = []

    def backward(loss):
        seen.append(float(loss.detach()))
        (loss * 8).backward()

    records = equilibrium_backward(
        model, [quadratic_closure(model, A, c) for A, c in shards], 2, 0.1, weights, backward=backward
    )
    torch.testing.assert_close(model.theta.grad, 8 * plain.theta.grad, **TIGHT)
    assert seen == pytest.approx([w * r.loss_after for w, r in zip(weights, records)], rel=1e-12)


def test_outer_context_entered_once_per_shard_in_order_around_outer_pass():
    """outer_context(i) is entered once per shard, in order, around the outer forward+backward only."""
    model = make_mlp()
    batches = random_batches(3)
    entered, active, calls = [], [None], []

    @contextlib.contextmanager
    def ctx(i):
        entered.append(i)
        active[0] = i
        try:
            yield
        finally:
            active[0] = None

    def closure_for(i, x, y):
        def closure():
            calls.append((i, active[0]))
            return ((model(x) - y) ** 2).mean()

        return closure

    backward_in = []

    def backward(loss):
        backward_in.append(active[0])
        loss.backward()

    K = 2
    equilibrium_backward(
        model, [closure_for(i, x, y) for i, (x, y) in enumerate(batches)], K, 0.1,
        backward=backward, outer_context=ctx,
    )
    assert entered == [0, 1, 2]
    assert backward_in == [0, 1, 2]
    # Per shard: K inner evaluations outside any context, then one outer evaluation inside ctx(i).
    assert calls == [c for i in range(3) for c in [(i, None)] * K + [(i, i)]]


def test_inner_loss_scale_does_not_change_result_float32():
    """inner_loss_scale=1024 gives the same gradient and losses as 1.0 in float32."""
    batches = random_batches(3, dtype=torch.float32)
    out = []
    for scale in (1.0, 1024.0):
        model = make_mlp(dtype=torch.float32)
        recs = equilibrium_backward(
            model, [mse_closure(model, x, y) for x, y in batches], 3, 0.3, inner_loss_scale=scale
        )
        out.append((grads_of(model), [r.loss_after for r in recs]))
    for n in out[0][0]:
        torch.testing.assert_close(out[1][0][n], out[0][0][n], rtol=1e-5, atol=1e-6)
    assert out[1][1] == pytest.approx(out[0][1], rel=1e-5)
    # And the result still differs from K=0, so the scaled inner steps really were taken.
    model = make_mlp(dtype=torch.float32)
    equilibrium_backward(model, [mse_closure(model, x, y) for x, y in batches], 0, 0.3)
    assert not all(torch.allclose(model.get_parameter(n).grad, g) for n, g in out[1][0].items())


# --------------------------------------------------------------------------------------------
# 11. inner_closures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 3])
def test_inner_closures_drive_inner_steps_outer_closures_the_gradient(K):
    """Inner steps descend the inner loss; the outer gradient and loss_after use the outer loss."""
    alpha = 0.12
    theta, outer = quadratic_problem(n_shards=2, seed=0)
    _, inner = quadratic_problem(n_shards=2, seed=7)
    weights = [0.8, 0.3]
    model = Vector(theta)
    counts = {"outer": 0, "inner": 0}

    def counted(kind, f):
        def closure():
            counts[kind] += 1
            return f()

        return closure

    records = equilibrium_backward(
        model,
        [counted("outer", quadratic_closure(model, A, c)) for A, c in outer],
        K,
        alpha,
        weights,
        inner_closures=[counted("inner", quadratic_closure(model, A, c)) for A, c in inner],
    )

    expected = torch.zeros_like(theta)
    for (A_in, c_in), (A_out, c_out), w, rec in zip(inner, outer, weights, records):
        phi = quadratic_closed_form(theta, A_in, c_in, K, alpha)[0]
        e = phi - c_out
        expected += w * (A_out @ e)
        assert rec.loss_after == pytest.approx(float(0.5 * e @ A_out @ e), rel=1e-12)
        inner_losses = [quadratic_closed_form(theta, A_in, c_in, k, alpha)[2] for k in range(K)]
        assert rec.inner_losses == pytest.approx(inner_losses, rel=1e-12)
    torch.testing.assert_close(model.theta.grad, expected, **TIGHT)
    assert counts == {"outer": 2, "inner": 2 * K}
    assert torch.equal(model.theta.detach(), theta)


def test_inner_closures_computing_same_loss_match_default():
    """inner_closures that compute the same loss differently give the same result as the default."""
    batches = random_batches(2)
    base = make_mlp()
    equilibrium_backward(base, [mse_closure(base, x, y) for x, y in batches], 2, 0.3)

    model = make_mlp()
    records = equilibrium_backward(
        model,
        [mse_closure(model, x, y) for x, y in batches],
        2,
        0.3,
        inner_closures=[
            (lambda x=x, y=y: ((model(x) - y).pow(2).sum() / y.numel())) for x, y in batches
        ],
    )
    for p, q in zip(model.parameters(), base.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TIGHT)
    for rec, (x, y) in zip(records, batches):
        with torch.no_grad():
            assert rec.loss_before == pytest.approx(float(((base(x) - y) ** 2).mean()), rel=1e-12)
