"""Synthetic Gaussian-mixture data whose density and velocity are known in closed form."""
from __future__ import annotations

from typing import List, Optional

import lightning as L
import torch
from torch.utils.data import Dataset

from ayf.data.loaders import device_batch, tensor_loader
from ayf.errors import ConfigError
from ayf.math.analytic import MixtureOracle


class _Samples(Dataset):
    def __init__(self, x, label):
        self.x, self.label = x, label

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": self.label[i]}


class GaussianMixture(L.LightningDataModule):
    """Isotropic Gaussian mixture in any dimension; batches are ``{"x": (B, D), "label": (B,)}``
    with the component index as label, or the component's class when ``classes`` is given.

    Args:
        mixture: mapping with keys ``means`` (K x D), ``stds`` (K) and ``weights`` (K). The
            analytic teacher reads the same mapping from here.
        batch_size: examples per batch (per device).
        global_batch_size: the batch over all devices (and accumulated batches) instead: each device's
            ``batch_size`` becomes its share, and it must split evenly (``ayf fit`` checks it first).
        train_samples: size of the (fixed, seeded) training set.
        val_samples: size of the validation set.
        seed: seed of the drawn data.
        num_workers: DataLoader workers.
        classes: class label of each component (default: its index), e.g. ``[0, 1, 0, 1]``
            for two classes of two modes each.
    """

    def __init__(
        self,
        mixture: dict,
        batch_size: int = 512,
        train_samples: int = 65536,
        val_samples: int = 4096,
        seed: int = 0,
        num_workers: int = 0,
        classes: Optional[List[int]] = None,
        global_batch_size: Optional[int] = None,
    ):
        super().__init__()
        try:
            self.oracle = MixtureOracle.from_config(mixture)
        except ValueError as err:
            raise ConfigError(f"data mixture: {err}") from None
        if batch_size < 1 or train_samples < batch_size:
            raise ConfigError("batch_size must be positive and at most train_samples")
        self.mixture = {k: mixture[k] for k in ("means", "stds", "weights")}
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.global_batch_size = global_batch_size
        self.train_samples, self.val_samples = train_samples, val_samples
        self.data_shape = (self.oracle.dim,)
        k = len(self.mixture["weights"])
        if classes is not None and (len(classes) != k or min(classes) < 0):
            raise ConfigError(f"classes must give a label >= 0 to each of the {k} components, got {list(classes)}")
        self.classes = torch.arange(k) if classes is None else torch.as_tensor(list(classes), dtype=torch.long)
        self.num_classes = int(self.classes.max()) + 1
        self._sets = {}

    def _split(self, name, n, offset):
        if name not in self._sets:
            gen = torch.Generator().manual_seed(self.seed + offset)
            x, k = self.oracle.sample(n, generator=gen, dtype=torch.float32, return_labels=True)
            self._sets[name] = _Samples(x, self.classes[k])
        return self._sets[name]

    def reference_batch(self, n: int) -> torch.Tensor:
        """n validation points (for plots and metrics)."""
        return self._split("val", max(n, self.val_samples), 1).x[:n]

    def _loader(self, ds, shuffle):
        return tensor_loader(ds, device_batch(self), shuffle, self.num_workers, self.seed)

    def train_dataloader(self):
        return self._loader(self._split("train", self.train_samples, 0), True)

    def val_dataloader(self):
        return self._loader(self._split("val", self.val_samples, 1), False)

    def test_dataloader(self):
        return self._loader(self._split("test", self.val_samples, 2), False)
