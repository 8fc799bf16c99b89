"""Encoders: the space a data set lives in, between uint8 pixels and what the model sees.

An :class:`Encoder` turns uint8 pixels ``(B, C, H, W)`` into a stored representation (its
*moments*), draws model-unit latents from those moments, and decodes latents back into pixels in
ayf's model units (``u / 127.5 - 1``, in [-1, 1]; :func:`ayf.figures.to_uint8` makes them uint8).

* :class:`IdentityEncoder`: pixel data. The moments are the model units themselves; sampling and
  decoding change nothing.
* :class:`VAEEncoder`: a diffusers ``AutoencoderKL`` read from a local folder (the optional extra
  ``ayf[diffusers]``). The moments are the posterior's mean and standard deviation, concatenated
  on the channel axis (``stored="posterior"``, ``2 * latent_channels`` channels, so that each read
  of an example can draw a fresh latent), or the mean alone (``stored="mean"``). Latents are
  normalised per channel, ``z = (raw - mean) / std * final_std + final_mean``. The preset
  ``edm2_sd`` holds the constants NVlabs/edm2 uses for Stability's SD VAE (raw mean
  ``[5.81, 3.25, 0.12, -2.15]``, raw std ``[4.17, 4.62, 3.71, 3.28]``, final mean 0, final std 0.5);
  EDM2 feeds that VAE pixels in [0, 1] (``pixel_range="[0,1]"``), where diffusers' own pipelines use
  [-1, 1].

A shard manifest records the encoder with :meth:`Encoder.to_manifest` (plain JSON) and
:func:`encoder_from_manifest` rebuilds it. A VAEEncoder rebuilt so reads its folder only when the VAE
itself is first needed (``encode`` / ``decode``): training on latent shards needs neither the folder
nor diffusers. Weights are read by ``from_pretrained(folder, local_files_only=True)``: nothing is
downloaded, and diffusers reads ``.bin`` weights with ``weights_only=True``.

This module imports only :mod:`ayf.io` and :mod:`ayf.errors` of ayf (diffusers inside functions).
"""
from ayf.encoders.base import Encoder, IdentityEncoder, encoder_from_manifest  # noqa: F401
from ayf.encoders.vae import (  # noqa: F401
    NORMALISATIONS,
    PIXEL_RANGES,
    STORED,
    VAEEncoder,
    load_vae,
    normalisation_constants,
    read_vae_config,
    vae_facts,
)
