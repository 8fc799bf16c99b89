"""Smooth scalar embeddings (times, guidance scale). Smoothness matters: the JVP differentiates
them, so they take t directly, never log-sigma (docs/maths.md §2)."""
from __future__ import annotations

import math

import torch
from torch import nn


class FourierFeatures(nn.Module):
    """``[u, sin(2 pi f_k u), cos(2 pi f_k u)]`` with K geometric frequencies in [1, max_freq]."""

    def __init__(self, num_freqs: int = 16, max_freq: float = 16.0):
        super().__init__()
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), num_freqs)) * 2 * math.pi
        self.register_buffer("freqs", freqs, persistent=False)
        self.out_dim = 2 * num_freqs + 1

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        arg = u[:, None].to(self.freqs.dtype) * self.freqs[None]
        return torch.cat([u[:, None].to(arg.dtype), arg.sin(), arg.cos()], dim=1)


class ScalarEmbedding(nn.Module):
    """Fourier features followed by a two-layer MLP. ``zero_init`` zeroes the last layer so the
    branch contributes nothing at init (used for the s and guidance conditions)."""

    def __init__(self, emb_dim: int, num_freqs: int = 16, max_freq: float = 16.0, zero_init: bool = False):
        super().__init__()
        self.features = FourierFeatures(num_freqs, max_freq)
        self.mlp = nn.Sequential(
            nn.Linear(self.features.out_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if zero_init:
            self.zero_output()

    def zero_output(self):
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(u))
