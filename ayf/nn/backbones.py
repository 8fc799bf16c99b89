"""Backbones: ``forward(x, emb, cond=None) -> (B, *data_shape)``. They know nothing of t, s or
sigma: :class:`ayf.nn.FlowMap` turns those into ``emb`` (B, emb_dim)."""
from __future__ import annotations

import torch
from torch import nn


class MLPBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.scale = 2**-0.5  # keeps the residual stream's magnitude without a normalisation layer
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h, emb):
        a = self.fc1(torch.nn.functional.silu(h)) + self.emb(emb)
        return (h + self.fc2(self.drop(torch.nn.functional.silu(a)))) * self.scale


class MLP(nn.Module):
    """Residual MLP for vector data, conditioned additively on the embedding in every block.

    No normalisation layers: their forward-mode derivative is costly and the JVP runs every
    distillation step; residual branches are scaled by 1/sqrt(2) instead.

    Args:
        data_dim: dimension D of the data vectors.
        width: hidden width.
        depth: number of residual blocks.
        emb_dim: size of the conditioning embedding that FlowMap builds.
        dropout: dropout rate inside the blocks.
    """

    def __init__(self, data_dim: int, width: int = 256, depth: int = 4, emb_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        if data_dim < 1 or width < 1 or depth < 1 or emb_dim < 1:
            raise ValueError("MLP sizes (data_dim, width, depth, emb_dim) must be positive")
        self.data_shape = (data_dim,)
        self.emb_dim = emb_dim
        self.inp = nn.Linear(data_dim, width)
        self.blocks = nn.ModuleList(MLPBlock(width, emb_dim, dropout) for _ in range(depth))
        self.out = nn.Linear(width, data_dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond=None) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(torch.nn.functional.silu(h))
