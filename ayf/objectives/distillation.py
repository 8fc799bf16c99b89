"""Flow-map distillation objectives: AYF-EMD, AYF-LMD and the continuous consistency model
(docs/maths.md §3-§5, §12)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ayf.errors import ConfigError
from ayf.math.flow_map import bcast, two_jump_velocity
from ayf.math.losses import WEIGHTINGS, adaptive_weighted_loss, flow_map_loss
from ayf.math.path import interpolate
from ayf.math.tangents import (
    DIFFERENCE_STEPS,
    TANGENT_METHODS,
    emd_tangent,
    lmd_tangent,
    normalize_tangent,
    warmup_ratio,
)
from ayf.math.times import TimePairSampler
from ayf.nn.embeddings import FourierFeatures
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import Teacher
from ayf.objectives.base import Batch, Objective, State


class AdaptiveWeight(nn.Module):
    """``w_psi(t, s)``: a small MLP on Fourier features of t and s (sCM-style weighting)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.features = FourierFeatures(8, 8.0)
        self.mlp = nn.Sequential(nn.Linear(2 * self.features.out_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t, s):
        return self.mlp(torch.cat([self.features(t), self.features(s)], 1)).squeeze(1)


class DistillationObjective(Objective):
    """Regression of the student's ``F`` onto ``stopgrad(F- + g / (||g|| + c))`` for a tangent g
    that vanishes at the teacher's exact flow map (docs/maths.md §3, step 6). The task hands it
    the frozen teacher once (:meth:`bind`); every call then draws ``(t, s)``, noise and, for a
    guided teacher, the guidance scale lam that both the teacher and the student read.

    Args:
        time_sampler: (t, s) pair sampler (default: logit-normal t, uniform s; docs/maths.md §5).
        tangent_norm: constant c of the tangent normalisation ``g / (||g|| + c)``; 0 disables it.
        warmup: tangent warm-up horizon H in optimiser steps, ``r = min(0.99, step / H)``
            (docs/maths.md §3, step 3); 0 keeps r = 0.99 from the first step.
        weighting: per-example weight: ``none`` (F-space), ``f_space`` ((t - s)^2) or
            ``adaptive`` (a learned ``w(t, s)``; docs/maths.md §3).
        guidance_range: ``[lo, hi]`` of lam ~ U[lo, hi] drawn per example for a guided teacher.
        semigroup: share of each batch, its longest jumps ``t - s``, whose target is the student's
            own two-jump map through the midpoint instead of the tangent, normalised like it
            (docs/maths.md §12); 0 is plain AYF. Pairs with ``s = t`` keep the tangent.
        jvp_float32: inside mixed precision (``--trainer.precision bf16-mixed``), compute the
            student's JVP (or finite difference) in float32 (the tangent is where low precision
            costs accuracy); false runs it under autocast like the rest of the step (faster, less
            exact).
        tangent_method: how the tangent's derivative of F is computed: ``jvp`` (exact forward-mode
            AD, default), ``central`` or ``forward`` (a finite difference of step
            ``difference_step``: plain forward passes without grad, which run through fused
            attention and sharded models; docs/maths.md §3).
        difference_step: the step h of a finite difference, in the units of t (EMD moves t by h
            and x_t by h v along the teacher's ODE; LMD moves s by h); default 3e-4 central, 1e-4
            forward, where float32 truncation and rounding errors meet.
        compile: run the loss terms (teacher call, JVP, forward) through ``torch.compile``.
    """

    #: gamma of the sampler that suits the objective (consistency models re-noise: 1)
    sample_gamma = 0.0
    #: the objective trains jumps to s = 0 only (no two-jump target then)
    to_data_only = False

    def __init__(self, time_sampler: Optional[TimePairSampler] = None, tangent_norm: float = 0.1,
                 warmup: int = 10_000, weighting: str = "none", guidance_range: Sequence[float] = (1.0, 3.0),
                 semigroup: float = 0.0, jvp_float32: bool = True, compile: bool = False,
                 tangent_method: str = "jvp", difference_step: Optional[float] = None):
        super().__init__(compile)
        if tangent_method not in TANGENT_METHODS:
            raise ConfigError(f"unknown tangent_method {tangent_method!r}; choose one of {', '.join(TANGENT_METHODS)}")
        if difference_step is not None and not 0.0 < difference_step < 0.5:
            raise ConfigError(f"difference_step must lie in (0, 0.5), got {difference_step}")
        if not 0.0 <= semigroup <= 1.0:
            raise ConfigError(f"semigroup is a share of the batch in [0, 1], got {semigroup}")
        if semigroup and self.to_data_only:
            raise ConfigError("semigroup targets need jumps to s > 0, which the consistency objective never learns")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if warmup < 0:
            raise ConfigError(f"warmup is a number of steps >= 0, got {warmup}")
        lo, hi = (float(v) for v in guidance_range)
        if not 0.0 <= lo <= hi:
            raise ConfigError(f"guidance_range must be [lo, hi] with 0 <= lo <= hi, got {list(guidance_range)}")
        self.time_sampler = time_sampler or TimePairSampler()
        self.tangent_norm, self.warmup, self.weighting = tangent_norm, int(warmup), weighting
        self.semigroup, self.jvp_float32, self._range = float(semigroup), jvp_float32, (lo, hi)
        self.tangent_method = tangent_method
        self.difference_step = DIFFERENCE_STEPS.get(tangent_method) if difference_step is None else float(difference_step)
        self.adaptive = AdaptiveWeight() if weighting == "adaptive" else None
        self.teacher: Optional[Teacher] = None
        self.guidance_range = None

    def bind(self, teacher: Teacher) -> None:
        """Takes the frozen teacher ``v(x, t, cond)`` (once, from the task); a guided one
        (ayf.nn.GuidedTeacher) reads the lam that this objective draws per example."""
        self.teacher = teacher.requires_grad_(False).eval()
        self.guidance_range = self._range if teacher.reads_lam else None

    def check_student(self, net: FlowMap) -> None:
        """A student that cannot learn from the bound teacher is a ConfigError."""
        if not net.is_flow_map:
            raise ConfigError("the student net needs an s embedding (`s_embedding: t_minus_s` or `s`)")
        if self.teacher.reads_lam != net.reads_lam:
            if self.teacher.reads_lam:
                raise ConfigError("a guided teacher needs a student built with `guidance_input: true` (ayf.nn.FlowMap)")
            raise ConfigError("the student is built with `guidance_input: true` but the teacher is not guided "
                              "(wrap it in ayf.nn.GuidedTeacher)")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def ratio(self, step: int) -> float:
        """The tangent warm-up ratio r at optimiser step ``step``."""
        return warmup_ratio(step, self.warmup)

    def pairs(self, x0):
        """Training pairs ``(t, s)``, each ``(B,)``."""
        return self.time_sampler(x0.shape[0], device=x0.device, dtype=x0.dtype)

    def draw_lam(self, x0):
        """Guidance scales ``lam ~ U[guidance_range]`` per example ``(B,)``; None for a plain teacher."""
        if self.guidance_range is None:
            return None
        lo, hi = self.guidance_range
        return lo + (hi - lo) * torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)

    def draw(self, batch: Batch, state: State):
        x0 = batch.x0
        t, s = self.pairs(x0)
        r = torch.as_tensor(self.ratio(state.step), device=x0.device, dtype=x0.dtype)  # a tensor: no recompiles
        return batch.cond.with_(lam=self.draw_lam(x0)), (torch.randn_like(x0), t, s, r)

    def tangent(self, net, x_t, t, s, cond, r):  # pragma: no cover - abstract
        """``(F with graph, g unnormalised and detached)``."""
        raise NotImplementedError

    def two_jump_examples(self, t, s, k: int):
        """Indices of the ``k`` examples that take the two-jump target: the longest jumps."""
        return torch.topk(t - s, k).indices

    def regression(self, F, step, t, s):
        """Per-example loss of ``F`` against ``stopgrad(F + step)`` with the configured weighting."""
        per = flow_map_loss(F, step, t, s, self.weighting)
        return per if self.adaptive is None else adaptive_weighted_loss(per, self.adaptive(t, s))

    def terms(self, net, x0, cond, eps, t, s, r):
        x_t = interpolate(x0, eps, t)
        F, g = self.tangent(net, x_t, t, s, cond, r)
        stats = {"tangent_norm": g.flatten(1).norm(dim=1).mean(), "tangent_r": r.detach()}
        step = normalize_tangent(g, self.tangent_norm)
        k = round(self.semigroup * x0.shape[0])
        if k:
            # k examples regress onto the frozen student's two-jump map; a fixed count keeps the
            # shapes static for compile
            pick = self.two_jump_examples(t, s, k)
            with torch.no_grad():
                gap = two_jump_velocity(net, x_t[pick], t[pick], s[pick], cond[pick]) - F.detach()[pick]
            stats["semigroup_gap"] = gap.flatten(1).norm(dim=1).mean()
            off = bcast(t[pick] > s[pick], gap)  # at s = t the two-jump map is F itself: keep the tangent
            step = step.index_copy(0, pick, torch.where(off, normalize_tangent(gap, self.tangent_norm), step[pick]))
        return self.regression(F, step, t, s), stats


