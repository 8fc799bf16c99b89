"""The interpolation path and unit conversions (docs/maths.md §1)."""
from __future__ import annotations

import torch

from ayf.math.flow_map import bcast


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps``.

    x0, eps: ``(B, *D)``; t: ``(B,)``. Returns ``(B, *D)``. t = 0 is data, t = 1 noise.
    """
    t = bcast(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Conditional velocity ``d x_t / dt = eps - x0``; its conditional mean is ``v(x_t, t)``."""
    return eps - x0


def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """EDM noise level of the same point: ``sigma = t / (1 - t)`` (infinite at t = 1)."""
    return t / (1 - t)


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`t_to_sigma`: ``t = sigma / (1 + sigma)``."""
    return sigma / (1 + sigma)
