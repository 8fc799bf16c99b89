"""Closed-form oracles: Gaussian and isotropic Gaussian-mixture data (docs/maths.md §8).

For data ``x0 ~ N(mu, c^2 I)`` the noisy marginal is ``N((1 - t) mu, var(t) I)`` with
``var(t) = (1 - t)^2 c^2 + t^2``; the exact flow map is affine (Sabour et al. 2025, Thm. 3.1).
For a mixture, each component stays Gaussian along the path, so velocity and log-density are
closed form; the exact flow map is a float64 RK4 solve of the PF-ODE.
"""
from __future__ import annotations

import math

import torch

from ayf.math.flow_map import average_velocity_of_map, bcast


def _component_var(std: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - t) ** 2 * std**2 + t**2


class GaussianOracle:
    """Data ``N(mean, std^2 I)`` in D dimensions (mean: ``(D,)`` or scalar, std: scalar c)."""

    def __init__(self, std: float, mean=0.0, dim: int = 1):
        self.std = float(std)
        self.mean = torch.as_tensor(mean, dtype=torch.float64).expand(dim).clone()
        self.dim = dim

    def var(self, t):
        """``var(t) = (1 - t)^2 c^2 + t^2``."""
        return _component_var(torch.as_tensor(self.std, dtype=torch.as_tensor(t).dtype), t)

    def _centre(self, x, t):
        return (1 - bcast(t, x)) * self.mean.to(x)

    def velocity(self, x, t, cond=None):
        """``v = -mu + var'(t) / (2 var(t)) (x - (1 - t) mu)``."""
        c2 = self.std**2
        d_var = -2 * (1 - t) * c2 + 2 * t
        return -self.mean.to(x) + bcast(d_var / (2 * self.var(t)), x) * (x - self._centre(x, t))

    def flow_map(self, x, t, s):
        """Exact ``f*(x, t, s) = (1 - s) mu + sqrt(var(s) / var(t)) (x - (1 - t) mu)``."""
        scale = torch.sqrt(self.var(s) / self.var(t))
        return self._centre(x, s) + bcast(scale, x) * (x - self._centre(x, t))

    def average_velocity(self, x, t, s, cond=None):
        """Exact ``F*(x, t, s) = (f* - x) / (s - t)``, with ``F*(x, t, t) = v(x, t)``."""
        return average_velocity_of_map(self.flow_map, self.velocity, x, t, s)

    def consistency_model(self, x, t):
        """Optimal consistency model ``f*(x, t, 0) = mu + c (x - (1 - t) mu) / sqrt(var(t))``."""
        return self.flow_map(x, t, torch.zeros_like(t))

    def sample(self, n: int, generator=None, dtype=torch.float64):
        z = torch.randn(n, self.dim, generator=generator, dtype=dtype)
        return self.mean.to(dtype) + self.std * z

    def log_prob(self, x, t=None):
        """Exact log-density of the marginal at time t (data when t is None)."""
        t = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) if t is None else t
        var = self.var(t)
        r2 = (x - self._centre(x, t)).flatten(1).pow(2).sum(1)
        return -0.5 * (r2 / var + self.dim * torch.log(2 * math.pi * var))


class MixtureOracle:
    """Isotropic Gaussian mixture ``sum_k w_k N(mu_k, sigma_k^2 I)`` in any dimension.

    Args:
        means: ``(K, D)`` component means.
        stds: ``(K,)`` component standard deviations (isotropic).
        weights: ``(K,)`` mixture weights (normalised here).
    """

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"mixture means must be a K x D list, got shape {tuple(self.means.shape)}")
        k, self.dim = self.means.shape
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if self.stds.numel() != k or w.numel() != k:
            raise ValueError(f"mixture has {k} means but {self.stds.numel()} stds and {w.numel()} weights")
        if (self.stds <= 0).any() or (w < 0).any() or w.sum() <= 0:
            raise ValueError("mixture stds must be positive and weights non-negative with a positive sum")
        self.weights = w / w.sum()

    @classmethod
    def from_config(cls, cfg) -> "MixtureOracle":
        """From a mapping with keys ``means``, ``stds`` and ``weights``."""
        missing = {"means", "stds", "weights"} - set(cfg)
        if missing:
            raise ValueError(f"mixture is missing key(s): {', '.join(sorted(missing))}")
        return cls(cfg["means"], cfg["stds"], cfg["weights"])

    def _posterior(self, x, t):
        """Component log-likelihood terms ``(B, K)``, component variances, and residuals."""
        xf = x.flatten(1)
        t = torch.as_tensor(t, dtype=xf.dtype, device=xf.device).expand(xf.shape[0])
        mu, sd = self.means.to(xf), self.stds.to(xf)
        var = _component_var(sd[None, :], t[:, None])  # (B, K)
        resid = xf[:, None, :] - (1 - t)[:, None, None] * mu[None]  # (B, K, D)
        logp = -0.5 * (resid.pow(2).sum(-1) / var + self.dim * torch.log(2 * math.pi * var))
        return logp + torch.log(self.weights.to(xf))[None], var, resid, t

    def log_prob(self, x, t=None):
        """Exact log-density ``log p_t(x)``, ``(B,)`` (data density when t is None)."""
        t = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) if t is None else t
        joint, *_ = self._posterior(x, t)
        return torch.logsumexp(joint, dim=1)

    def velocity(self, x, t, cond=None):
        """``v(x, t) = sum_k p(k | x_t) [(t - (1 - t) sigma_k^2) r_k / var_k(t) - mu_k]``."""
        joint, var, resid, t = self._posterior(x, t)
        post = torch.softmax(joint, dim=1)  # (B, K)
        sd2 = self.stds.to(x) ** 2
        coef = (t[:, None] - (1 - t[:, None]) * sd2[None]) / var  # (B, K)
        v_k = coef[..., None] * resid - self.means.to(x)[None]
        return (post[..., None] * v_k).sum(1).reshape(x.shape)

    def sample(self, n: int, generator=None, dtype=torch.float64, return_labels: bool = False):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = (self.means[k] + self.stds[k, None] * z).to(dtype)
        return (x, k) if return_labels else x

    def flow_map(self, x, t, s, steps: int = 256):
        """Exact flow map by RK4 in float64 on ``steps`` equal sub-steps from t to s."""
        x = x.to(torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        s = torch.as_tensor(s, dtype=torch.float64).expand(x.shape[0])
        h = (s - t) / steps
        hb = bcast(h, x)
        tau = t.clone()
        for _ in range(steps):
            k1 = self.velocity(x, tau)
            k2 = self.velocity(x + 0.5 * hb * k1, tau + 0.5 * h)
            k3 = self.velocity(x + 0.5 * hb * k2, tau + 0.5 * h)
            k4 = self.velocity(x + hb * k3, tau + h)
            x = x + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            tau = tau + h
        return x

    def average_velocity(self, x, t, s, cond=None, steps: int = 256):
        """``F*(x, t, s)``; equals the velocity where ``s = t``."""
        flow_map = lambda a, b, c: self.flow_map(a, b, c, steps)  # noqa: E731
        return average_velocity_of_map(flow_map, self.velocity, x.double(), t, s)
