"""Fidelity of samples on data with a known density (the Gaussian-mixture toy)."""
from __future__ import annotations

import torch

from ayf.math.analytic import MixtureOracle
from ayf.math.frechet import mmd_rbf


def exact_endpoints(oracle: MixtureOracle, noise: torch.Tensor, steps: int = 256) -> torch.Tensor:
    """The exact PF-ODE solution from ``x_1 = noise`` to t = 0 (float64 RK4)."""
    ones = torch.ones(len(noise), dtype=torch.float64)
    return oracle.flow_map(noise.double(), ones, torch.zeros_like(ones), steps=steps)


def fidelity_row(oracle: MixtureOracle, samples, exact, reference) -> dict:
    """Distance to the exact ODE solution from the same noise (median, RMS), mean true
    log-density of the samples, and squared MMD to fresh data.

    samples, exact: ``(N, D)`` from the same noise; reference: fresh data ``(M, D)``.
    """
    samples = samples.double().cpu()
    dist = (samples - exact.double()).norm(dim=1)
    return {
        "median_dist": dist.median().item(),
        "rms_dist": dist.pow(2).mean().sqrt().item(),
        "mean_logp": oracle.log_prob(samples).mean().item(),
        "mmd": mmd_rbf(samples[:2000], reference[:2000].double()).item(),
    }


def format_table(rows, columns, floatfmt="{:.4f}") -> str:
    """A GitHub-markdown table from a list of dicts."""
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = [floatfmt.format(r[c]) if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])
