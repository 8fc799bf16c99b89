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


def mode_recall(oracle: MixtureOracle, samples, radius: float = 3.0) -> torch.Tensor:
    """Share of each mode's mass recovered ``(K,)``: the fraction of samples that lie within
    ``radius`` standard deviations of mode k (nearest in that scale), divided by its weight w_k,
    capped at 1. Samples between modes count for none."""
    x = samples.double().cpu()
    z = (x[:, None, :] - oracle.means[None]).norm(dim=2) / oracle.stds[None]  # (N, K)
    dist, k = z.min(dim=1)
    share = torch.bincount(k[dist <= radius], minlength=len(oracle.weights)).double() / len(x)
    return (share / oracle.weights).clamp(max=1.0)


def class_oracles(oracle: MixtureOracle, classes) -> list:
    """One mixture per class: the components whose class is c, reweighted within the class."""
    classes = torch.as_tensor(classes)
    out = []
    for c in range(int(classes.max()) + 1):
        idx = (classes == c).nonzero().flatten()
        out.append(MixtureOracle(oracle.means[idx], oracle.stds[idx], oracle.weights[idx]))
    return out


def load_mixture(path: str = "configs/toy/data.yaml") -> MixtureOracle:
    """The mixture of a data config (``init_args.mixture``) or of a bare ``mixture:`` file."""
    import yaml

    with open(path) as fh:
        cfg = yaml.safe_load(fh)
    return MixtureOracle.from_config(cfg["init_args"]["mixture"] if "init_args" in cfg else cfg["mixture"])


def load_classes(path: str = "configs/toy/data.yaml"):
    """The per-component class labels of a data config (component index when it has none)."""
    import yaml

    with open(path) as fh:
        cfg = yaml.safe_load(fh)
    args = cfg.get("init_args", cfg)
    return args.get("classes") or list(range(len(args["mixture"]["weights"])))


def data_row(oracle: MixtureOracle, n: int, exact, reference, generator=None) -> dict:
    """The reference row: fresh data scored like samples (no noise pairing, so no distances)."""
    row = fidelity_row(oracle, oracle.sample(n, generator=generator), exact, reference)
    row["median_dist"] = row["rms_dist"] = float("nan")
    return row


def format_table(rows, columns, floatfmt="{:.4f}") -> str:
    """A GitHub-markdown table from a list of dicts."""
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = [floatfmt.format(r[c]) if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_report(out, name, rows, columns, panels, title, figure=None, floatfmt="{:.4f}") -> str:
    """Writes ``<out>/<name>.md`` (table), ``<name>.json`` (rows) and a scatter figure of the
    panels (``figure``, default ``<name>.png``); prints and returns the table."""
    import json
    import os

    from ayf.figures import scatter_figure

    table = format_table(rows, columns, floatfmt)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    path = os.path.join(out, figure or f"{name}.png")
    scatter_figure(panels, title, lim=3.5).savefig(path, dpi=120)
    print(table)
    print(f"figure: {path}")
    return table
