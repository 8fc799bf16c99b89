"""Exact teacher adapters: foreign diffusion and flow models as ayf teachers ``v(x_t, t, cond)``
in ayf's convention (t = 0 data, t = 1 noise, ``v = E[eps - x0 | x_t]``; docs/maths.md §1).

Each adapter wraps a callable ``model(x, time, cond)`` where ``time`` is the model's native time
``(B,)`` (sigma for EDM; the fractional discrete timestep for VP; its own t for flows) and
``cond`` is the ayf :class:`ayf.nn.cond.Cond`, passed unchanged (None becomes
:data:`ayf.nn.cond.NO_COND`). The maths is in
:mod:`ayf.math.schedules`; with the exact model of its kind, each adapter returns the exact
velocity.

Valid t range: every adapter has ``t_range = (t_min, t_max)``, the ayf times at which its model is
defined. Outside it, ``out_of_range="clamp"`` (default) evaluates the model at the nearest valid
t, i.e. returns ``v(x_t, clamp(t, t_min, t_max))`` for the given x_t unchanged;
``out_of_range="data_mean"`` does the same below ``t_min`` and above ``t_max`` follows the ODE's
high-noise limit, where the denoised estimate is the data mean ``m``: ``v = (x_t - m) / t``, which
carries ``x_1`` to ``m + t_max (x_1 - m)`` exactly (docs/maths.md §10); ``out_of_range="error"``
raises :class:`ayf.errors.ConfigError`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ayf.errors import ConfigError
from ayf.math.flow_map import bcast
from ayf.math.path import sigma_to_t
from ayf.math.schedules import (
    BETA_SCHEDULES,
    FLOW_CONVENTIONS,
    PREDICTIONS,
    VPSchedule,
    denoised_to_velocity,
    edm_point,
    flow_native_time,
    flow_to_velocity,
    vp_alphas_cumprod,
    vp_coefficients,
    vp_velocity,
)
from ayf.nn.cond import NO_COND, Cond
from ayf.nn.teachers import Teacher

OUT_OF_RANGE = ("clamp", "data_mean", "error")
#: the rules of a network (EDM2, a diffusers backbone) that clamps its own time input; it may be a
#: student, whose output above t_max must stay its own, so the teacher-only data_mean is not one
NETWORK_OUT_OF_RANGE = ("clamp", "error")


class AdapterTeacher(Teacher):
    """Base class of the adapters: holds the wrapped model and applies the valid t range.

    Subclasses implement ``velocity(x, t, cond)`` for t inside ``t_range``; ``forward`` first
    clamps t into ``t_range`` (``out_of_range="clamp"``: the model is evaluated at the nearest
    valid t) or raises a ConfigError for a t outside it (``"error"``). A wrapped ``nn.Module`` is
    frozen (no gradients, eval mode).

    Args:
        model: the foreign model, ``model(x, time, cond) -> output``.
        t_range: ``(t_min, t_max)`` with ``0 <= t_min < t_max <= 1``.
        out_of_range: ``"clamp"``, ``"data_mean"`` (above ``t_max``, the data mean as the denoised
            estimate) or ``"error"``.
        data_shape: shape of one example (None: read from the data module, if it has one).
        num_classes: class labels the model knows (0: unconditional).
        unconditional: whether it also knows the null label (classifier-free guidance).
        data_mean: the data mean ``m`` of ``out_of_range="data_mean"`` (a scalar).
        needs_grad: the model computes its output with autograd (a score model, ``D = x + sigma^2
            grad log p``): it is then called with gradients enabled, and its output detached.
    """

    def __init__(self, model, t_range: Sequence[float], out_of_range: str = "clamp",
                 data_shape: Optional[Sequence[int]] = None, num_classes: int = 0, unconditional: bool = False,
                 data_mean: float = 0.0, needs_grad: bool = False):
        super().__init__()
        if not callable(model):
            raise ConfigError(f"{type(self).__name__} needs a callable model(x, time, cond), got {type(model).__name__}")
        if out_of_range not in OUT_OF_RANGE:
            raise ConfigError(f"out_of_range must be one of {', '.join(OUT_OF_RANGE)}, got {out_of_range!r}")
        lo, hi = (float(v) for v in t_range)
        if not 0 <= lo < hi <= 1:
            raise ConfigError(f"{type(self).__name__}: t_range must satisfy 0 <= t_min < t_max <= 1, got ({lo}, {hi})")
        if isinstance(model, torch.nn.Module):
            model = model.requires_grad_(False).eval()
        self.model = model
        self.t_range = (lo, hi)
        self.out_of_range = out_of_range
        self.data_shape = None if data_shape is None else tuple(int(d) for d in data_shape)
        self.num_classes = int(num_classes)
        self.unconditional = self.num_classes == 0 or bool(unconditional)
        self.data_mean, self.needs_grad = float(data_mean), bool(needs_grad)
        self.train(False)

    def bind_data(self, datamodule) -> None:
        if self.data_shape is None and getattr(datamodule, "data_shape", None) is not None:
            self.data_shape = tuple(datamodule.data_shape)

    def valid_t(self, t: torch.Tensor) -> torch.Tensor:
        """t clamped into ``t_range``, or a ConfigError for t outside it under ``"error"``."""
        lo, hi = self.t_range
        if self.out_of_range == "error":
            bad = (t < lo) | (t > hi) | torch.isnan(t)
            if bool(bad.any()):
                value = float(t[bad].flatten()[0])
                raise ConfigError(f"{type(self).__name__}: t = {value:.6g} lies outside its valid range "
                                  f"[{lo:.6g}, {hi:.6g}] (out_of_range='error'; 'clamp' evaluates at the nearest valid t)")
            return t
        return t.clamp(lo, hi)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[Cond] = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if not t.is_floating_point():
            t = t.to(x.dtype)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        cond = NO_COND if cond is None else cond
        if self.needs_grad:  # the model differentiates itself: autograd on, whatever the caller's mode
            with torch.inference_mode(False), torch.enable_grad():  # (ayf test and validate run in inference mode)
                v = self.velocity(x.clone(), self.valid_t(t).clone(), cond).detach()
        else:
            v = self.velocity(x, self.valid_t(t), cond)
        if self.out_of_range == "data_mean":
            above = bcast(t > self.t_range[1], x)
            v = torch.where(above, (x - self.data_mean) / bcast(t, x), v)
        return v

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def reads(self) -> str:
        """What the adapter converts (its convention and schedule)."""
        return type(self).__name__

    def describe(self) -> list:
        lo, hi = self.t_range
        rule = f"data_mean (m = {self.data_mean:g})" if self.out_of_range == "data_mean" else self.out_of_range
        model = f"; model: {type(self.model).__name__}" if isinstance(self.model, torch.nn.Module) else ""
        return [f"{self.reads()}; valid t in [{lo:.6g}, {hi:.6g}], outside it {rule}; "
                f"{'unconditional' if not self.num_classes else f'{self.num_classes} classes'}{model}"
                + (" (autograd on: needs_grad)" if self.needs_grad else "")]


class DenoiserTeacher(AdapterTeacher):
    """An EDM / VE denoiser ``D(x; sigma) ~ E[x0 | x0 + sigma eps = x]`` (EDM, EDM2, k-diffusion).

    ``sigma = t / (1 - t)``, ``x_sigma = x_t / (1 - t)``, ``v = (x_t - D(x_sigma; sigma)) / t``.
    The model is called as ``model(x_sigma, sigma, cond)``. Valid range: sigma in
    ``[sigma_min, sigma_max]``, i.e. ``t_range = (sigma_min / (1 + sigma_min),
    sigma_max / (1 + sigma_max))``; outside it see ``out_of_range`` (:class:`AdapterTeacher`).

    Args:
        model: the denoiser ``model(x, sigma, cond) -> D``.
        sigma_min, sigma_max: the sigmas the model was trained on (EDM: 0.002 and 80).
        out_of_range, data_shape, num_classes, unconditional, data_mean, needs_grad: see :class:`AdapterTeacher`.
    """

    def __init__(self, model, sigma_min: float = 0.002, sigma_max: float = 80.0, out_of_range: str = "clamp",
                 data_shape: Optional[Sequence[int]] = None, num_classes: int = 0, unconditional: bool = False,
                 data_mean: float = 0.0, needs_grad: bool = False):
        if not 0 < sigma_min < sigma_max < float("inf"):
            raise ConfigError(f"DenoiserTeacher needs 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        t_range = (sigma_to_t(float(sigma_min)), sigma_to_t(float(sigma_max)))
        super().__init__(model, t_range, out_of_range, data_shape, num_classes, unconditional, data_mean, needs_grad)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def reads(self) -> str:
        return f"an EDM denoiser D(x; sigma), sigma in [{self.sigma_min:g}, {self.sigma_max:g}] (DenoiserTeacher)"

    def velocity(self, x, t, cond):
        x_sigma, sigma = edm_point(x, t)
        return denoised_to_velocity(self.model(x_sigma, sigma, cond), x, t)


class VPTeacher(AdapterTeacher):
    """A VP diffusion model (DDPM / DDIM, diffusers' ``alphas_cumprod`` schedules) predicting
    epsilon, v or x0 at its discrete timesteps.

    The ayf point ``(x_t, t)`` is the VP point of the same SNR: ``alpha_bar(t) = (1 - t)^2 /
    ((1 - t)^2 + t^2)`` and ``x_vp = x_t / sqrt((1 - t)^2 + t^2)``. The model is called as
    ``model(x_vp, timestep, cond)`` with the fractional timestep whose schedule sigma is
    ``t / (1 - t)``, log-linearly interpolated between integer timesteps
    (:class:`ayf.math.schedules.VPSchedule`). Its prediction gives ``x0_hat`` and ``eps_hat``
    with the continuous alpha_bar(t) (:func:`ayf.math.schedules.vp_x0_eps`) and
    ``v = eps_hat - x0_hat``.

    Argument names follow diffusers' scheduler config keys (see :meth:`from_scheduler_config`).

    Valid range: ``t_range`` runs from the t of the schedule's smallest sigma (timestep 0) to
    that of its largest (timestep N - 1). With zero terminal SNR (``rescale_betas_zero_snr``)
    the last sigma is infinite: timestep N - 1 is t = 1 (the last segment is linear in t), and
    ``t_max = 1`` for ``v_prediction`` and ``sample``. An ``epsilon`` model carries no
    information about x0 at alpha_bar = 0 (there ``x0 = (x - eps) / 0``), so for it ``t_max`` is
    the t of the largest finite sigma (timestep N - 2): ``clamp`` evaluates it there for larger t,
    ``error`` refuses them.

    Args:
        model: ``model(x_vp, timestep, cond) -> prediction``; timestep ``(B,)`` float, in [0, N - 1].
        prediction: ``epsilon``, ``v_prediction`` (``v = sqrt(ab) eps - sqrt(1 - ab) x0``) or
            ``sample`` (x0).
        beta_schedule: ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``.
        num_train_timesteps, beta_start, beta_end: the schedule's N and beta range.
        rescale_betas_zero_snr: rescale to zero terminal SNR (Lin et al. 2024, Alg. 1).
        out_of_range, data_shape, num_classes, unconditional, data_mean, needs_grad: see :class:`AdapterTeacher`.
    """

    def __init__(self, model, prediction: str = "epsilon", beta_schedule: str = "linear",
                 num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 rescale_betas_zero_snr: bool = False, out_of_range: str = "clamp",
                 data_shape: Optional[Sequence[int]] = None, num_classes: int = 0, unconditional: bool = False,
                 data_mean: float = 0.0, needs_grad: bool = False):
        if prediction not in PREDICTIONS:
            raise ConfigError(f"VPTeacher: unsupported prediction {prediction!r}; supported: {', '.join(PREDICTIONS)}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"VPTeacher: unsupported beta_schedule {beta_schedule!r}; "
                              f"supported: {', '.join(BETA_SCHEDULES)}")
        try:
            schedule = VPSchedule(vp_alphas_cumprod(beta_schedule, num_train_timesteps, beta_start, beta_end,
                                                    bool(rescale_betas_zero_snr)))
        except ValueError as err:
            raise ConfigError(f"VPTeacher: {err}") from None
        t_range = schedule.t_range(finite=prediction == "epsilon")
        super().__init__(model, t_range, out_of_range, data_shape, num_classes, unconditional, data_mean, needs_grad)
        self.prediction = prediction
        self.schedule = schedule
        self._schedules = {schedule.device: schedule}
        self.schedule_name = f"{beta_schedule}, {num_train_timesteps} steps" + (", zero terminal SNR"
                                                                                if rescale_betas_zero_snr else "")

    def reads(self) -> str:
        return f"a VP model predicting {self.prediction}, {self.schedule_name} (VPTeacher)"

    @classmethod
    def from_scheduler_config(cls, model, config: dict, **kw) -> "VPTeacher":
        """From a diffusers scheduler config (e.g. ``scheduler_config.json`` of a DDPM, DDIM or
        Euler scheduler): reads ``prediction_type``, ``beta_schedule``, ``num_train_timesteps``,
        ``beta_start``, ``beta_end`` and ``rescale_betas_zero_snr``, ignores keys that only
        concern sampling (``timestep_spacing``, ``clip_sample``, ...). ``kw`` (VPTeacher's own
        arguments) override the config. Raises ConfigError for ``trained_betas``, for an
        unsupported ``beta_schedule`` or ``prediction_type``, for continuous timesteps, and for a
        flow-matching or EDM scheduler."""
        config = dict(config)
        kind = str(config.get("_class_name", ""))
        if kind.startswith("FlowMatch"):
            raise ConfigError(f"{kind} is a flow-matching scheduler: use FlowTeacher(convention='flow_match_euler')")
        if kind.startswith("EDM") or kind.startswith("CMStochastic"):
            raise ConfigError(f"{kind} is an EDM scheduler: use DenoiserTeacher")
        if config.get("trained_betas") is not None:
            raise ConfigError("VPTeacher does not support trained_betas; supported beta_schedule: "
                              f"{', '.join(BETA_SCHEDULES)}")
        if config.get("timestep_type", "discrete") != "discrete":
            raise ConfigError(f"VPTeacher supports discrete timesteps only, got timestep_type "
                              f"{config['timestep_type']!r}")
        if "prediction_type" in config:
            config["prediction"] = config.pop("prediction_type")
        keys = ("prediction", "beta_schedule", "num_train_timesteps", "beta_start", "beta_end", "rescale_betas_zero_snr")
        args = {k: config[k] for k in keys if k in config}
        args.update(kw)
        return cls(model, **args)

    def _schedule_on(self, device) -> VPSchedule:
        device = torch.device(device)
        if device not in self._schedules:
            self._schedules[device] = self.schedule.to(device)
        return self._schedules[device]

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The schedule's ``alpha_bar_i``, ``(N,)`` float64."""
        return self.schedule.alphas_cumprod

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The model's fractional timestep of ayf's t (float64; no range check)."""
        return self._schedule_on(torch.as_tensor(t).device).timestep_of_t(t)

    def velocity(self, x, t, cond):
        timestep = self.timestep(t).to(t.dtype)
        _, _, r = vp_coefficients(t)
        x_vp = x / bcast(r, x)
        return vp_velocity(self.model(x_vp, timestep, cond), x_vp, t, self.prediction)


class FlowTeacher(AdapterTeacher):
    """A flow-matching model in another time convention.

    * ``data_at_one``: t = 1 is data and the model's velocity ``u = dx/ds`` points toward data;
      ``v(x, t) = -u(x, s)`` at ``s = timestep_scale * (1 - t)``.
    * ``flow_match_euler``: diffusers' FlowMatchEulerDiscreteScheduler form (SD3, FLUX): t = sigma,
      ``x = (1 - sigma) x0 + sigma noise``, the model predicts ``noise - x0`` and is called with
      ``timestep = timestep_scale * sigma`` (SD3's transformer: 1000 sigma; FLUX's pipeline
      divides by 1000 again: scale 1); ``v(x, t) = model(x, timestep_scale * t)``. A scheduler
      ``shift`` changes only the sampling grid, not this map.

    Args:
        model: ``model(x, time, cond) -> velocity`` in its own convention.
        convention: ``data_at_one`` or ``flow_match_euler``.
        timestep_scale: multiplies the model's time (default: 1000 for ``flow_match_euler``,
            1 for ``data_at_one``).
        t_range: the valid range in ayf's t (default the whole [0, 1]).
        out_of_range, data_shape, num_classes, unconditional, data_mean, needs_grad: see :class:`AdapterTeacher`.
    """

    def __init__(self, model, convention: str = "data_at_one", timestep_scale: Optional[float] = None,
                 t_range: Sequence[float] = (0.0, 1.0), out_of_range: str = "clamp",
                 data_shape: Optional[Sequence[int]] = None, num_classes: int = 0, unconditional: bool = False,
                 data_mean: float = 0.0, needs_grad: bool = False):
        if convention not in FLOW_CONVENTIONS:
            raise ConfigError(f"FlowTeacher: unsupported convention {convention!r}; "
                              f"supported: {', '.join(FLOW_CONVENTIONS)}")
        super().__init__(model, t_range, out_of_range, data_shape, num_classes, unconditional, data_mean, needs_grad)
        self.convention = convention
        if timestep_scale is None:
            timestep_scale = 1000.0 if convention == "flow_match_euler" else 1.0
        self.timestep_scale = float(timestep_scale)

    def reads(self) -> str:
        return f"a flow model, convention {self.convention}, timestep scale {self.timestep_scale:g} (FlowTeacher)"

    def velocity(self, x, t, cond):
        time = flow_native_time(t, self.convention, self.timestep_scale)
        return flow_to_velocity(self.model(x, time, cond), self.convention)
