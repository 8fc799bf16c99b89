"""AYF-EMD and AYF-LMD tangents (docs/maths.md §3 and §4), by forward-mode differentiation or
by a finite difference.

``F_fn(x, t, s, cond) -> F`` is the student's average velocity; ``cond`` (class label, guidance
scale) is held fixed: the derivative is taken in x, t and s only. It runs in the dtype of its
inputs (in float32 inside autocast with ``float32``); tests run in float64.

The derivative is taken without an autograd graph (theta- = stopgrad(theta)); when grad is enabled
the trainable prediction ``F`` comes from an ordinary forward pass (which the JVP runs beside its
own primal, and which a finite difference reuses as its base point).

``method`` chooses the derivative (:data:`TANGENT_METHODS`): ``jvp`` (exact, ``torch.func.jvp``),
``forward`` (``(F(p + h d) - F(p)) / h``, error O(h), one extra forward pass) or ``central``
(``(F(p + h d) - F(p - h d)) / 2h``, error O(h^2), two). A difference is a plain forward pass:
it runs through fused attention kernels and sharded models, which forward-mode AD does not.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

from ayf.math.flow_map import bcast

FFn = Callable[..., torch.Tensor]
#: how the tangent's derivative is computed
TANGENT_METHODS = ("jvp", "forward", "central")
#: each difference's default step: in float32 the truncation error (h^2 central, h forward) meets
#: the rounding error (~ eps / h) near these, measured on trained and random networks
#: (docs/results/tangent.md, "The step")
DIFFERENCE_STEPS = {"central": 3e-4, "forward": 1e-4}


def jvp_average_velocity(F_fn: FFn, x, t, s, dx, dt, ds, cond=None, float32: bool = False):
    """``F-, dF = jvp(F_fn(., ., ., cond), (x, t, s), (dx, dt, ds))``, both detached.

    x, dx: ``(B, *D)``; t, s, dt, ds: ``(B,)``. Attention
    (``scaled_dot_product_attention``) runs on its math kernel here: fused kernels lack
    forward-mode rules. ``float32``: inside an autocast region (bf16 / fp16 mixed precision), run
    the JVP with autocast off and float32 inputs, since the tangent is where low precision costs
    accuracy (outside autocast it changes nothing).
    """
    ctx = contextlib.nullcontext()
    if float32 and torch.is_autocast_enabled(x.device.type):
        ctx = torch.autocast(x.device.type, enabled=False)
        x, t, s, dx, dt, ds = (a.float() for a in (x, t, s, dx, dt, ds))
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), ctx:
        F, dF = jvp(lambda a, b, c: F_fn(a, b, c, cond), (x, t, s), (dx, dt, ds))
    return F.detach(), dF.detach()


def difference_average_velocity(F_fn: FFn, x, t, s, dx, dt, ds, cond=None, central: bool = True,
                                step: Optional[float] = None, float32: bool = False, primal=None):
    """``F-, dF``: the derivative of ``F_fn(., ., ., cond)`` at ``(x, t, s)`` along ``(dx, dt, ds)``
    by a finite difference of step ``step`` (None: :data:`DIFFERENCE_STEPS`), without grad, both
    detached.

    central: ``(F(p + h d) - F(p - h d)) / 2h``; otherwise ``(F(p + h d) - F(p)) / h``, whose base
    point ``F(p)`` is ``primal`` when given (the trainable forward pass, detached). ``float32``: as
    for :func:`jvp_average_velocity` (inside autocast the differences run in float32, autocast off;
    a difference of low-precision outputs would be mostly rounding)."""
    ctx = contextlib.nullcontext()
    if float32 and torch.is_autocast_enabled(x.device.type):
        ctx = torch.autocast(x.device.type, enabled=False)
        x, t, s, dx, dt, ds = (a.float() for a in (x, t, s, dx, dt, ds))
        primal = None  # computed under autocast: not the float32 base point
    h = float(step if step is not None else DIFFERENCE_STEPS["central" if central else "forward"])
    with torch.no_grad(), ctx:
        def at(sign):
            return F_fn(x + (sign * h) * dx, t + (sign * h) * dt, s + (sign * h) * ds, cond)

        base = primal.detach().to(x.dtype) if primal is not None else None
        if central:
            dF = (at(1.0) - at(-1.0)) / (2 * h)
            base = F_fn(x, t, s, cond) if base is None else base
        else:
            base = F_fn(x, t, s, cond) if base is None else base
            dF = (at(1.0) - base) / h
    return base.detach(), dF.detach()


def _jvp_and_prediction(F_fn, x, t, s, dx, dt, ds, cond, jvp_float32, method: str = "jvp",
                        step: Optional[float] = None):
    """``(F with graph, F-, dF)``: the derivative (``method``), and the trainable prediction from
    an ordinary forward pass (the JVP's own primal when grad is off; a difference's base point)."""
    if method not in TANGENT_METHODS:
        raise ValueError(f"unknown tangent method {method!r}; choose one of {', '.join(TANGENT_METHODS)}")
    # named ranges for torch.profiler (and Lightning's profilers): what a step spends where
    if method == "jvp":
        with record_function("ayf.tangent"):
            F_minus, dF = jvp_average_velocity(F_fn, x, t, s, dx, dt, ds, cond, float32=jvp_float32)
        with record_function("ayf.student_forward"):
            F = F_fn(x, t, s, cond) if torch.is_grad_enabled() else F_minus
        return F, F_minus, dF
    with record_function("ayf.student_forward"):
        F = F_fn(x, t, s, cond)
    with record_function("ayf.tangent"):
        F_minus, dF = difference_average_velocity(F_fn, x, t, s, dx, dt, ds, cond, central=method == "central",
                                                  step=step, float32=jvp_float32, primal=F)
    return F, F_minus, dF


def emd_tangent(F_fn: FFn, x_t, t, s, v, r: float = 1.0, cond=None, jvp_float32: bool = False,
                method: str = "jvp", step: Optional[float] = None):
    """AYF-EMD tangent (Sabour et al. 2025, Alg. 1; docs/maths.md §3, steps 2-4).

    ``F-, dF/dt = jvp(F, (x_t, t, s), (v, 1, 0))`` (total derivative along the teacher ODE with s
    fixed) and ``g = (v - F-) + r (s - t) dF/dt``, which equals ``d/dt f(x_t, t, s)`` at r = 1
    and vanishes at the exact flow map. v: teacher velocity at ``(x_t, t)``, ``(B, *D)``.

    ``jvp_float32``: the derivative in float32 inside autocast (:func:`jvp_average_velocity`);
    ``method``, ``step``: the JVP or a finite difference of that step (module docstring).

    Returns ``(F, g)``: F ``(B, *D)`` with graph, g unnormalised and detached.
    """
    F, F_minus, dF_dt = _jvp_and_prediction(F_fn, x_t, t, s, v, torch.ones_like(t), torch.zeros_like(s), cond,
                                            jvp_float32, method, step)
    g = (v.to(F_minus.dtype) - F_minus) + r * bcast(s - t, x_t).to(F_minus.dtype) * dF_dt
    return F, g


def lmd_tangent(F_fn: FFn, velocity_fn, x_t, t, s, cond=None, jvp_float32: bool = False,
                method: str = "jvp", step: Optional[float] = None):
    """AYF-LMD tangent (Sabour et al. 2025; docs/maths.md §4).

    ``F-, dF/ds = jvp(F, (x_t, t, s), (0, 0, 1))`` so that ``f- = x_t + (s - t) F-`` and
    ``df/ds = F- + (s - t) dF/ds``; then ``g = v_phi(f-, s) - df/ds``, zero at the exact map.
    velocity_fn(x, s, cond) is the (guided) teacher, called without grad. ``jvp_float32``,
    ``method``, ``step``: as for :func:`emd_tangent`.

    Returns ``(F, g)``: F ``(B, *D)`` with graph, g unnormalised and detached.
    """
    F, F_minus, dF_ds = _jvp_and_prediction(F_fn, x_t, t, s, torch.zeros_like(x_t), torch.zeros_like(t),
                                            torch.ones_like(s), cond, jvp_float32, method, step)
    gap = bcast(s - t, x_t).to(F_minus.dtype)
    f_minus = x_t + gap * F_minus
    with torch.no_grad():
        v_end = velocity_fn(f_minus, s, cond)
    g = v_end - (F_minus + gap * dF_ds)
    return F, g


def normalize_tangent(g: torch.Tensor, c: float = 0.1) -> torch.Tensor:
    """Per-example tangent normalisation ``g / (||g||_2 + c)`` (docs/maths.md §3, step 5).

    ``c <= 0`` disables it. The norm runs over all non-batch dimensions.
    """
    if c <= 0:
        return g
    norm = g.flatten(1).norm(dim=1)
    return g / bcast(norm + c, g)


def warmup_ratio(step: int, horizon: int, r_max: float = 0.99) -> float:
    """Tangent warmup ``r = min(r_max, step / H)`` (docs/maths.md §3, step 3); never above r_max.

    ``horizon <= 0`` means no warmup (r = r_max from the first step).
    """
    if not 0.0 <= r_max <= 0.99:
        raise ValueError(f"r_max must lie in [0, 0.99], got {r_max}")
    if horizon <= 0:
        return float(r_max)
    return float(min(r_max, max(step, 0) / horizon))
