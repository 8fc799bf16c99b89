"""2-D point sets from scikit-learn's generators, standardised, for :class:`ayf.data.VectorData`
(``ayf points`` writes them to ``.npz``)."""
from __future__ import annotations

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
