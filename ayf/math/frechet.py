"""Distances between distributions: Frechet / Gaussian W2 and kernel MMD."""
from __future__ import annotations

import torch


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, q = torch.linalg.eigh((a + a.T) / 2)
    return (q * w.clamp_min(0).sqrt()) @ q.T


def frechet_distance(mu1, cov1, mu2, cov2) -> torch.Tensor:
    """Squared Frechet distance of two Gaussians (Dowson & Landau 1982):
    ``||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)``. Shapes ``(D,)``, ``(D, D)``.
    """
    s1 = _sqrtm_psd(cov1)
    cross = _sqrtm_psd(s1 @ cov2 @ s1)
    return (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * torch.trace(cross)


def gaussian_w2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """W2 between Gaussians fitted to samples x ``(N, D)`` and y ``(M, D)``."""
    x, y = x.double(), y.double()
    cx = torch.atleast_2d(torch.cov(x.T))
    cy = torch.atleast_2d(torch.cov(y.T))
    return frechet_distance(x.mean(0), cx, y.mean(0), cy).clamp_min(0).sqrt()


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0)):
    """Unbiased squared MMD with a sum of Gaussian kernels ``exp(-||a - b||^2 / (2 h^2))``.

    x ``(N, D)``, y ``(M, D)``; returns a scalar (may be slightly negative by chance).
    """
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n, m = x.shape[0], y.shape[0]

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2 * kxy.mean()
