"""Losses (docs/maths.md §3 and §7). Each returns per-example values ``(B,)``; callers reduce."""
from __future__ import annotations

import torch
import torch.nn.functional as nnf

WEIGHTINGS = ("none", "f_space", "adaptive")


def _sq_mean(a: torch.Tensor) -> torch.Tensor:
    return a.flatten(1).pow(2).mean(dim=1)


def flow_matching_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> torch.Tensor:
    """``|| v_pred - v_target ||^2 / D`` per example (mean over the D data dimensions)."""
    return _sq_mean(v_pred - v_target)


def flow_map_loss(F: torch.Tensor, g: torch.Tensor, t, s, weighting: str = "none"):
    """AYF flow-map regression ``|| F - stopgrad(F- + g) ||^2 / D`` per example (docs/maths.md §3, step 6).

    F: student prediction with graph, ``(B, *D)``; g: (normalised) tangent, ``(B, *D)``.
    weighting: ``none`` keeps the F-space target; ``f_space`` multiplies by ``(t - s)^2``, the
    weight the same regression picks up when written for ``f = x + (s - t) F``; ``adaptive``
    returns the unweighted value for :func:`adaptive_weighted_loss`.
    Since ``F- == F`` in value, ``F - stopgrad(F- + g) = F - stopgrad(F) - g``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    per = _sq_mean(F - (F.detach() + g))
    if weighting == "f_space":
        per = per * (t - s).to(per.dtype) ** 2
    return per


def adaptive_weighted_loss(per_example: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """sCM-style learned weighting ``exp(w) * L - w`` (Lu & Song 2024; docs/maths.md §3, step 6).

    per_example: ``||.||^2 / D`` ``(B,)``; logvar: ``w_psi(t, s)`` ``(B,)``.
    """
    return torch.exp(logvar) * per_example - logvar


def rpgan_generator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing GAN generator loss ``softplus(D(x_real) - D(x_fake))`` (docs/maths.md §7)."""
    return nnf.softplus(d_real - d_fake)


def rpgan_discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing GAN discriminator loss ``softplus(D(x_fake) - D(x_real))`` (docs/maths.md §7)."""
    return nnf.softplus(d_fake - d_real)


def r1_penalty(d_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``|| grad_x D(x) ||^2`` per example (R1 on reals, R2 on fakes). x must require grad."""
    (grad,) = torch.autograd.grad(d_out.sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(dim=1)
