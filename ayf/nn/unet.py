"""A magnitude-preserving image U-Net in the style of EDM2 (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", section 3 and Fig. 21).

Every layer keeps activations at unit magnitude in expectation: weights are normalised per output
unit on the fly (``MPConv``), SiLU is rescaled to unit variance, residual sums and skip
concatenations are variance-preserving blends, attention uses cosine similarity (q, k, v
normalised per head), and there are no normalisation layers with running statistics and no
biases. The conditioning vector (time, s, class label and guidance embeddings built by
:class:`ayf.nn.FlowMap`) modulates each block multiplicatively.

The forward pass is written for ``torch.func.jvp``: every operation has a forward-mode rule.
Attention calls ``scaled_dot_product_attention``; ``ayf.math.tangents`` runs the JVP under the
math kernel, so fused kernels without forward-mode rules are used only outside it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def mp_normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scale ``x`` to unit RMS over ``dim`` (default: all but the first axis)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # norms of half floats in float32
    norm = torch.linalg.vector_norm(wide, dim=dim, keepdim=True).to(x.dtype)
    numel = 1
    for d in [dim] if isinstance(dim, int) else dim:  # a plain loop: torch.compile traces it
        numel *= x.shape[d]
    return x / (eps + norm / math.sqrt(numel))


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its RMS under a unit Gaussian (0.596), so the output has unit magnitude."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Blend ``(1 - t) a + t b`` rescaled to keep unit variance for independent inputs.

    Under autocast one input can be bfloat16 and the other float32; lerp takes one dtype, so both
    go to the wider one.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype).lerp(b.to(dtype), t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Concatenate channels with weights (1 - t) : t, preserving the overall magnitude."""
    na, nb = a.shape[1], b.shape[1]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], dim=1)


