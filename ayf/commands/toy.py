"""Score .npy samples of the toy mixture against its exact flow map and density.

For each NAME=FILE.npy drawn from the same noise: the distance of each sample to the exact ODE
solution from its noise (median, RMS), the mean true log-density and the MMD to data; writes
metrics.md, metrics.json and a figure of the samples (what `make demo` reports).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from ayf.io import check_output
from ayf.metrics.toy import data_row, exact_endpoints, fidelity_row, load_mixture, write_report


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="configs/toy/data.yaml", help="data config holding the mixture")
    p.add_argument("--noise", required=True, help="the .npy noise the samples were drawn from")
    p.add_argument("--samples", nargs="+", required=True, help="NAME=FILE.npy pairs")
    p.add_argument("--out", required=True, help="folder for metrics.md, metrics.json and samples.png")
    p.add_argument("--overwrite", action="store_true", help="replace those files when the folder has them")
    return p


def run(args) -> int:
    for name in ("metrics.md", "metrics.json", "samples.png"):
        check_output(os.path.join(args.out, name), args.overwrite)
    oracle = load_mixture(args.data)
    noise = torch.from_numpy(np.load(args.noise, allow_pickle=False)).double()
    exact = exact_endpoints(oracle, noise)
    gen = torch.Generator().manual_seed(1)
    reference = oracle.sample(len(noise), generator=gen)
    rows = [dict(samples="data", **data_row(oracle, len(noise), exact, reference, gen))]
    panels = {"data": reference}
    for item in args.samples:
        name, _, path = item.partition("=")
        x = torch.from_numpy(np.load(path, allow_pickle=False)).double()
        rows.append(dict(samples=name, **fidelity_row(oracle, x, exact, reference)))
        panels[name] = x
    write_report(args.out, "metrics", rows, ["samples", "median_dist", "rms_dist", "mean_logp", "mmd"], panels,
                 "toy mixture: data and flow-map samples", figure="samples.png")
    return 0
