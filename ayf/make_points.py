"""``ayf points``: write a 2-D point dataset from scikit-learn's generators to an ``.npz`` file
that :class:`ayf.data.VectorData` reads (``x``: ``(N, 2)`` float32, ``labels``: ``(N,)`` where the
generator has classes)."""
from __future__ import annotations

import argparse
import os

import numpy as np

from ayf.errors import ConfigError


def _moons(n, noise, rng):
    from sklearn.datasets import make_moons

    return make_moons(n, noise=noise, random_state=rng)


def _circles(n, noise, rng):
    from sklearn.datasets import make_circles

    return make_circles(n, noise=noise, factor=0.5, random_state=rng)


def _swiss_roll(n, noise, rng):
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=noise, random_state=rng)
    return x[:, [0, 2]], None  # the roll seen along its axis


#: name -> (generator (n, noise, seed) -> (x, labels or None), default noise)
DATASETS = {"moons": (_moons, 0.05), "circles": (_circles, 0.04), "swiss_roll": (_swiss_roll, 0.5)}


def make_points(name: str, n: int, noise=None, seed: int = 0):
    """``(x, labels)``: n points of the dataset ``name``, standardised to zero mean and unit
    standard deviation over both coordinates (the scale of the N(0, I) noise); labels may be None."""
    if name not in DATASETS:
        raise ConfigError(f"unknown point dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if n < 2:
        raise ConfigError(f"--n must be at least 2, got {n}")
    make, default_noise = DATASETS[name]
    try:
        x, y = make(n, default_noise if noise is None else noise, seed)
    except ImportError:
        raise ConfigError("ayf points needs scikit-learn: pip install scikit-learn") from None
    x = x - x.mean(0)
    x = x / x.std()
    return x.astype(np.float32), None if y is None else np.asarray(y, dtype=np.int64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ayf points", description="Write a 2-D point dataset (scikit-learn's generators, "
                                "standardised) to an .npz file for ayf.data.VectorData.")
    p.add_argument("dataset", choices=list(DATASETS), help="which point set")
    p.add_argument("--output", required=True, help="the .npz file to write")
    p.add_argument("--n", type=int, default=20000, help="number of points")
    p.add_argument("--noise", type=float, default=None, help="the generator's noise (default: per dataset: "
                   + ", ".join(f"{k} {v[1]}" for k, v in DATASETS.items()) + ")")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = p.parse_args(argv)
    if not args.output.endswith(".npz"):
        raise ConfigError(f"--output must name an .npz file, got {args.output}")
    if os.path.exists(args.output) and not args.overwrite:
        raise ConfigError(f"{args.output} exists; pass --overwrite to replace it")
    x, y = make_points(args.dataset, args.n, args.noise, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    arrays = {"x": x} if y is None else {"x": x, "labels": y}
    np.savez(args.output, **arrays)
    print(f"{args.output}: {len(x)} points of {args.dataset}" + ("" if y is None else f", {int(y.max()) + 1} classes"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
