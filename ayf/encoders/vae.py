"""A diffusers ``AutoencoderKL`` from a local folder as a data set's encoder, with a per-channel
latent normalisation (see :mod:`ayf.encoders`)."""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ayf.encoders.base import Encoder, check_pixels
from ayf.errors import ConfigError

#: named normalisations: raw latent mean and std per channel, the mean and std they are mapped to
NORMALISATIONS = {
    "edm2_sd": {"mean": [5.81, 3.25, 0.12, -2.15], "std": [4.17, 4.62, 3.71, 3.28],
                "final_mean": 0.0, "final_std": 0.5},
}
#: how uint8 pixels ``u`` are fed to the VAE, and how its output is read back
PIXEL_RANGES = {"[0,1]": "u / 255", "[-1,1]": "u / 127.5 - 1"}
#: what a VAE shard stores per example
STORED = ("posterior", "mean")
#: the final mean and std of a normalisation given as a dict without them (the spread of [-1, 1] pixels)
DEFAULT_FINAL_MEAN, DEFAULT_FINAL_STD = 0.0, 0.5
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class VAEEncoder(Encoder):
    """A diffusers ``AutoencoderKL`` from a local folder, with a per-channel normalisation.

    Args:
        folder: the VAE's folder (``config.json`` and ``diffusion_pytorch_model.safetensors``, as
            ``AutoencoderKL.save_pretrained`` writes them; a pipeline's ``vae/`` sub-folder).
        normalisation: ``"edm2_sd"`` (see :data:`NORMALISATIONS`), ``"vae_config"`` (what diffusers
            pipelines do: ``(raw - shift_factor) * scaling_factor`` from the VAE's config) or a dict ``{"mean": [...],
            "std": [...]}`` of the raw latents' per-channel mean and std, optionally with
            ``"final_mean"`` and ``"final_std"`` (numbers or per-channel lists; default 0 and 0.5,
            the spread of [-1, 1] pixels). ``z = (raw - mean) / std * final_std + final_mean``.
        pixel_range: ``"[0,1]"`` (EDM2's convention: the VAE sees ``u / 255``) or ``"[-1,1]"``
            (diffusers' pipelines: ``u / 127.5 - 1``); :meth:`decode` reads the VAE's output in the
            same range and returns model units.
        stored: ``"posterior"``: the moments are the posterior's mean and std, concatenated on the
            channel axis, and :meth:`sample` draws ``mean + std * eps``; ``"mean"``: the posterior
            mean alone, and :meth:`sample` only normalises it.
        vae_config: the VAE's ``latent_channels``, ``in_channels`` and ``downsample`` as a manifest
            records them. Given, the folder is read only when the VAE is first needed (and checked
            against them then); None reads and checks ``config.json`` now.

    The VAE is loaded on the first :meth:`encode` or :meth:`decode`, onto this module's device. It
    is no submodule: it is in no ``state_dict`` and no ``parameters()``, but ``.to()`` moves it.
    """

    kind = "vae"

    def __init__(self, folder: str, normalisation: Union[str, dict] = "edm2_sd", pixel_range: str = "[0,1]",
                 stored: str = "posterior", vae_config: Optional[dict] = None):
        super().__init__()
        self.folder = os.path.abspath(os.path.expanduser(str(folder)))
        if pixel_range not in PIXEL_RANGES:
            raise ConfigError(f"pixel_range must be one of {', '.join(PIXEL_RANGES)}; got {pixel_range!r}")
        if stored not in STORED:
            raise ConfigError(f"stored must be one of {', '.join(STORED)}; got {stored!r}")
        self.pixel_range, self.stored = pixel_range, stored
        facts = dict(vae_config) if vae_config is not None else vae_facts(read_vae_config(self.folder), self.folder)
        for key in ("latent_channels", "in_channels", "downsample"):
            if not isinstance(facts.get(key), int) or facts[key] < 1:
                raise ConfigError(f"vae_config needs a positive integer {key}; got {facts.get(key)!r}")
        self.latent_channels, self.in_channels = facts["latent_channels"], facts["in_channels"]
        self.downsample = facts["downsample"]
        self.normalisation = normalisation_constants(normalisation, self.latent_channels, self.folder)
        for name in ("mean", "std", "final_mean", "final_std"):
            self.register_buffer(name, torch.tensor(self.normalisation[name], dtype=torch.float32), persistent=False)
        object.__setattr__(self, "_vae", None)  # not a submodule: see the class docstring

    # --- the VAE ---------------------------------------------------------------------------------
    @property
    def vae(self) -> nn.Module:
        """The AutoencoderKL (loaded on first use, frozen, in eval mode, on this module's device)."""
        if self._vae is None:
            vae = load_vae(self.folder)
            facts = vae_facts(dict(vae.config), self.folder)
            if (facts["latent_channels"], facts["in_channels"]) != (self.latent_channels, self.in_channels):
                raise ConfigError(f"the VAE in {self.folder} has {facts['in_channels']} pixel and "
                                  f"{facts['latent_channels']} latent channels, not the {self.in_channels} and "
                                  f"{self.latent_channels} these latents were encoded with")
            object.__setattr__(self, "_vae", vae.to(self.mean.device))
        return self._vae

    def attach(self, vae: nn.Module) -> "VAEEncoder":
        """Uses ``vae`` (an AutoencoderKL already loaded, e.g. a pipeline's) instead of reading the
        folder; its channel counts must be the recorded ones."""
        facts = vae_facts(dict(vae.config), self.folder)
        if (facts["latent_channels"], facts["in_channels"]) != (self.latent_channels, self.in_channels):
            raise ConfigError(f"this VAE has {facts['in_channels']} pixel and {facts['latent_channels']} latent channels, "
                              f"not the {self.in_channels} and {self.latent_channels} the latents were encoded with")
        object.__setattr__(self, "_vae", vae.eval().requires_grad_(False))
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._vae is not None:
            self._vae._apply(fn, *args, **kwargs)
        return self

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_vae"] = None  # workers and copies reload it from the folder when they need it
        return state

    # --- normalisation -----------------------------------------------------------------------------
    def _constants(self, like: torch.Tensor):
        shape = (-1, 1, 1)
        return [c.to(like.device).reshape(shape) for c in (self.mean, self.std, self.final_mean, self.final_std)]

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (float32) -> model units: ``(raw - mean) / std * final_std + final_mean``."""
        mean, std, final_mean, final_std = self._constants(raw)
        return (raw.float() - mean) / std * final_std + final_mean

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        """Model units -> raw latents, the inverse of :meth:`normalise`."""
        mean, std, final_mean, final_std = self._constants(z)
        return (z.float() - final_mean) / final_std * std + mean

    def _split(self, moments: torch.Tensor) -> tuple:
        want = self.latent_channels * (2 if self.stored == "posterior" else 1)
        if moments.dim() < 3 or moments.shape[-3] != want:
            raise ConfigError(f"{self.stored} moments of this VAE have {want} channels; got shape {tuple(moments.shape)}")
        moments = moments.float()
        if self.stored == "posterior":
            return moments.chunk(2, dim=-3)
        return moments, None

    # --- the Encoder interface -----------------------------------------------------------------------
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ``(B, C, H, W)`` -> the posterior's ``cat(mean, std)`` (``stored="posterior"``)
        or its mean, float32 on the input's device (the VAE runs on this module's device)."""
        check_pixels(pixels, self.in_channels)
        self.latent_shape(pixels.shape[1:])
        vae = self.vae
        x = pixels.to(self.mean.device).float()
        x = x / 255.0 if self.pixel_range == "[0,1]" else x / 127.5 - 1.0
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
            out = torch.cat([dist.mean, dist.std], dim=1) if self.stored == "posterior" else dist.mean
        return out.float().to(pixels.device)

    def sample(self, moments: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``normalise(mean + std * eps)``, ``eps`` standard normal drawn from ``generator`` (on its
        device; None: the global RNG) for ``stored="posterior"``; ``normalise(mean)`` for ``"mean"``."""
        mean, std = self._split(moments)
        if std is None:
            return self.normalise(mean)
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32).to(mean.device)
        return self.normalise(mean + std * eps)

    def mode(self, moments: torch.Tensor) -> torch.Tensor:
        """``normalise(mean)``: the latents of the posterior mean."""
        return self.normalise(self._split(moments)[0])

    def latent_mean_var(self, moments: torch.Tensor) -> tuple:
        """``normalise(mean)`` and ``(std * final_std / raw_std) ** 2`` (zero for ``stored="mean"``)."""
        mean, std = self._split(moments)
        z = self.normalise(mean)
        if std is None:
            return z, torch.zeros_like(z)
        _, raw_std, _, final_std = self._constants(std)
        return z, (std * final_std / raw_std) ** 2

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in model units -> ``denormalise``, the VAE's decoder, its output read in
        ``pixel_range`` and mapped to model units, clamped to [-1, 1]; float32 on the input's device.
        Differentiable in the latents (the VAE's weights are frozen)."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ConfigError(f"latents of this VAE are (B, {self.latent_channels}, h, w); got shape {tuple(latents.shape)}")
        vae = self.vae
        x = vae.decode(self.denormalise(latents.to(self.mean.device))).sample.float()
        x = x * 2.0 - 1.0 if self.pixel_range == "[0,1]" else x
        return x.clamp(-1.0, 1.0).to(latents.device)

    def latent_shape(self, pixel_shape: Sequence[int]) -> tuple:
        """``(latent_channels, H / f, W / f)`` for the VAE's downsampling factor ``f``; pixels of
        another channel count or a size ``f`` does not divide are a ConfigError."""
        if len(pixel_shape) != 3:
            raise ConfigError(f"VAE pixels are (C, H, W); got shape {tuple(pixel_shape)}")
        c, h, w = (int(d) for d in pixel_shape)
        f = self.downsample
        if c != self.in_channels:
            raise ConfigError(f"the VAE in {self.folder} takes {self.in_channels}-channel pixels; these have {c}")
        if h % f or w % f:
            raise ConfigError(f"the VAE in {self.folder} downsamples by {f}, which does not divide the image size "
                              f"{h}x{w}: pad or crop the images (--pad)")
        return (self.latent_channels, h // f, w // f)

    def moments_shape(self, pixel_shape: Sequence[int]) -> tuple:
        """The latent shape, with twice the channels for ``stored="posterior"``."""
        c, h, w = self.latent_shape(pixel_shape)
        return (c * (2 if self.stored == "posterior" else 1), h, w)

    def to_manifest(self) -> dict:
        """``{"kind": "vae", "folder", "class", "normalisation", "pixel_range", "stored",
        "latent_channels", "in_channels", "downsample"}``."""
        return {"kind": self.kind, "folder": self.folder, "class": "AutoencoderKL",
                "normalisation": dict(self.normalisation), "pixel_range": self.pixel_range, "stored": self.stored,
                "latent_channels": self.latent_channels, "in_channels": self.in_channels,
                "downsample": self.downsample}

    def describe(self) -> str:
        """One line for logs."""
        norm = self.normalisation.get("preset") or "custom"
        what = "posterior mean and std" if self.stored == "posterior" else "posterior mean"
        return (f"VAE {self.folder} ({self.in_channels} -> {self.latent_channels} channels, /{self.downsample}), "
                f"normalisation {norm}, pixels fed in {self.pixel_range}, stores the {what}")


def normalisation_constants(spec: Union[str, dict], channels: int, folder: str = "") -> dict:
    """A normalisation (a preset name or a dict, see :class:`VAEEncoder`) as plain JSON with
    per-channel lists: ``{"preset", "mean", "std", "final_mean", "final_std"}``."""
    if spec == "vae_config":  # diffusers pipelines' own: (raw - shift_factor) * scaling_factor
        config = read_vae_config(folder)
        scale, shift = float(config.get("scaling_factor") or 1.0), float(config.get("shift_factor") or 0.0)
        spec = {"preset": "vae_config", "mean": [shift] * channels, "std": [1.0 / scale] * channels,
                "final_mean": 0.0, "final_std": 1.0}
    if isinstance(spec, str):
        if spec not in NORMALISATIONS:
            raise ConfigError(f"unknown normalisation {spec!r}: give one of {', '.join(NORMALISATIONS)}, vae_config, or "
                              'a JSON object {"mean": [...], "std": [...]} of the raw latents per channel')
        preset, spec = spec, NORMALISATIONS[spec]
    elif isinstance(spec, dict):
        preset = spec.get("preset")
        if preset is not None and not isinstance(preset, str):
            raise ConfigError(f"normalisation preset must be a name; got {preset!r}")
    else:
        raise ConfigError(f"normalisation must be a preset name or a dict; got {type(spec).__name__}")
    unknown = set(spec) - {"preset", "mean", "std", "final_mean", "final_std"}
    if unknown:
        raise ConfigError(f"unknown normalisation keys {sorted(unknown)}: use mean, std, final_mean, final_std")
    if "mean" not in spec or "std" not in spec:
        raise ConfigError('a normalisation needs "mean" and "std" (the raw latents\' per-channel mean and std)')
    out = {"preset": preset}
    where = f" of the VAE in {folder}" if folder else ""
    for key, default in (("mean", None), ("std", None), ("final_mean", DEFAULT_FINAL_MEAN), ("final_std", DEFAULT_FINAL_STD)):
        value = spec.get(key, default)
        values = [value] * channels if isinstance(value, (int, float)) and key.startswith("final") else value
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) for v in values):
            raise ConfigError(f"normalisation {key} must be a list of numbers; got {value!r}")
        if len(values) != channels:
            raise ConfigError(f"normalisation {key} has {len(values)} channels but the {channels} latent "
                              f"channels{where} need {channels}")
        values = [float(v) for v in values]
        if not all(torch.isfinite(torch.tensor(values))):
            raise ConfigError(f"normalisation {key} must be finite; got {values}")
        if key.endswith("std") and min(values) <= 0:
            raise ConfigError(f"normalisation {key} must be positive; got {values}")
        out[key] = values
    return out


def read_vae_config(folder: str) -> dict:
    """The ``config.json`` of an AutoencoderKL folder, with a one-line ConfigError for a folder
    that is missing, lacks its config or weights, or holds another model."""
    if not os.path.isdir(folder):
        raise ConfigError(f"VAE folder not found: {folder}", missing=folder)
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        hint = ("; its vae/ sub-folder is one" if os.path.isfile(os.path.join(folder, "vae", "config.json"))
                else "; write one with AutoencoderKL.save_pretrained(folder)")
        raise ConfigError(f"{folder} is not a diffusers VAE folder: it has no config.json{hint}")
    try:
        with open(path) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder} is not a diffusers VAE folder: cannot read config.json ({err})") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":
        raise ConfigError(f"{folder} is not an AutoencoderKL folder: its config.json describes {kind!r}")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise ConfigError(f"{folder} has an AutoencoderKL config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    return config


def vae_facts(config: dict, folder: str) -> dict:
    """``{"latent_channels", "in_channels", "downsample"}`` of an AutoencoderKL config."""
    try:
        blocks = config.get("block_out_channels", (64,))
        return {"latent_channels": int(config.get("latent_channels", 4)), "in_channels": int(config.get("in_channels", 3)),
                "downsample": 2 ** (len(blocks) - 1)}
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{folder}: unreadable AutoencoderKL config ({err})") from None


def load_vae(folder: str) -> nn.Module:
    """The AutoencoderKL in ``folder`` (local files only), frozen and in eval mode."""
    read_vae_config(folder)
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError("a VAE encoder needs diffusers, the optional extra: pip install 'ayf[diffusers]'") from None
    try:
        # low_cpu_mem_usage needs accelerate; without it, diffusers would warn and fall back
        low_memory = importlib.util.find_spec("accelerate") is not None
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=low_memory)
    except Exception as err:  # noqa: BLE001 - whatever diffusers raises, the folder is the user's error
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"cannot load the AutoencoderKL in {folder}: {type(err).__name__}: {first}") from None
    return vae.eval().requires_grad_(False)