class EMD(DistillationObjective):
    """AYF-EMD (Eulerian; Sabour et al. 2025, Alg. 1): the tangent is the total derivative of
    ``f(x_t, t, s)`` along the teacher's ODE in t, warmed up by r (docs/maths.md §3)."""

    def tangent(self, net, x_t, t, s, cond, r):
        with torch.no_grad():
            v = self.teacher(x_t, t, cond)
        return emd_tangent(net, x_t, t, s, v, r=r, cond=cond, jvp_float32=self.jvp_float32,
                           method=self.tangent_method, step=self.difference_step)


class LMD(DistillationObjective):
    """AYF-LMD (Lagrangian): the tangent compares ``df/ds`` with the teacher's velocity at the
    jump's end ``f(x_t, t, s)`` (docs/maths.md §4). It has no warm-up."""

    def tangent(self, net, x_t, t, s, cond, r):
        return lmd_tangent(net, self.teacher, x_t, t, s, cond, jvp_float32=self.jvp_float32,
                           method=self.tangent_method, step=self.difference_step)


class Consistency(EMD):
    """A continuous-time consistency model: the EMD tangent at s = 0 only, sampled with gamma = 1
    (the baseline of docs/maths.md §8). The s = 0 rule lives here alone."""

    sample_gamma = 1.0
    to_data_only = True

    def pairs(self, x0):
        t, s = super().pairs(x0)
        return t, torch.zeros_like(s)
