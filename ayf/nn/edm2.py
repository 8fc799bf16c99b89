"""EDM2's network (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Fig. 21 and Appendix B) as an ayf backbone, with EDM2's own module layout, so
that EDM2 weights load by a key rename alone (``ayf convert edm2``, docs/maths.md §10).

:class:`EDM2Net` holds EDM2's U-Net (``unet.*``: its Fourier noise embedding of
``c_noise = ln(sigma) / 4``, its magnitude-preserving label embedding and ``mp_sum`` balance, its
encoder and decoder), EDM2's preconditioning (``sigma_data``) and, by option, its logvar head.
It conditions on time itself (``conditions_on_time``): :class:`ayf.nn.FlowMap` calls it with
ayf's t and adds only the s and guidance branches, before the first nonlinearity.

Its velocity is EDM's denoiser in ayf's time, exactly (:func:`ayf.math.path.edm_precond`):
``v = c_skip x_t + c_out N(c_in x_t, c_noise(t))``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ayf.errors import ConfigError
from ayf.math.path import edm_precond, t_to_sigma
from ayf.nn.adapters import NETWORK_OUT_OF_RANGE as OUT_OF_RANGE
from ayf.nn.embeddings import ScalarEmbedding
from ayf.nn.unet import MPConv, mp_normalize, mp_silu, mp_sum, run_unet, unet_levels

TIME_INPUTS = ("c_noise", "t")


class MPFourier(nn.Module):
    """EDM2's magnitude-preserving Fourier features ``sqrt(2) cos(2 pi (f u + p))`` with random
    frequencies ``f ~ N(0, bandwidth^2)`` and phases ``p ~ U(0, 1)`` (stored as buffers)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(u.dtype, torch.float32)  # float32 at least, as EDM2
        y = torch.outer(u.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)
        return (y.cos() * math.sqrt(2)).to(u.dtype)


class EDM2UNet(nn.Module):
    """EDM2's U-Net ``N(x, c_noise, one_hot)`` with EDM2's parameter names; see :class:`EDM2Net`
    for the arguments."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int,
                 channel_mult: Sequence[int], channel_mult_noise: Optional[int], channel_mult_emb: Optional[int],
                 num_blocks: int, attn_resolutions: Sequence[int], label_balance: float, concat_balance: float,
                 block_kw: dict):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        self.emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, self.emb_channels, ())
        self.emb_label = MPConv(label_dim, self.emb_channels, ()) if label_dim else None
        kw = dict(block_kw, emb_dim=self.emb_channels, at_least_one_head=False)
        self.enc, self.dec, cout = unet_levels(img_channels, img_resolution, cblock, num_blocks, attn_resolutions,
                                               kw, lambda res, part: f"{res}x{res}_{part}")
        self.out_conv = MPConv(cout, img_channels, (3, 3))

    def noise_embedding(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.emb_noise(self.emb_fourier(c_noise))

    def embedding(self, noise: torch.Tensor, one_hot: Optional[torch.Tensor]) -> torch.Tensor:
        """The conditioning vector before its nonlinearity: ``mp_sum`` of noise and label embeddings."""
        if self.emb_label is None:
            return noise
        label = self.emb_label(one_hot.to(noise.dtype) * math.sqrt(one_hot.shape[1]))
        return mp_sum(noise, label, self.label_balance)

    def body(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The network output for the input ``c_in x`` and the conditioning vector ``emb``."""
        return self.out_conv(run_unet(self.enc, self.dec, x, mp_silu(emb), self.concat_balance), gain=self.out_gain)

    def forward(self, x, c_noise, one_hot=None):
        return self.body(x, self.embedding(self.noise_embedding(c_noise), one_hot))


