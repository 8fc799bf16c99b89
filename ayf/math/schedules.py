"""Other models' noise schedules and parametrisations, mapped exactly onto ayf's path
``x_t = (1 - t) x0 + t eps`` (t = 0 data, t = 1 noise; docs/maths.md §1).

Every Gaussian path ``x = a x0 + b eps`` is the ayf point of the same signal-to-noise ratio
``(a / b)^2 = ((1 - t) / t)^2`` scaled by ``a + b``: the noise level ``sigma = b / a`` fixes
``t = sigma / (1 + sigma)`` and ``x_t = x / (a + b)``. This module holds those maps for

* EDM / VE denoisers ``D(x; sigma)`` (``x = x0 + sigma eps``): :func:`edm_point`,
  :func:`denoised_to_velocity`;
* VP models (DDPM / DDIM, diffusers' ``alphas_cumprod``, ``x = sqrt(ab) x0 + sqrt(1 - ab) eps``):
  the beta schedules (:func:`vp_betas`, :func:`rescale_zero_terminal_snr`,
  :func:`vp_alphas_cumprod`), the fractional timestep of an ayf t and back
  (:class:`VPSchedule`), and the three predictions (:func:`vp_x0_eps`, :func:`vp_velocity`);
* flow-matching models in other time conventions (:func:`flow_native_time`,
  :func:`flow_to_velocity`).

Schedules are computed in float64. Functions raise ``ValueError`` on bad arguments.
"""
from __future__ import annotations

import math

import torch

from ayf.math.flow_map import bcast
from ayf.math.path import sigma_to_t, t_to_sigma

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
FLOW_CONVENTIONS = ("data_at_one", "flow_match_euler")


# --------------------------------------------------------------------------------------------
# EDM / VE denoisers
# --------------------------------------------------------------------------------------------


def edm_point(x_t: torch.Tensor, t: torch.Tensor):
    """The EDM point of an ayf point: ``sigma = t / (1 - t)`` and ``x_sigma = x_t / (1 - t)``
    (so that ``x_sigma = x0 + sigma eps``). x_t: ``(B, *D)``, t: ``(B,)`` with t < 1.
    Returns ``(x_sigma (B, *D), sigma (B,))``."""
    return x_t / bcast(1 - t, x_t), t_to_sigma(t)


def denoised_to_velocity(denoised: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ayf velocity from a denoiser output ``D ~ E[x0 | x_t]``: ``v = (x_t - D) / t`` (t > 0),
    since ``eps - x0 = (x_t - x0) / t`` on the path. Shapes: ``(B, *D)``, t ``(B,)``."""
    return (x_t - denoised) / bcast(t, x_t)


# --------------------------------------------------------------------------------------------
# VP schedules (diffusers' DDPMScheduler / EulerDiscreteScheduler conventions)
# --------------------------------------------------------------------------------------------


def cosine_alpha_bar(u: torch.Tensor) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule ``alpha_bar(u) = cos((u + 0.008) / 1.008 * pi / 2)^2``
    on u in [0, 1]."""
    return torch.cos((u + 0.008) / 1.008 * (math.pi / 2)) ** 2


def vp_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 0.0001,
             beta_end: float = 0.02, max_beta: float = 0.999) -> torch.Tensor:
    """The betas ``(N,)`` (float64) of a diffusers beta schedule with ``N = num_train_timesteps``:

    * ``linear``: ``linspace(beta_start, beta_end, N)``;
    * ``scaled_linear``: ``linspace(sqrt(beta_start), sqrt(beta_end), N)^2`` (Stable Diffusion);
    * ``squaredcos_cap_v2``: ``beta_i = min(1 - ab((i + 1) / N) / ab(i / N), max_beta)`` with
      :func:`cosine_alpha_bar` (beta_start and beta_end unused).
    """
    n = int(num_train_timesteps)
    if n < 2 or n != num_train_timesteps:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps}")
    f64 = torch.float64
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=f64)
    elif beta_schedule == "scaled_linear":
        if beta_start < 0 or beta_end < 0:
            raise ValueError(f"scaled_linear needs beta_start, beta_end >= 0, got {beta_start}, {beta_end}")
        betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n, dtype=f64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        u = torch.arange(n + 1, dtype=f64) / n
        ab = cosine_alpha_bar(u)
        betas = (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)
    else:
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")
    if not ((betas > 0) & (betas <= 1)).all():
        raise ValueError(f"beta schedule {beta_schedule!r} has betas outside (0, 1] "
                         f"(beta_start={beta_start}, beta_end={beta_end})")
    return betas


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Alg. 1): with ``s = sqrt(alpha_bar)``, ``s' = (s - s_last) * s_0 / (s_0 - s_last)``,
    so the last ``alpha_bar`` is 0 and the first unchanged; returns the betas of ``s'^2``
    (the last beta is 1). betas: ``(N,)``; computed in float64."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    s = torch.cumprod(1 - betas, 0).sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * (s0 / (s0 - s_last))
    ab = s**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def vp_alphas_cumprod(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                      beta_end: float = 0.02, rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """``alpha_bar_i = prod_{j <= i} (1 - beta_j)``, ``(N,)`` float64, of :func:`vp_betas`
    (optionally rescaled by :func:`rescale_zero_terminal_snr`; then the last one is exactly 0)."""
    betas = vp_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1 - betas, 0)