class MPConv(nn.Module):
    """Convolution (``kernel`` (k, k)) or linear layer (``kernel`` ()) with unit-norm weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        w = mp_normalize(self.weight) * (gain / math.sqrt(self.weight[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class UNetBlock(nn.Module):
    """Residual block: [resample] -> (enc: skip conv, pixel norm) -> conv -> modulate -> conv,
    blended with the input; optional self-attention."""

    def __init__(self, cin, cout, emb_dim, flavor, resample=None, attention=False, channels_per_head=64,
                 dropout=0.0, res_balance=0.3, attn_balance=0.3, clip_act=256.0, at_least_one_head=True):
        super().__init__()
        self.flavor, self.resample, self.out_channels = flavor, resample, cout
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        heads = cout // channels_per_head
        self.num_heads = (max(1, heads) if at_least_one_head else heads) if attention else 0
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, (3, 3))
        self.emb_linear = MPConv(emb_dim, cout, ())
        self.conv_res1 = MPConv(cout, cout, (3, 3))
        self.conv_skip = MPConv(cin, cout, (1, 1)) if cin != cout else None
        self.dropout = nn.Dropout(dropout)
        if self.num_heads:
            self.attn_qkv = MPConv(cout, 3 * cout, (1, 1))
            self.attn_proj = MPConv(cout, cout, (1, 1))

    def forward(self, x, emb):
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = mp_normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = self.dropout(mp_silu(y * c[:, :, None, None].to(y.dtype)))
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            b, c, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(b, self.num_heads, c // self.num_heads, 3, h * w)
            q, k, v = mp_normalize(qkv, dim=2).unbind(3)  # cosine attention
            y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            y = self.attn_proj(y.transpose(-1, -2).reshape(b, c, h, w))
            x = mp_sum(x, y, self.attn_balance)
        if self.clip_act:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class UNet(nn.Module):
    """EDM2-style magnitude-preserving U-Net for square images.

    The class label enters through the conditioning vector (FlowMap's ``num_classes``), so one
    U-Net serves conditional and unconditional models.

    Args:
        img_channels: image channels C.
        img_resolution: image height and width (divisible by 2^(levels - 1)).
        channels: channels at the first level.
        channel_mult: channel multiplier per level (its length is the number of levels).
        num_blocks: residual blocks per level in the encoder (decoder: one more).
        attn_resolutions: resolutions with self-attention (the lowest level always has one).
        channels_per_head: attention channels per head.
        emb_dim: size of the conditioning vector that FlowMap builds.
        dropout: dropout inside the residual blocks.
        concat_balance: weight of the skip connection in the decoder's concatenation.
    """

    def __init__(
        self,
        img_channels: int,
        img_resolution: int,
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        channels_per_head: int = 64,
        emb_dim: int = 256,
        dropout: float = 0.0,
        concat_balance: float = 0.5,
    ):
        super().__init__()
        levels = len(channel_mult)
        if img_channels < 1 or channels < 1 or num_blocks < 1 or levels < 1:
            raise ValueError("UNet sizes (img_channels, channels, num_blocks, channel_mult) must be positive")
        if img_resolution % (2 ** (levels - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{levels - 1} ({levels} levels)")
        self.data_shape = (img_channels, img_resolution, img_resolution)
        self.emb_dim = emb_dim
        self.concat_balance = concat_balance
        kw = dict(emb_dim=emb_dim, channels_per_head=channels_per_head, dropout=dropout)
        self.emb_in = MPConv(emb_dim, emb_dim, ())
        self.enc, self.dec, cout = unet_levels(img_channels, img_resolution, [channels * m for m in channel_mult],
                                               num_blocks, attn_resolutions, kw, lambda res, part: f"{res}_{part}")
        self.out_conv = MPConv(cout, img_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond=None) -> torch.Tensor:
        emb = mp_silu(self.emb_in(mp_normalize(emb, dim=1)))
        return self.out_conv(run_unet(self.enc, self.dec, x, emb, self.concat_balance), gain=self.out_gain)


def unet_levels(img_channels: int, img_resolution: int, level_channels: Sequence[int], num_blocks: int,
                attn_resolutions: Sequence[int], block_kw: dict, key):
    """The encoder and decoder of EDM2's U-Net layout (Karras et al. 2024, Fig. 21): per level
    ``num_blocks`` encoder blocks after a stem conv (level 0) or a downsampling block, two
    attention-and-plain blocks at the bottom, and per level an upsampling block (not at the
    bottom) and ``num_blocks + 1`` decoder blocks fed by the skips. ``key(res, part)`` names the
    modules. Returns ``(enc, dec, out_channels)``."""
    enc = nn.ModuleDict()
    cout = img_channels + 1  # a constant channel lets the first conv see the image border
    for level, channels in enumerate(level_channels):
        res = img_resolution >> level
        if level == 0:
            cin, cout = cout, channels
            enc[key(res, "conv")] = MPConv(cin, cout, (3, 3))
        else:
            enc[key(res, "down")] = UNetBlock(cout, cout, flavor="enc", resample="down", **block_kw)
        for i in range(num_blocks):
            cin, cout = cout, channels
            enc[key(res, f"block{i}")] = UNetBlock(cin, cout, flavor="enc", attention=res in attn_resolutions, **block_kw)
    skips = [m.out_channels for m in enc.values()]
    dec = nn.ModuleDict()
    for level, channels in reversed(list(enumerate(level_channels))):
        res = img_resolution >> level
        if level == len(level_channels) - 1:
            dec[key(res, "in0")] = UNetBlock(cout, cout, flavor="dec", attention=True, **block_kw)
            dec[key(res, "in1")] = UNetBlock(cout, cout, flavor="dec", **block_kw)
        else:
            dec[key(res, "up")] = UNetBlock(cout, cout, flavor="dec", resample="up", **block_kw)
        for i in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), channels
            dec[key(res, f"block{i}")] = UNetBlock(cin, cout, flavor="dec", attention=res in attn_resolutions, **block_kw)
    return enc, dec, cout


def run_unet(enc: nn.ModuleDict, dec: nn.ModuleDict, x: torch.Tensor, emb: torch.Tensor, concat_balance: float):
    """Runs :func:`unet_levels`' modules on ``x`` (B, C, H, W) with the block conditioning ``emb``."""
    h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for name, block in enc.items():
        h = block(h) if name.endswith("_conv") else block(h, emb)
        skips.append(h)
    for name, block in dec.items():
        if "_block" in name:
            h = mp_cat(h, skips.pop(), t=concat_balance)
        h = block(h, emb)
    return h
