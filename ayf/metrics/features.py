"""Feature extractors for FD / KID / precision / recall, and ``ayf features fit``.

Two extractors, both mapping uint8 images ``(N, C, H, W)`` to float features ``(N, D)``:

- :class:`InceptionFeatures`: torch-fidelity's Inception-v3 (2048-d pool features, the
  standard FID network), loaded from a local weights file. ayf never downloads it; on an
  offline machine copy ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's release
  file) to a path of your choice and pass it as ``weights_path``, or place it in torch's hub
  cache (``$TORCH_HOME/hub/checkpoints/``, default ``~/.cache/torch/hub/checkpoints/``).
- :class:`ClassifierFeatures`: the penultimate layer of a small CNN that ``ayf features fit``
  trains on labelled shards. Meaningful on data far from ImageNet (8x8 digits, Fashion-MNIST)
  and cheap on a CPU. Its FD is "classifier-feature FD", not FID: compare it only with itself.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ayf.errors import ConfigError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


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
        from ayf.checkpoints import load_ayf_file

        blob = load_ayf_file(path, "classifier feature extractor",
                             lambda b: isinstance(b, dict) and b.get("kind") == "ayf-classifier",
                             "ayf features fit", weights_only=True)
        self.net = ClassifierNet(**blob["config"])
        self.net.load_state_dict(blob["state_dict"])
        self.net.eval().requires_grad_(False)
        self.shape = tuple(blob["shape"])
        self.name = f"classifier-{_file_id(path)}"

    def __call__(self, images):
        if tuple(images.shape[1:]) != self.shape:
            raise ConfigError(f"the feature extractor was trained on images {self.shape}, got {tuple(images.shape[1:])}")
        return self.net.features(images)


def fit_classifier(train: str, val: Optional[str], output: str, epochs: int = 20, batch_size: int = 128,
                   lr: float = 2e-3, width: int = 32, feature_dim: int = 128, seed: int = 0,
                   overwrite: bool = False) -> dict:
    """Train :class:`ClassifierNet` on labelled shards; save it with its validation accuracy."""
    from tqdm.auto import tqdm

    from ayf.data.images import ImageShards

    out = Path(output)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    dm = ImageShards(train, val)
    if dm.num_classes < 2:
        raise ConfigError("the classifier feature extractor needs labelled shards (2 or more classes)")
    x, y = dm.reference_images()
    xv, yv = dm.reference_images(source=dm.val_source) if dm.val_source is not None else (None, None)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    config = {"in_channels": dm.data_shape[0], "num_classes": dm.num_classes, "width": width, "feature_dim": feature_dim}
    net = ClassifierNet(**config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc="features fit", unit="step", mininterval=1.0)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            xb = x[idx]
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # small translations
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    with torch.no_grad():
        acc = None if xv is None else float((net(xv).argmax(1) == yv).float().mean())
        train_acc = float((net(x).argmax(1) == y).float().mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"kind": "ayf-classifier", "config": config, "shape": list(dm.data_shape),
                "state_dict": net.state_dict(), "val_accuracy": acc, "train_accuracy": train_acc}, tmp)
    os.replace(tmp, out)
    return {"train_accuracy": train_acc, "val_accuracy": acc, "output": str(out)}


def build_parser():
    p = argparse.ArgumentParser(
        prog="ayf features",
        description="Feature extractors for FD / KID / precision / recall. `fit` trains a small classifier on "
        "labelled shards; its penultimate layer (128-d) becomes the feature space (ayf.metrics.ClassifierFeatures).",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("fit", help="train the classifier feature extractor on labelled shards")
    s.add_argument("--train", required=True, help="labelled training shards (folder, manifest or URL pattern)")
    s.add_argument("--val", default=None, help="labelled validation shards (reports accuracy)")
    s.add_argument("--output", required=True, help="where to save the extractor (.pt)")
    s.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    s.add_argument("--batch_size", type=int, default=128, help="images per step")
    s.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle schedule)")
    s.add_argument("--width", type=int, default=32, help="channels of the first convolutions")
    s.add_argument("--feature_dim", type=int, default=128, help="dimension of the features")
    s.add_argument("--seed", type=int, default=0, help="seed")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    args.pop("cmd")
    result = fit_classifier(**args)
    acc = result["val_accuracy"]
    print(f"saved {result['output']}: train accuracy {result['train_accuracy']:.4f}"
          + (f", val accuracy {acc:.4f}" if acc is not None else ""))
    return 0
