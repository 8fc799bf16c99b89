"""The flow-map parametrisation ``f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)`` (docs/maths.md §2)."""
from __future__ import annotations

import torch


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example time ``(B,)`` (or a scalar) to broadcast against ``x`` ``(B, *D)``."""
    t = torch.as_tensor(t, device=x.device)
    if t.dtype != torch.bool:
        t = t.to(x.dtype)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def apply_flow_map(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, F: torch.Tensor):
    """Jump ``x_t -> x_s``: ``f = x + (s - t) F`` where F is the average velocity on [s, t].

    Sabour et al. 2025, eq. for the flow-map parametrisation; ``f(x, t, t) = x``.
    Shapes: x, F ``(B, *D)``; t, s ``(B,)`` or scalars.
    """
    return x + bcast(s - t, x) * F


def average_velocity(x_t: torch.Tensor, x_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor):
    """Inverse of :func:`apply_flow_map`: ``F = (x_s - x_t) / (s - t)``. Needs ``s != t``."""
    return (x_s - x_t) / bcast(s - t, x_t)


def average_velocity_of_map(flow_map, velocity, x, t, s, tol: float = 1e-12):
    """``F(x, t, s) = (flow_map(x, t, s) - x) / (s - t)``, and ``velocity(x, t)`` where
    ``|s - t| <= tol`` (the limit s -> t). Safe to differentiate by JVP at the diagonal."""
    gap = torch.as_tensor(s - t, dtype=x.dtype, device=x.device)
    off = gap.abs() > tol
    x_s = flow_map(x, t, s)
    F = average_velocity(x, x_s, t, torch.where(off, s, t + 1.0))  # unit gap where s = t
    return torch.where(bcast(off, x), F, velocity(x, t))


def two_jump_velocity(F_fn, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond=None) -> torch.Tensor:
    """Average velocity of the jump ``t -> s`` taken as two jumps through the midpoint
    ``u = (t + s) / 2``: ``x_u = f(x, t, u)``, then ``(F(x, t, u) + F(x_u, u, s)) / 2``
    (docs/maths.md §12). The exact flow map is a semigroup, ``f(f(x, t, u), u, s) = f(x, t, s)``,
    so there this equals ``F(x, t, s)``. At ``s = t`` it is ``F(x, t, t)``.

    ``F_fn(x, t, s, cond) -> F``; x ``(B, *D)``; t, s ``(B,)``.
    """
    u = (t + s) / 2
    F_first = F_fn(x, t, u, cond)
    F_second = F_fn(apply_flow_map(x, t, u, F_first), u, s, cond)
    return (F_first + F_second) / 2