class EDM2Net(nn.Module):
    """EDM2's preconditioned network as a backbone of :class:`ayf.nn.FlowMap` (velocity in ayf's time).

    The arguments before ``sigma_data`` are EDM2's, with EDM2's defaults (a converted network
    records them); ``sigma_min`` and later are ayf's.

    Args:
        img_resolution: image height and width.
        img_channels: image channels.
        label_dim: number of classes (0: unconditional).
        model_channels: base number of channels.
        channel_mult: channel multiplier per resolution.
        channel_mult_noise: multiplier of the noise embedding's Fourier channels (None: the first level's).
        channel_mult_emb: multiplier of the conditioning vector's size (None: the widest level's).
        num_blocks: residual blocks per resolution.
        attn_resolutions: resolutions with self-attention.
        label_balance: weight of the class embedding against the noise embedding (mp_sum).
        concat_balance: weight of the main path against the skips in the decoder (mp_cat).
        resample_filter: EDM2's resampling filter (only its default [1, 1]: box down, nearest up).
        channels_per_head: attention channels per head.
        dropout: dropout inside the residual blocks.
        res_balance: weight of the residual branch (mp_sum).
        attn_balance: weight of the attention branch (mp_sum).
        clip_act: clip block outputs to this magnitude (None: no clipping).
        sigma_data: EDM's data standard deviation in the preconditioning.
        logvar_channels: Fourier channels of EDM2's uncertainty (logvar) head; 0 drops the head.
        sigma_min: smallest noise level the network was trained on.
        sigma_max: largest noise level the network was trained on.
        out_of_range: time input outside [sigma_min, sigma_max]: `clamp` it (the preconditioning
            keeps the exact t) or `error`.
        time_input: `c_noise` (EDM2's ln(sigma) / 4, valid inside the range) or `t` (a realigned
            network: a smooth embedding of t, valid on [0, 1]).
        t_num_freqs: Fourier frequencies of the `t` time embedding.
        t_max_freq: largest frequency of the `t` time embedding (cycles per unit t).
    """

    conditions_on_time = True

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: Optional[int] = None,
                 channel_mult_emb: Optional[int] = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, resample_filter: Sequence[int] = (1, 1),
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: Optional[float] = 256, sigma_data: float = 0.5,
                 logvar_channels: int = 128, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 out_of_range: str = "clamp", time_input: str = "c_noise", t_num_freqs: int = 64,
                 t_max_freq: float = 256.0):
        super().__init__()
        if list(resample_filter) != [1, 1]:
            raise ConfigError(f"EDM2Net supports EDM2's default resample_filter [1, 1] only, got {list(resample_filter)}")
        if out_of_range not in OUT_OF_RANGE:
            raise ConfigError(f"out_of_range must be one of {', '.join(OUT_OF_RANGE)}, got {out_of_range!r}")
        if time_input not in TIME_INPUTS:
            raise ConfigError(f"time_input must be one of {', '.join(TIME_INPUTS)}, got {time_input!r}")
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        block_kw = dict(channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
                        attn_balance=attn_balance, clip_act=clip_act)
        self.unet = EDM2UNet(img_resolution, img_channels, label_dim, model_channels, channel_mult,
                             channel_mult_noise, channel_mult_emb, num_blocks, attn_resolutions, label_balance,
                             concat_balance, block_kw)
        self.data_shape = (img_channels, img_resolution, img_resolution)
        self.emb_dim = self.unet.emb_channels
        self.num_classes = label_dim
        self.sigma_data = sigma_data
        self.sigma_range = (float(sigma_min), float(sigma_max))
        self.out_of_range = out_of_range
        self.time_input = time_input
        if logvar_channels:
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, ()).requires_grad_(False)
        else:
            self.logvar_fourier = self.logvar_linear = None
        if time_input == "t":  # realigned: the c_noise embedding is replaced
            del self.unet.emb_fourier, self.unet.emb_noise
            self.t_embedding = ScalarEmbedding(self.emb_dim, t_num_freqs, t_max_freq)
        else:
            self.t_embedding = None

    @property
    def t_range(self) -> tuple:
        """Where the time input is valid, in ayf's t (all of [0, 1] once realigned)."""
        if self.time_input == "t":
            return (0.0, 1.0)
        lo, hi = self.sigma_range
        return (lo / (1 + lo), hi / (1 + hi))

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        """EDM2's time input ``ln(sigma(t)) / 4`` at t, with the range rule applied."""
        lo, hi = self.t_range
        if self.out_of_range == "error" and ((t < lo) | (t > hi)).any():
            bad = t[(t < lo) | (t > hi)][0].item()
            raise ConfigError(f"t = {bad:g} is outside this EDM2 network's range [{lo:.6g}, {hi:.6g}] "
                              f"(sigma in [{self.sigma_range[0]:g}, {self.sigma_range[1]:g}]); use out_of_range: clamp")
        return t_to_sigma(t.clamp(lo, hi)).log() / 4

    def one_hot(self, cond) -> Optional[torch.Tensor]:
        """EDM2's one-hot label of ``cond.label``; the null label (-1) is the zero vector."""
        if not self.num_classes:
            return None
        if cond is None or cond.label is None:
            raise ConfigError("this model is class-conditional: pass a label")
        label = cond.label
        known = (label >= 0).unsqueeze(1)
        return torch.nn.functional.one_hot(label.clamp(min=0), self.num_classes) * known

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """The noise embedding at t: EDM2's of c_noise(t), or the realigned one of t itself."""
        if self.t_embedding is not None:
            return self.t_embedding(t)
        return self.unet.noise_embedding(self.c_noise(t))

    def forward(self, x: torch.Tensor, t: torch.Tensor, extra: Optional[torch.Tensor] = None, cond=None):
        """The velocity ``v(x_t, t)`` (with ``extra``: the flow map's F); x ``(B, C, H, W)``, t ``(B,)``."""
        emb = self.unet.embedding(self.time_embedding(t), self.one_hot(cond))
        if extra is not None:
            emb = emb + extra.to(emb.dtype)
        c_in, c_skip, c_out = (c.to(x.dtype).view(-1, 1, 1, 1) for c in edm_precond(t, self.sigma_data))
        return c_skip * x + c_out * self.unet.body(c_in * x, emb).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, one_hot: Optional[torch.Tensor] = None):
        """EDM2's own ``D(x; sigma)`` (its Precond, in float32 or the input's wider dtype): the
        conversion check against EDM2's outputs. Needs the ``c_noise`` time input."""
        if self.t_embedding is not None:
            raise ConfigError("a realigned network (time_input: t) has no c_noise denoiser")
        sd = self.sigma_data
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (sd**2 + s**2).sqrt()
        if one_hot is None and self.num_classes:
            one_hot = torch.zeros(1, self.num_classes, dtype=x.dtype, device=x.device)
        return c_skip * x + c_out * self.unet(c_in * x, s.flatten().log() / 4, one_hot)

    def logvar(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM2's uncertainty head ``u(sigma)`` (kept for reference; ayf's objectives do not use it)."""
        if self.logvar_linear is None:
            raise ConfigError("this network was converted without its logvar head")
        return self.logvar_linear(self.logvar_fourier(sigma.log() / 4)).flatten()

    @torch.no_grad()
    def renormalize_(self) -> None:
        """EDM2's forced weight normalisation: every MPConv weight to unit norm per output unit
        (the training tasks call it before each training step)."""
        for m in self.modules():
            if isinstance(m, MPConv):
                m.weight.copy_(mp_normalize(m.weight.float()).to(m.weight.dtype))



def realigned_config(config: dict, t_num_freqs: int, t_max_freq: float) -> dict:
    """A converted network's ``class_path``/``init_args`` config with its time input switched to t
    (teacher realignment, docs/maths.md §11); a network that is not an EDM2Net with the c_noise
    input is a ConfigError."""
    import copy

    config = copy.deepcopy(config)
    backbone = config.get("init_args", {}).get("backbone", {})
    if backbone.get("class_path") != "ayf.nn.edm2.EDM2Net":
        raise ConfigError("realignment needs a teacher whose backbone is ayf.nn.edm2.EDM2Net "
                          f"(a converted EDM2 network), got {backbone.get('class_path')}")
    args = backbone.setdefault("init_args", {})
    if args.get("time_input", "c_noise") != "c_noise":
        raise ConfigError("this teacher is realigned already (time_input: t)")
    args.update(time_input="t", t_num_freqs=int(t_num_freqs), t_max_freq=float(t_max_freq))
    return config
