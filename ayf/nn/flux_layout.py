"""The layout side of FLUX-shaped transformers (:mod:`ayf.nn.flux`): where a pipeline folder keeps
its transformer, how ``(C, H, W)`` latents become the 2 x 2-patch tokens the model reads and back,
their rotary position ids, and a fingerprint that tells two models' weights apart."""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from ayf.errors import ConfigError


def transformer_folder(path: str) -> str:
    """The transformer's folder: ``path`` itself, or a pipeline folder's ``transformer/``."""
    if not os.path.isdir(path):
        where = "" if os.path.isabs(path) else f" (from {os.getcwd()})"
        raise ConfigError(f"model folder not found: {path}{where}", missing=path)
    for folder in (path, os.path.join(path, "transformer")):
        config = os.path.join(folder, "config.json")
        if os.path.isfile(config):
            with open(config) as f:
                kind = json.load(f).get("_class_name")
            if kind != "FluxTransformer2DModel":
                raise ConfigError(f"{folder}: unsupported transformer {kind!r}; supported: FluxTransformer2DModel")
            return folder
    raise ConfigError(f"{path}: no transformer in it (neither {path}/config.json nor {path}/transformer/config.json); "
                      "save a pipeline with pipe.save_pretrained(folder)")


def pack(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` latents -> ``(B, H W / 4, 4 C)`` tokens of 2 x 2 patches (FLUX's order)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``shape`` ``(C, H, W)``."""
    c, h, w = shape
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Rotary position ids ``(H W / 4, 3)`` of the packed tokens: ``(0, row, column)``."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def weights_fingerprint(state: dict, samples: int = 4096) -> str:
    """A hash of a model's weights: each tensor's name, shape and dtype and ``samples`` of its
    values at a fixed stride (enough to tell two base models apart, in a fraction of a full hash's time)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        flat = t.reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::step].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
