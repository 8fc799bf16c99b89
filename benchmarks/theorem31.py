"""Theorem 3.1 of Sabour et al. 2025 on data N(0, c^2), c = 0.5: consistency models get worse as
steps grow, flow maps do not.

The consistency model is the optimal one with a relative error delta,
``f(x, t) = (1 + delta) f*(x, t, 0)``, sampled with re-noising (gamma = 1). The flow map carries
the same error per unit of time, ``f(x, t, s) = (1 + delta (t - s)) f*(x, t, s)``, so both are
identical for one step (t = 1 -> 0). We report W2 to the data (Gaussians fitted to 200k samples;
everything is linear, so the fit is exact up to sampling noise). Expected: the consistency
model's W2 rises with N (its error is re-applied at every step and compounds, about
(1 + delta)^k over the last k steps); the flow map's stays below about e^delta - 1 times c.

    python benchmarks/theorem31.py [--delta 0.05] [--out bench_out/theorem31]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from ayf.math.analytic import GaussianOracle
from ayf.math.frechet import gaussian_w2
from ayf.math.samplers import sample_consistency, sample_flow_map
from ayf.math.times import time_grid
from ayf.metrics.toy import format_table

STEPS = (1, 2, 4, 8, 16, 32, 64, 128)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--c", type=float, default=0.5)
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--out", default="bench_out/theorem31")
    args = p.parse_args()
    oracle = GaussianOracle(std=args.c, dim=1)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(args.n, 1, generator=gen, dtype=torch.float64)
    data = oracle.sample(args.n, generator=gen)
    rows = []
    for delta in (0.0, args.delta, -args.delta):
        def F_cm(x, t, s, cond=None, d=delta):  # s = 0 under gamma = 1: F = (x - f) / t
            return (x - (1 + d) * oracle.consistency_model(x, t)) / t[:, None]

        def F_fm(x, t, s, cond=None, d=delta):  # f = (1 + d (t - s)) f*  <=>  F = F* - d f*
            return oracle.average_velocity(x, t, s) - d * oracle.flow_map(x, t, s)

        for N in STEPS:
            grid = time_grid(N)
            cm = sample_consistency(F_cm, noise, grid, generator=torch.Generator().manual_seed(N))
            fm = sample_flow_map(F_fm, noise, grid)
            rows.append({"delta": delta, "N": N, "W2 consistency": gaussian_w2(cm, data).item(),
                         "W2 flow map": gaussian_w2(fm, data).item()})
    table = format_table(rows, ["delta", "N", "W2 consistency", "W2 flow map"])
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "theorem31.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.out, "theorem31.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for delta in (args.delta, -args.delta):
        rs = [r for r in rows if r["delta"] == delta]
        ax.plot(STEPS, [r["W2 consistency"] for r in rs], "-o", label=f"consistency model, delta={delta:+g}")
        ax.plot(STEPS, [r["W2 flow map"] for r in rs], "--s", label=f"flow map, delta={delta:+g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps N")
    ax.set_ylabel("W2 to data")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "theorem31.png"), dpi=120)


if __name__ == "__main__":
    main()
