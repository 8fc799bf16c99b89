"""Train the classifier feature extractor used by FD / KID / precision / recall.

`fit` trains a small classifier on labelled shards; its penultimate layer (128-d) becomes the
feature space of ayf.metrics.ClassifierFeatures ("classifier-feature FD": compare it only with
itself).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ayf.data.images import ImageShards
from ayf.errors import ConfigError
from ayf.io import check_output, save_torch
from ayf.metrics.features import CLASSIFIER_KIND, ClassifierNet


def fit_classifier(train: str, val: Optional[str], output: str, epochs: int = 20, batch_size: int = 128,
                   lr: float = 2e-3, width: int = 32, feature_dim: int = 128, seed: int = 0,
                   overwrite: bool = False) -> dict:
    """Train :class:`ClassifierNet` on labelled shards; save it with its validation accuracy."""
    out = Path(check_output(output, overwrite, suffixes=(".pt",)))
    dm = ImageShards(train, val)
    if dm.train_source.space != "pixels":
        raise ConfigError(f"{train} holds latents; the feature extractor looks at pixels: give the pixel shards the "
                          "latents were encoded from (FidelityMetrics decodes samples before it)")
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
    save_torch({"kind": CLASSIFIER_KIND, "config": config, "shape": list(dm.data_shape),
                "state_dict": net.state_dict(), "val_accuracy": acc, "train_accuracy": train_acc}, str(out))
    return {"train_accuracy": train_acc, "val_accuracy": acc, "output": str(out)}


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def run(args) -> int:
    kwargs = vars(args)
    kwargs.pop("cmd")
    result = fit_classifier(**kwargs)
    acc = result["val_accuracy"]
    print(f"saved {result['output']}: train accuracy {result['train_accuracy']:.4f}"
          + (f", val accuracy {acc:.4f}" if acc is not None else ""))
    return 0
