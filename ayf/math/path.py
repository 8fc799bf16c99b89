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


def edm_precond(t: torch.Tensor, sigma_data: float):
    """EDM's preconditioning (Karras et al. 2022, Table 1) rewritten in ayf's time, so that a
    network ``N`` of EDM's kind gives the velocity without dividing by t (docs/maths.md §10):

    ``v(x_t, t) = c_skip x_t + c_out N(c_in x_t)`` with ``q = t^2 + sigma_data^2 (1 - t)^2``,
    ``c_in = 1 / sqrt(q)``, ``c_skip = (t - sigma_data^2 (1 - t)) / q`` and
    ``c_out = -sigma_data / sqrt(q)``.

    This equals ``(x_t - D(x_t / (1 - t); sigma)) / t`` with ``sigma = t / (1 - t)`` and EDM's
    ``D = c_skip' x + c_out' N(c_in' x)``, and it stays finite on all of [0, 1]. t: ``(B,)``;
    returns three ``(B,)`` tensors.
    """
    sd2 = sigma_data**2
    q = t * t + sd2 * (1 - t) ** 2
    root = q.sqrt()
    return 1 / root, (t - sd2 * (1 - t)) / q, -sigma_data / root