def vp_alpha_bar_of_t(t: torch.Tensor) -> torch.Tensor:
    """The VP ``alpha_bar`` of the same SNR as ayf's t: ``(1 - t)^2 / ((1 - t)^2 + t^2)``."""
    return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)


def vp_coefficients(t: torch.Tensor):
    """``(sqrt(ab), sqrt(1 - ab), r)`` at ayf's t, with ``r = sqrt((1 - t)^2 + t^2)``,
    ``sqrt(ab) = (1 - t) / r`` and ``sqrt(1 - ab) = t / r``; the VP point is ``x_vp = x_t / r``."""
    r = torch.sqrt((1 - t) ** 2 + t**2)
    return (1 - t) / r, t / r, r


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``np.interp``: piecewise-linear through ``(xp, fp)`` (xp increasing), constant outside."""
    x = torch.minimum(torch.maximum(x, xp[0]), xp[-1])
    hi = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, xp.numel() - 1)
    lo = hi - 1
    w = (x - xp[lo]) / (xp[hi] - xp[lo])
    return fp[lo] + w * (fp[hi] - fp[lo])


class VPSchedule:
    """A discrete VP schedule ``alpha_bar_i`` (i = 0 .. N-1, diffusers' ``alphas_cumprod``) and
    its map to and from ayf's continuous t (float64 throughout).

    The continuous noise level of ayf's t is ``sigma = t / (1 - t)`` (=
    ``sqrt((1 - ab) / ab)`` at :func:`vp_alpha_bar_of_t`). The model's fractional timestep tau is
    found by matching it against the schedule's ``sigma_i = sqrt((1 - alpha_bar_i) / alpha_bar_i)``,
    interpolating linearly in log sigma over the integer timesteps (diffusers'
    EulerDiscreteScheduler rule, ``np.interp(log sigma, log sigma_i, arange(N))``), so
    ``sigma(tau)`` is log-linear between knots and equals ``sigma_i`` at integer i.

    Zero terminal SNR (last ``alpha_bar`` exactly 0, infinite last sigma): the last segment
    ``[N - 2, N - 1]`` is linear in t instead, from ``t_{N-2} = sigma_to_t(sigma_{N-2})`` to t = 1,
    so t = 1 is timestep N - 1 and its alpha_bar is 0. (diffusers' Euler scheduler instead puts
    2^-24 for the last alpha_bar; the two rules differ on that last segment only.)

    Args:
        alphas_cumprod: ``(N,)``, strictly decreasing in (0, 1); only the last may be 0.
    """

    def __init__(self, alphas_cumprod):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ab.ndim != 1 or ab.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-d schedule of >= 2 values, got shape {tuple(ab.shape)}")
        if not (((ab[:-1] > 0) & (ab[:-1] < 1)).all() and 0 <= ab[-1] < 1):
            raise ValueError("alphas_cumprod must lie in (0, 1); only the last may be 0")
        if not (ab[1:] < ab[:-1]).all():
            raise ValueError("alphas_cumprod must decrease strictly")
        self.alphas_cumprod = ab
        self.num_train_timesteps = ab.numel()
        self.zero_snr = bool(ab[-1] == 0)
        finite = ab[:-1] if self.zero_snr else ab
        self.log_sigmas = 0.5 * (torch.log1p(-finite) - torch.log(finite))  # (M,): log sqrt((1 - ab) / ab)
        self._steps = torch.arange(self.log_sigmas.numel(), dtype=torch.float64)
        self._t_last = torch.sigmoid(self.log_sigmas[-1])  # t of the largest finite sigma

    @property
    def device(self) -> torch.device:
        return self.log_sigmas.device

    def to(self, device) -> "VPSchedule":
        """The same schedule with its tensors on ``device``."""
        out = VPSchedule.__new__(VPSchedule)
        out.__dict__.update({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})
        return out

    def t_range(self, finite: bool = False):
        """``(t_min, t_max)`` of the schedule as floats: ``sigma_to_t`` of its smallest and largest
        sigma; with zero terminal SNR ``t_max = 1``, or, with ``finite``, the t of the largest
        finite sigma (timestep N - 2)."""
        t_min = float(sigma_to_t(self.log_sigmas[0].exp()))
        if self.zero_snr and not finite:
            return t_min, 1.0
        return t_min, float(self._t_last)

    def timestep_of_t(self, t: torch.Tensor) -> torch.Tensor:
        """The fractional timestep tau in [0, N - 1] of ayf's t (any shape; float64). t below or
        above the schedule's range clamps to 0 or N - 1."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.device)
        m = self.log_sigmas.numel()
        log_sigma = torch.log(t) - torch.log1p(-t)  # -inf at t = 0, +inf at t = 1
        tau = _interp(log_sigma, self.log_sigmas, self._steps)
        if self.zero_snr:
            tail = (m - 1) + (t - self._t_last) / (1 - self._t_last)
            tau = torch.where(t > self._t_last, tail.clamp(max=m), tau)
        return tau

    def t_of_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`timestep_of_t` on [0, N - 1] (tau clamped there):
        ``t = sigmoid(log sigma(tau))``, or linear in tau on the zero-SNR last segment."""
        tau = torch.as_tensor(timestep, dtype=torch.float64, device=self.device)
        m = self.log_sigmas.numel()
        t = torch.sigmoid(_interp(tau, self._steps, self.log_sigmas))
        if self.zero_snr:
            frac = (tau - (m - 1)).clamp(0, 1)
            t = torch.where(tau > m - 1, self._t_last + frac * (1 - self._t_last), t)
        return t

    def alpha_bar_of_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """``alpha_bar(tau) = 1 / (1 + sigma(tau)^2)`` (float64): ``alpha_bar_i`` at integer i,
        log sigma linear in between; on the zero-SNR last segment, :func:`vp_alpha_bar_of_t` of
        :meth:`t_of_timestep` (0 at N - 1)."""
        tau = torch.as_tensor(timestep, dtype=torch.float64, device=self.device)
        ab = torch.sigmoid(-2 * _interp(tau, self._steps, self.log_sigmas))
        if self.zero_snr:
            tail = vp_alpha_bar_of_t(self.t_of_timestep(tau))
            ab = torch.where(tau > self.log_sigmas.numel() - 1, tail, ab)
        return ab


def vp_x0_eps(out: torch.Tensor, x_vp: torch.Tensor, sqrt_ab: torch.Tensor, sqrt_1mab: torch.Tensor,
              prediction: str):
    """``(x0_hat, eps_hat)`` from a VP model's output at ``x_vp = sqrt(ab) x0 + sqrt(1 - ab) eps``:

    * ``epsilon``: ``eps = out``, ``x0 = (x_vp - sqrt(1 - ab) eps) / sqrt(ab)`` (needs ab > 0);
    * ``v_prediction`` (``v = sqrt(ab) eps - sqrt(1 - ab) x0``):
      ``x0 = sqrt(ab) x_vp - sqrt(1 - ab) v``, ``eps = sqrt(1 - ab) x_vp + sqrt(ab) v``;
    * ``sample``: ``x0 = out``, ``eps = (x_vp - sqrt(ab) x0) / sqrt(1 - ab)`` (needs ab < 1).

    out, x_vp: ``(B, *D)``; sqrt_ab, sqrt_1mab: ``(B,)``.
    """
    a, b = bcast(sqrt_ab, x_vp), bcast(sqrt_1mab, x_vp)
    if prediction == "epsilon":
        return (x_vp - b * out) / a, out
    if prediction == "v_prediction":
        return a * x_vp - b * out, b * x_vp + a * out
    if prediction == "sample":
        return out, (x_vp - a * out) / b
    raise ValueError(f"unsupported prediction {prediction!r}; supported: {', '.join(PREDICTIONS)}")


def vp_velocity(out: torch.Tensor, x_vp: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
    """ayf velocity ``v = eps_hat - x0_hat`` from a VP model's output at ``x_vp = x_t / r``
    (:func:`vp_coefficients`), with the alpha_bar of the continuous t (:func:`vp_x0_eps`).
    Shapes: ``(B, *D)``, t ``(B,)``."""
    sqrt_ab, sqrt_1mab, _ = vp_coefficients(t)
    x0, eps = vp_x0_eps(out, x_vp, sqrt_ab, sqrt_1mab, prediction)
    return eps - x0


# --------------------------------------------------------------------------------------------
# flow matching in other conventions
# --------------------------------------------------------------------------------------------


def _check_convention(convention: str):
    if convention not in FLOW_CONVENTIONS:
        raise ValueError(f"unsupported flow convention {convention!r}; supported: {', '.join(FLOW_CONVENTIONS)}")


def flow_native_time(t: torch.Tensor, convention: str, scale: float = 1.0) -> torch.Tensor:
    """The model's time of ayf's t: ``scale * (1 - t)`` for ``data_at_one`` (t = 1 data),
    ``scale * t`` for ``flow_match_euler`` (diffusers' sigma; SD3 calls its transformer with
    ``timestep = 1000 sigma``)."""
    _check_convention(convention)
    return scale * (1 - t) if convention == "data_at_one" else scale * t


def flow_to_velocity(out: torch.Tensor, convention: str) -> torch.Tensor:
    """ayf velocity from the model's: ``-u`` for ``data_at_one`` (``u = dx/ds``, s = 1 - t, points
    toward data), ``out`` for ``flow_match_euler`` (``x = (1 - sigma) x0 + sigma noise``, the
    model predicts ``noise - x0``)."""
    _check_convention(convention)
    return -out if convention == "data_at_one" else out
