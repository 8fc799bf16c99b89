"""Vector data ``(N, D)`` from ``.npy`` / ``.npz`` files: tabular or 2-D point sets of the user's."""
from __future__ import annotations

from typing import Optional

import lightning as L
import numpy as np
import torch

from ayf.data.arrays import read_arrays
from ayf.data.loaders import device_batch, tensor_loader
from ayf.data.mixture import _Samples
from ayf.errors import ConfigError


class VectorData(L.LightningDataModule):
    """Vectors ``(N, D)`` read from an ``.npy`` or ``.npz`` file; batches are ``{"x": (B, D), "label": (B,)}``.

    A seeded share of the rows becomes the validation set unless ``val_path`` gives one. Labels
    (class-conditional models) come from the ``.npz`` (``labels``, ``y``, ...) or from ``labels``.

    Args:
        path: the training (or whole) array file.
        data_key: name of the array in an ``.npz`` (default: the first of x, X, data, points).
        labels: optional ``.npy`` of integer labels, one per row of ``path``.
        labels_key: name of the labels in an ``.npz`` (default: labels, y, Y or targets when present).
        use_labels: read labels at all (false: an unconditional model, whatever the file holds).
        dim: the dimensionality D that the model expects; another is a one-line error (None: any).
        val_path: a separate validation file (same layout); then ``val_fraction`` is not used.
        val_fraction: share of the rows held out for validation.
        batch_size: examples per batch (per device).
        global_batch_size: the batch over all devices (and accumulated batches) instead: each device's
            ``batch_size`` becomes its share, and it must split evenly (``ayf fit`` checks it first).
        seed: seed of the split.
        num_workers: DataLoader workers.
    """

    def __init__(self, path: str, data_key: Optional[str] = None, labels: Optional[str] = None,
                 labels_key: Optional[str] = None, use_labels: bool = True, dim: Optional[int] = None,
                 val_path: Optional[str] = None, val_fraction: float = 0.1, batch_size: int = 512, seed: int = 0,
                 num_workers: int = 0, global_batch_size: Optional[int] = None):
        super().__init__()
        if not 0.0 < val_fraction < 1.0 and val_path is None:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        x, y = self._read(path, data_key, labels, labels_key, dim)
        if val_path is not None:
            vx, vy = self._read(val_path, data_key, None, labels_key, x.shape[1])
            if (y is None) != (vy is None) and use_labels:
                raise ConfigError(f"{path} and {val_path} must both have labels or both have none")
        else:
            order = np.random.default_rng(seed).permutation(len(x))
            n_val = max(1, int(round(val_fraction * len(x))))
            if len(x) - n_val < 1:
                raise ConfigError(f"{path} has {len(x)} rows: too few to hold out a validation share")
            val, train = order[:n_val], order[n_val:]
            vx, vy = x[val], (None if y is None else y[val])
            x, y = x[train], (None if y is None else y[train])
        if not use_labels:
            y = vy = None
        if batch_size < 1 or batch_size > len(x):
            raise ConfigError(f"batch_size must lie in [1, {len(x)}] (the training rows), got {batch_size}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.global_batch_size = global_batch_size
        self.data_shape = (x.shape[1],)
        self.num_classes = None if y is None else int(max(y.max(), -1 if vy is None else vy.max())) + 1
        self._sets = {"train": self._samples(x, y), "val": self._samples(vx, vy)}

    @staticmethod
    def _read(path, data_key, labels, labels_key, dim):
        x, y = read_arrays(path, data_key, labels, labels_key)
        if x.ndim != 2:
            raise ConfigError(f"{path} holds an array of shape {tuple(x.shape)}; VectorData needs (N, D) rows")
        if dim is not None and x.shape[1] != dim:
            raise ConfigError(f"{path} holds {x.shape[1]}-dimensional rows; the model expects dim = {dim}")
        if x.dtype.kind not in "fiu":
            raise ConfigError(f"{path} holds dtype {x.dtype}; numbers are needed")
        if len(x) == 0:
            raise ConfigError(f"{path} holds no rows")
        if not np.isfinite(x).all():
            raise ConfigError(f"{path} holds NaN or infinite values")
        return x.astype(np.float32), y

    @staticmethod
    def _samples(x, y):
        label = torch.zeros(len(x), dtype=torch.long) if y is None else torch.from_numpy(y)
        return _Samples(torch.from_numpy(np.ascontiguousarray(x)), label)

    def reference_batch(self, n: int) -> torch.Tensor:
        """Up to n validation rows (for plots)."""
        return self._sets["val"].x[:n]

    def _loader(self, ds, shuffle):
        return tensor_loader(ds, min(device_batch(self), len(ds)), shuffle, self.num_workers, self.seed)

    def train_dataloader(self):
        return self._loader(self._sets["train"], True)

    def val_dataloader(self):
        return self._loader(self._sets["val"], False)

    def test_dataloader(self):
        return self.val_dataloader()
