"""Discriminators for adversarial finetuning (docs/maths.md §7): ``D(x, label) -> (B,)`` logits.

The image discriminator follows StyleGAN2's residual layout (Karras et al. 2020): a 1x1
input layer, residual blocks that halve the resolution down to 4x4, a minibatch standard
deviation feature, and a small head. Class conditioning is by projection (Miyato & Koyama 2018):
``D(x, y) = psi(h) + <embed(y), h> / sqrt(dim)`` on the final features h.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as nnf
from torch import nn


def minibatch_std(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Appends one feature: the standard deviation of each feature across a group of examples,
    averaged over features, shared by the group (StyleGAN's minibatch-stddev layer).

    x: ``(B, C, *spatial)``; the group is the largest divisor of B that is at most group_size.
    Returns ``(B, C + 1, *spatial)``.
    """
    b = x.shape[0]
    g = max(d for d in range(1, min(group_size, b) + 1) if b % d == 0)
    y = x.reshape(g, b // g, *x.shape[1:])
    std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()  # (B/g, C, *spatial)
    std = std.flatten(1).mean(dim=1)  # (B/g,)
    feat = std.repeat(g).reshape(b, 1, *([1] * (x.ndim - 2))).expand(b, 1, *x.shape[2:])
    return torch.cat([x, feat.to(x.dtype)], dim=1)


class _Projection(nn.Module):
    """``psi(h) + <embed(y), h> / sqrt(dim)``; unconditional when num_classes is 0."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.out = nn.Linear(dim, 1)
        self.embed = nn.Embedding(num_classes, dim) if num_classes > 0 else None
        self.scale = 1 / math.sqrt(dim)

    def forward(self, h, label):
        logit = self.out(h).squeeze(1)
        if self.embed is not None:
            if label is None:
                raise ValueError("this discriminator is class-conditional: pass a label")
            logit = logit + (self.embed(label) * h).sum(dim=1) * self.scale
        return logit


class DBlock(nn.Module):
    """Residual block at half resolution: ``(conv3x3 -> lrelu -> conv3x3 -> lrelu -> pool +
    1x1(pool(x))) / sqrt(2)``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv0 = nn.Conv2d(cin, cin, 3, padding=1)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        y = nnf.leaky_relu(self.conv0(x), 0.2)
        y = nnf.avg_pool2d(nnf.leaky_relu(self.conv1(y), 0.2), 2)
        return (y + self.skip(nnf.avg_pool2d(x, 2))) * 2**-0.5


class ImageDiscriminator(nn.Module):
    """StyleGAN2-style residual discriminator for ``(C, H, W)`` images in [-1, 1].

    Args:
        img_channels: image channels C.
        img_resolution: image side H = W (a power of two times 4 or more, e.g. 8, 16, 32).
        channels: width at full resolution.
        channel_mult: width multipliers per halving (the last one repeats).
        max_channels: cap on any block's width.
        num_classes: class labels for projection conditioning (0: unconditional).
        mbstd_group: group size of the minibatch standard-deviation feature (0: off).
    """

    def __init__(self, img_channels: int, img_resolution: int, channels: int = 64,
                 channel_mult: List[int] = (1, 2, 2), max_channels: int = 512, num_classes: int = 0,
                 mbstd_group: int = 4):
        super().__init__()
        if img_resolution < 4 or img_resolution & (img_resolution - 1):
            raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
        self.data_shape = (img_channels, img_resolution, img_resolution)
        self.num_classes, self.mbstd_group = num_classes, mbstd_group
        widths, res = [], img_resolution
        while res > 4:
            widths.append(min(max_channels, channels * channel_mult[min(len(widths), len(channel_mult) - 1)]))
            res //= 2
        widths.append(min(max_channels, channels * channel_mult[min(len(widths), len(channel_mult) - 1)]))
        self.inp = nn.Conv2d(img_channels, widths[0], 1)
        self.blocks = nn.ModuleList(DBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        top = widths[-1]
        self.conv = nn.Conv2d(top + (1 if mbstd_group else 0), top, 3, padding=1)
        self.fc = nn.Linear(top * 16, top)
        self.head = _Projection(top, num_classes)

    def forward(self, x: torch.Tensor, label=None) -> torch.Tensor:
        h = nnf.leaky_relu(self.inp(x), 0.2)
        for block in self.blocks:
            h = block(h)
        if self.mbstd_group:
            h = minibatch_std(h, self.mbstd_group)
        h = nnf.leaky_relu(self.conv(h), 0.2)
        h = nnf.leaky_relu(self.fc(h.flatten(1)), 0.2)
        return self.head(h, label)


class MLPDiscriminator(nn.Module):
    """Discriminator for vector data: an MLP with leaky ReLUs, a minibatch standard-deviation
    feature on the input, and projection class conditioning.

    Args:
        data_dim: dimension D of the data vectors.
        width: hidden width.
        depth: hidden layers.
        num_classes: class labels for projection conditioning (0: unconditional).
        mbstd_group: group size of the minibatch standard-deviation feature (0: off).
    """

    def __init__(self, data_dim: int, width: int = 256, depth: int = 3, num_classes: int = 0, mbstd_group: int = 4):
        super().__init__()
        self.data_shape = (data_dim,)
        self.num_classes, self.mbstd_group = num_classes, mbstd_group
        dims = [data_dim + (1 if mbstd_group else 0)] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.head = _Projection(width, num_classes)

    def forward(self, x: torch.Tensor, label=None) -> torch.Tensor:
        h = minibatch_std(x, self.mbstd_group) if self.mbstd_group else x
        for layer in self.layers:
            h = nnf.leaky_relu(layer(h), 0.2)
        return self.head(h, label)
