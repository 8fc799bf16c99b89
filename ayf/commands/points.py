"""Write a 2-D point set (moons, circles, swiss_roll) to an .npz file.

The points come from scikit-learn's generators, standardised to zero mean and unit standard
deviation; ``x`` is ``(N, 2)`` float32 and ``labels`` ``(N,)`` where the generator has classes, as
:class:`ayf.data.VectorData` reads them.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from ayf.data.points import DATASETS, make_points
from ayf.io import check_output


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=list(DATASETS), help="which point set")
    p.add_argument("--output", required=True, help="the .npz file to write")
    p.add_argument("--n", type=int, default=20000, help="number of points")
    p.add_argument("--noise", type=float, default=None, help="the generator's noise (default: per dataset: "
                   + ", ".join(f"{k} {v[1]}" for k, v in DATASETS.items()) + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def run(args) -> int:
    check_output(args.output, args.overwrite, suffixes=(".npz",))
    x, y = make_points(args.dataset, args.n, args.noise, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    arrays = {"x": x} if y is None else {"x": x, "labels": y}
    np.savez(args.output, **arrays)
    print(f"{args.output}: {len(x)} points of {args.dataset}" + ("" if y is None else f", {int(y.max()) + 1} classes"))
    return 0
