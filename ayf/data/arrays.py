"""Reading arrays from ``.npy`` / ``.npz`` files, with one-line errors (shared by the data modules and ``ayf shards``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ayf.errors import ConfigError

DATA_KEYS = ("x", "X", "data", "points", "images")
LABEL_KEYS = ("labels", "y", "Y", "targets")


def read_arrays(path, data_key=None, labels=None, labels_key=None, data_keys=DATA_KEYS, what="data", key_option="data_key"):
    """``(x, y)`` from a ``.npy`` file or an ``.npz`` archive; y (integer labels) may be None.

    In an ``.npz``, x is the array named ``data_key`` (default: the first of ``data_keys`` present)
    and y the one named ``labels_key`` (default: the first of :data:`LABEL_KEYS` present);
    ``labels`` names a separate ``.npy`` of labels instead. ``what`` and ``key_option`` are how
    messages name the rows and the option that picks the array. Every failure is a one-line ConfigError.
    """
    def load(p):
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"array file {p} does not exist")
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ConfigError(f"cannot read {p} as .npy or .npz: {err}") from None

    loaded, y = load(path), None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        keys = list(loaded.keys())
        xk = data_key or next((k for k in data_keys if k in keys), None)
        if xk not in keys:
            raise ConfigError(f"{path}: no {what} array{' ' + repr(xk) if xk else ''} (keys {keys}); name it with {key_option}")
        lk = labels_key or next((k for k in LABEL_KEYS if k in keys), None)
        if labels_key is not None and labels_key not in keys:
            raise ConfigError(f"{path}: no labels array {labels_key!r} (keys {keys})")
        x, y = loaded[xk], (loaded[lk] if lk else None)
    else:
        if data_key is not None:
            raise ConfigError(f"{path} is a .npy file; {key_option} applies to an .npz archive")
        x = loaded
    if labels:
        y = load(labels)
        if isinstance(y, np.lib.npyio.NpzFile):
            raise ConfigError(f"labels file {labels} must be a .npy array")
    x = np.asarray(x)
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise ConfigError(f"labels of shape {tuple(y.shape)} for {len(x)} {what} items; one label per item is needed")
        if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
            raise ConfigError(f"labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
        if y.size and y.min() < 0:
            raise ConfigError(f"labels must be >= 0, got {int(y.min())}")
    return x, y
