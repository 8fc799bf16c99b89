"""Samplers with one signature ``(model_fn, noise, grid, cond, ...) -> x`` (docs/maths.md §5).

The grid is ``1 = t_0 > ... > t_N = 0`` (see :func:`ayf.math.times.time_grid`); one model call
per step except Heun (two). ``cond`` (class label, guidance scale: whatever the model reads) is
handed unchanged to every model call: ``F_fn(x, t, s, cond)`` or ``v_fn(x, t, cond)``.
"""
from __future__ import annotations

import torch

from ayf.math.flow_map import apply_flow_map
from ayf.math.path import sigma_to_t, t_to_sigma
from ayf.math.times import check_grid


def _times(grid, x):
    grid = check_grid(grid).to(device=x.device, dtype=x.dtype)
    return [(grid[i], grid[i + 1]) for i in range(grid.numel() - 1)]


def _full(value, x):
    return value.expand(x.shape[0])


def sample_flow_map(F_fn, noise, grid, cond=None, gamma: float = 0.0, generator=None, callback=None):
    """Flow-map sampler with gamma-sampling.

    gamma = 0: ``x <- x + (s - t) F(x, t, s)`` along the grid (deterministic).
    0 < gamma <= 1: jump to ``u`` with ``sigma_u = sqrt(1 - gamma^2) sigma_s`` (``sigma = t /
    (1 - t)``), then re-noise to s: ``x_s = (1 - s) (x_u / (1 - u) + sqrt(sigma_s^2 -
    sigma_u^2) z)``. gamma = 1 is the consistency-model multistep sampler (jump to 0, then
    ``x_s = (1 - s) x0_hat + s z``).

    F_fn(x, t, s, cond) -> F; noise ``(B, *D)`` is ``x_1``. callback(i, x) is called after each step.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    x = noise
    for i, (t, s) in enumerate(_times(grid, x)):
        if gamma == 0.0 or s == 0:
            x = apply_flow_map(x, t, s, F_fn(x, _full(t, x), _full(s, x), cond))
        else:
            sigma_s = t_to_sigma(s)
            sigma_u = (1.0 - gamma**2) ** 0.5 * sigma_s
            u = sigma_to_t(sigma_u)
            x_u = apply_flow_map(x, t, u, F_fn(x, _full(t, x), _full(u, x), cond))
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (1 - s) * (x_u / (1 - u) + (sigma_s**2 - sigma_u**2).sqrt() * z)
        if callback is not None:
            callback(i, x)
    return x


def sample_consistency(F_fn, noise, grid, cond=None, generator=None, callback=None):
    """Consistency-model baseline: a flow map used only at s = 0, sampled with gamma = 1."""
    return sample_flow_map(F_fn, noise, grid, cond, gamma=1.0, generator=generator, callback=callback)


def sample_euler(v_fn, noise, grid, cond=None, callback=None):
    """Teacher Euler ODE solver ``x <- x + (s - t) v(x, t)``; N velocity calls, order 1."""
    x = noise
    for i, (t, s) in enumerate(_times(grid, x)):
        x = x + (s - t) * v_fn(x, _full(t, x), cond)
        if callback is not None:
            callback(i, x)
    return x


def sample_heun(v_fn, noise, grid, cond=None, callback=None):
    """Teacher Heun (trapezoidal) ODE solver; 2N velocity calls, order 2.

    The corrector runs on every step, the last included (v is finite at t = 0 in this
    convention).
    """
    x = noise
    for i, (t, s) in enumerate(_times(grid, x)):
        v0 = v_fn(x, _full(t, x), cond)
        x_pred = x + (s - t) * v0
        v1 = v_fn(x_pred, _full(s, x), cond)
        x = x + (s - t) * 0.5 * (v0 + v1)
        if callback is not None:
            callback(i, x)
    return x


ODE_SOLVERS = {"euler": sample_euler, "heun": sample_heun}
"""The teacher's probability-flow ODE solvers by name (one signature: ``(v_fn, noise, grid, cond)``)."""
