"""The :class:`Encoder` interface of a data set's space, the identity of pixel data, and the
rebuilding of an encoder from its record (see :mod:`ayf.encoders`)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ayf.errors import ConfigError


class Encoder(nn.Module):
    """The interface of a data set's space. Subclasses implement every method below.

    Tensors may carry any leading dimensions before the channel axis, which is the third last
    (``(C, h, w)`` or ``(B, C, h, w)``); results lie on the input's device."""

    kind = "encoder"

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(B, C, H, W)`` -> the stored representation (deterministic)."""
        raise NotImplementedError

    def sample(self, moments: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Stored moments -> latents in model units (a draw where the moments hold a distribution)."""
        raise NotImplementedError

    def mode(self, moments: torch.Tensor) -> torch.Tensor:
        """Stored moments -> the latents of the distribution's mean (no draw)."""
        raise NotImplementedError

    def latent_mean_var(self, moments: torch.Tensor) -> tuple:
        """The mean and variance of :meth:`sample`'s output, element by element (exact, no draw)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in model units -> pixels as float model units in [-1, 1]."""
        raise NotImplementedError

    def latent_shape(self, pixel_shape: Sequence[int]) -> tuple:
        """The shape of one example's latents, given its pixels' ``(C, H, W)``."""
        raise NotImplementedError

    def moments_shape(self, pixel_shape: Sequence[int]) -> tuple:
        """The shape of one example's stored moments, given its pixels' ``(C, H, W)``."""
        raise NotImplementedError

    def to_manifest(self) -> dict:
        """Plain JSON that :func:`encoder_from_manifest` turns back into this encoder."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs."""
        raise NotImplementedError


class IdentityEncoder(Encoder):
    """Pixel data: the moments are the model units ``u / 127.5 - 1``, and sampling and decoding
    return their input."""

    kind = "identity"

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> float32 model units in [-1, 1]."""
        check_pixels(pixels, None)
        return pixels.float() / 127.5 - 1.0

    def sample(self, moments: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The moments themselves (nothing is drawn)."""
        return moments

    def mode(self, moments: torch.Tensor) -> torch.Tensor:
        """The moments themselves."""
        return moments

    def latent_mean_var(self, moments: torch.Tensor) -> tuple:
        """The moments, and zero variance."""
        return moments.float(), torch.zeros_like(moments, dtype=torch.float32)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents themselves (they are pixels in model units)."""
        return latents

    def latent_shape(self, pixel_shape: Sequence[int]) -> tuple:
        """The pixel shape."""
        return tuple(int(d) for d in pixel_shape)

    def moments_shape(self, pixel_shape: Sequence[int]) -> tuple:
        """The pixel shape."""
        return tuple(int(d) for d in pixel_shape)

    def to_manifest(self) -> dict:
        """``{"kind": "identity", "pixel_range": "[-1,1]", "stored": "pixels"}``."""
        return {"kind": self.kind, "pixel_range": "[-1,1]", "stored": "pixels"}

    def describe(self) -> str:
        """One line for logs."""
        return "pixels (model units u / 127.5 - 1)"


def encoder_from_manifest(d: Optional[dict]) -> Encoder:
    """The encoder that :meth:`Encoder.to_manifest` described (None: pixels)."""
    if d is None:
        return IdentityEncoder()
    if not isinstance(d, dict):
        raise ConfigError(f"an encoder record is a JSON object; got {type(d).__name__}")
    kind = d.get("kind")
    if kind == IdentityEncoder.kind:
        return IdentityEncoder()
    if kind == "vae":
        from ayf.encoders.vae import VAEEncoder

        missing = [k for k in ("folder", "normalisation", "pixel_range", "stored", "latent_channels",
                               "in_channels", "downsample") if k not in d]
        if missing:
            raise ConfigError(f"the VAE encoder record lacks {', '.join(missing)}")
        return VAEEncoder(d["folder"], normalisation=d["normalisation"], pixel_range=d["pixel_range"],
                          stored=d["stored"], vae_config={k: d[k] for k in ("latent_channels", "in_channels", "downsample")})
    raise ConfigError(f"unknown encoder kind {kind!r} (known: identity, vae): written by a newer ayf?")


def check_pixels(pixels, channels: Optional[int]) -> None:
    if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or pixels.dim() != 4:
        what = f"{pixels.dtype} {tuple(pixels.shape)}" if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ConfigError(f"an encoder takes uint8 pixels (B, C, H, W); got {what}")
    if channels is not None and pixels.shape[1] != channels:
        raise ConfigError(f"this encoder takes {channels}-channel pixels; got {pixels.shape[1]}")
