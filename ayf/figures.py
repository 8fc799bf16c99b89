"""Pixels and figures: model units <-> uint8 pixels, image tiles, and the Matplotlib figures
that callbacks, ``ayf sample`` and the toy report draw. Imports torch only (Matplotlib and
Pillow when a figure or file is made)."""
from __future__ import annotations

from typing import Optional

import torch


def to_model_units(images_u8):
    """uint8 pixels -> model units in [-1, 1]: ``x = u / 127.5 - 1`` (works on numpy and torch)."""
    return images_u8 / 127.5 - 1.0


def to_uint8(x):
    """Model units -> uint8 pixels, the inverse of :func:`to_model_units` (rounded, clamped; torch)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def pipeline_output(x: torch.Tensor, output_type: str):
    """Samples in model units as a diffusers pipeline returns them: ``pt`` (unchanged), ``np``
    (``(B, H, W, C)`` in [0, 1]) or ``pil`` (a list of PIL images)."""
    if output_type == "pt":
        return x
    if output_type not in ("np", "pil"):
        raise ValueError(f"output_type must be pil, np or pt, got {output_type!r}")
    if x.ndim != 4:
        raise ValueError(f"output_type {output_type!r} needs images (B, C, H, W); these samples are {tuple(x.shape)}: "
                         "use output_type='pt'")
    pixels = ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return pixels
    from PIL import Image

    u8 = (pixels * 255).round().astype("uint8")
    return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in u8]


def tile(images: torch.Tensor, cols: int) -> torch.Tensor:
    """``(N, C, H, W)`` in [-1, 1] -> one ``(H', W', C)`` float image in [0, 1], 1-pixel gaps.

    Images of 1 or 3 channels are shown as they are; 2 channels as red and green (blue zero), more
    than 3 (e.g. latents) by their first three."""
    if images.shape[1] == 2:
        images = torch.cat([images, -torch.ones_like(images[:, :1])], dim=1)
    elif images.shape[1] > 3:
        images = images[:, :3]
    n, c, h, w = images.shape
    rows = -(-n // cols)
    canvas = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    imgs = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = imgs[i]
    return canvas.permute(1, 2, 0)


def auto_scale(size: int, target: int = 512) -> int:
    """The integer nearest-neighbour zoom that brings an image's longer side ``size`` to at
    least ``target`` pixels (1 when it is that large already)."""
    return max(1, -(-target // max(1, size)))


def save_png(images: torch.Tensor, path: str, cols: int, scale: int = 0) -> tuple:
    """Tiles ``(N, C, H, W)`` images in [-1, 1] into one PNG, zoomed ``scale`` times by nearest
    neighbour (0: :func:`auto_scale`); returns the written ``(height, width)``."""
    from PIL import Image

    img = (tile(images, cols) * 255).round().to(torch.uint8)
    scale = scale or auto_scale(max(img.shape[:2]))
    img = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
    return img.shape[:2]


def grid_figure(panels: dict, cols: int, title: str = ""):
    """One tiled panel per entry ``{name: (N, C, H, W) in [-1, 1]}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = {name: tile(imgs, cols) for name, imgs in panels.items()}
    n, (h, w) = len(tiles), next(iter(tiles.values())).shape[:2]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2 * h / w + 0.7), squeeze=False)
    for ax, (name, img) in zip(axes[0], tiles.items(), strict=True):
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def scatter_figure(panels: dict, title: str = "", lim: Optional[float] = None):
    """One square scatter panel per entry ``{name: (N, >=2) array}`` (first two coordinates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), squeeze=False)
    for ax, (name, pts) in zip(axes[0], panels.items(), strict=True):
        pts = torch.as_tensor(pts).float().cpu()
        y = pts[:, 1] if pts.shape[1] > 1 else torch.zeros(len(pts))
        ax.scatter(pts[:, 0], y, s=1, alpha=0.4, linewidths=0)
        ax.set_title(name, fontsize=9)
        if lim is not None:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
