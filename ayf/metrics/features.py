"""Feature extractors for FD / KID / precision / recall.

Two extractors, both mapping uint8 images ``(N, C, H, W)`` to float features ``(N, D)``:

- :class:`InceptionFeatures`: torch-fidelity's Inception-v3 (2048-d pool features, the
  standard FID network), loaded from a local weights file. ayf never downloads it; on an
  offline machine copy ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's release
  file) to a path of your choice and pass it as ``weights_path``, or place it in torch's hub
  cache (``$TORCH_HOME/hub/checkpoints/``, default ``~/.cache/torch/hub/checkpoints/``).
- :class:`ClassifierFeatures`: the penultimate layer of a small CNN (:class:`ClassifierNet`) that
  ``ayf features fit`` trains on labelled shards. Meaningful on data far from ImageNet (8x8 digits, Fashion-MNIST)
  and cheap on a CPU. Its FD is "classifier-feature FD", not FID: compare it only with itself.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch
from torch import nn

from ayf.errors import ConfigError
from ayf.io import load_torch

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
#: the ``kind`` of a classifier feature extractor file (``ayf features fit``)
CLASSIFIER_KIND = "ayf-classifier"


class FeatureExtractor:
    """Base: ``extractor(uint8 images) -> (N, D) float32``; ``name`` keys cached reference features."""

    name = "features"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def extract(self, images: torch.Tensor, batch_size: int = 256, device="cpu") -> torch.Tensor:
        """Features of many uint8 images, in batches, on ``device`` (the extractor moves there); returned on the CPU."""
        if isinstance(self, nn.Module):
            self.to(device)
        out = [self(images[i: i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out)


def _file_id(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


class InceptionFeatures(FeatureExtractor, nn.Module):
    """torch-fidelity's Inception-v3 pool features (2048-d), from a local weights file.

    Args:
        weights_path: the weights file; default: ``weights-inception-2015-12-05-6726825d.pth`` in
            torch's hub cache. Grayscale images are repeated to three channels.
    """

    def __init__(self, weights_path: Optional[str] = None):
        nn.Module.__init__(self)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if weights_path is None:
            weights_path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
            if not os.path.isfile(weights_path):
                raise ConfigError(
                    f"no Inception weights at {weights_path}; copy {INCEPTION_FILE} there or pass weights_path "
                    "(ayf does not download)")
        if not os.path.isfile(weights_path):
            raise ConfigError(f"Inception weights file {weights_path} does not exist")
        # torch-fidelity unpickles the file in full: it gets it only once it has loaded as tensors alone
        load_torch(weights_path, "Inception weights", accept=lambda obj: isinstance(obj, dict),
                   explain=lambda obj, path: "it holds no state dict")
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path)
        except Exception as err:  # noqa: BLE001 - unpickling and shape errors alike mean a bad file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"cannot load Inception weights from {weights_path}: {first}") from None
        self.name = f"inception-{_file_id(weights_path)}"

    def __call__(self, images):
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return self.net(images)[0]


class ClassifierNet(nn.Module):
    """A small CNN classifier; its penultimate activations are the features."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.body(images_u8.float() / 127.5 - 1.0)

    def forward(self, images_u8):
        return self.head(self.features(images_u8))


class ClassifierFeatures(FeatureExtractor, nn.Module):
    """Penultimate features of a classifier trained by ``ayf features fit``.

    Args:
        path: the ``.pt`` file that ``ayf features fit`` wrote.
    """

    def __init__(self, path: str):
        nn.Module.__init__(self)
        blob = load_torch(path, "classifier feature extractor",
                          lambda b: isinstance(b, dict) and b.get("kind") == CLASSIFIER_KIND, "ayf features fit")
        self.net = ClassifierNet(**blob["config"])
        self.net.load_state_dict(blob["state_dict"])
        self.net.eval().requires_grad_(False)
        self.shape = tuple(blob["shape"])
        self.name = f"classifier-{_file_id(path)}"

    def __call__(self, images):
        if tuple(images.shape[1:]) != self.shape:
            raise ConfigError(f"the feature extractor was trained on images {self.shape}, got {tuple(images.shape[1:])}")
        return self.net.features(images)
