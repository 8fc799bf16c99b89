"""Flow-map distillation objectives: AYF-EMD, AYF-LMD and the continuous consistency model
(docs/maths.md §3-§5)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ayf.errors import ConfigError
from ayf.math.flow_map import bcast, two_jump_velocity
from ayf.math.losses import WEIGHTINGS, adaptive_weighted_loss, flow_map_loss
from ayf.math.path import interpolate
from ayf.math.tangents import emd_tangent, lmd_tangent, normalize_tangent
from ayf.math.times import TimePairSampler
from ayf.nn.embeddings import FourierFeatures
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import Teacher
from ayf.objectives.base import Batch, Objective

#: which examples of a batch take the two-jump target (DistillationObjective's semigroup_pick)
SEMIGROUP_PICKS = ("random", "longest")


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
    that vanishes at the teacher's exact flow map (docs/maths.md §3, step 6).

    Args:
        teacher: the frozen teacher ``v(x, t, cond)``; a guided one (ayf.nn.GuidedTeacher) reads
            the guidance scale lam that this objective draws per example.
        time_sampler: (t, s) pair sampler (default: logit-normal t, uniform s).
        tangent_norm: constant c of the tangent normalisation ``g / (||g|| + c)``; 0 disables it.
        weighting: per-example weight: ``none`` (F-space), ``f_space`` ((t - s)^2), ``gap`` (t - s),
            ``inv_gap`` (1 / (t - s + 0.05)) or ``adaptive`` (docs/maths.md §3).
        guidance_range: ``[lo, hi]`` of lam ~ U[lo, hi] drawn per example for a guided teacher.
        jvp_float32: inside mixed precision (``--trainer.precision bf16-mixed``), compute the
            student's JVP in float32 (default; the tangent is where low precision costs accuracy);
            false runs it under autocast like the rest of the step (faster, less exact).
        shared_primal: the trainable prediction F is the JVP's own primal output (the JVP then
            runs with grad on) instead of a second forward pass: one forward pass fewer per step,
            the same loss and gradient, more memory (MeanFlow-style; ayf/math/tangents.py).
        mask_nonfinite: examples whose tangent is not finite (a teacher or JVP that overflowed
            there) get a zero loss instead of making the whole batch's loss NaN; their count is
            the ``masked`` statistic.
        semigroup: share of each batch whose target is the student's own two-jump map instead
            of the tangent: ``F`` is moved towards the average velocity of the jumps
            ``t -> (t + s) / 2 -> s`` of the frozen student, normalised like the tangent
            (docs/maths.md §12). 0 (default) is plain AYF. Pairs with ``s = t`` keep the tangent.
        semigroup_pick: which examples take it: ``random`` (the first of the batch, whose order
            is random) or ``longest`` (the longest jumps ``t - s`` of the batch).
    """

    #: gamma of the sampler that suits the objective (consistency models re-noise: 1)
    sample_gamma = 0.0

    def __init__(self, teacher: Teacher, time_sampler: Optional[TimePairSampler] = None, tangent_norm: float = 0.1,
                 weighting: str = "none", guidance_range: Sequence[float] = (1.0, 3.0), mask_nonfinite: bool = False,
                 jvp_float32: bool = True, shared_primal: bool = False, semigroup: float = 0.0,
                 semigroup_pick: str = "random"):
        super().__init__()
        if not 0.0 <= semigroup <= 1.0:
            raise ConfigError(f"semigroup is a share of the batch in [0, 1], got {semigroup}")
        if semigroup_pick not in SEMIGROUP_PICKS:
            raise ConfigError(f"unknown semigroup_pick {semigroup_pick!r}; choose one of {', '.join(SEMIGROUP_PICKS)}")
        self.semigroup, self.semigroup_pick = float(semigroup), semigroup_pick
        self.mask_nonfinite, self.jvp_float32, self.shared_primal = mask_nonfinite, jvp_float32, shared_primal
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.teacher = teacher.requires_grad_(False).eval()
        self.time_sampler = time_sampler or TimePairSampler()
        self.tangent_norm, self.weighting = tangent_norm, weighting
        self.adaptive = AdaptiveWeight() if weighting == "adaptive" else None
        self.guidance_range = None
        if teacher.reads_lam:
            lo, hi = (float(v) for v in guidance_range)
            if not 0.0 <= lo <= hi:
                raise ConfigError(f"guidance_range must be [lo, hi] with 0 <= lo <= hi, got {list(guidance_range)}")
            self.guidance_range = (lo, hi)

    def check_student(self, net: FlowMap) -> None:
        """A student that cannot learn from this teacher is a ConfigError."""
        if not net.is_flow_map:
            raise ConfigError("the student net needs an s embedding (`s_embedding: t_minus_s` or `s`)")
        if self.teacher.reads_lam != net.guidance_input:
            if self.teacher.reads_lam:
                raise ConfigError("a guided teacher needs a student built with `guidance_input: true` (ayf.nn.FlowMap)")
            raise ConfigError("the student is built with `guidance_input: true` but the teacher is not guided "
                              "(wrap it in ayf.nn.GuidedTeacher)")

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def pairs(self, x0):
        """Training pairs ``(t, s)``, each ``(B,)``."""
        return self.time_sampler(x0.shape[0], device=x0.device, dtype=x0.dtype)

    def draw_lam(self, x0):
        """Guidance scales ``lam ~ U[guidance_range]`` per example ``(B,)``; None for a plain teacher."""
        if self.guidance_range is None:
            return None
        lo, hi = self.guidance_range
        return lo + (hi - lo) * torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)

    def draw(self, batch: Batch):
        x0 = batch.x0
        t, s = self.pairs(x0)
        return batch.cond.with_(lam=self.draw_lam(x0)), (torch.randn_like(x0), t, s)

    def tangent(self, net, x_t, t, s, cond, r):  # pragma: no cover - abstract
        """``(F with graph, g unnormalised and detached)``."""
        raise NotImplementedError

    def terms(self, net, x0, cond, eps, t, s, r=None):
        x_t = interpolate(x0, eps, t)
        F, g = self.tangent(net, x_t, t, s, cond, r)
        stats = {}
        if self.mask_nonfinite:
            bad = ~torch.isfinite(g.flatten(1)).all(dim=1)
            # a zero tangent makes the target F itself: zero loss and zero gradient there (a NaN
            # target would poison the gradient even behind a mask)
            g = torch.where(bad.view(-1, *[1] * (g.dim() - 1)), torch.zeros_like(g), g)
            stats["masked"] = bad.sum().to(g.dtype)
        stats["tangent_norm"] = g.flatten(1).norm(dim=1).mean()
        step = normalize_tangent(g, self.tangent_norm)
        k = round(self.semigroup * x0.shape[0])
        if k:
            # k examples regress onto the frozen student's two-jump map; a fixed count keeps the
            # shapes static for compile
            pick = torch.topk(t - s, k).indices if self.semigroup_pick == "longest" else torch.arange(k, device=t.device)
            with torch.no_grad():
                gap = two_jump_velocity(net, x_t[pick], t[pick], s[pick], cond[pick]) - F.detach()[pick]
            stats["semigroup_gap"] = gap.flatten(1).norm(dim=1).mean()
            off = bcast(t[pick] > s[pick], gap)  # at s = t the two-jump map is F itself: keep the tangent
            step = step.index_copy(0, pick, torch.where(off, normalize_tangent(gap, self.tangent_norm), step[pick]))
        per = flow_map_loss(F, step, t, s, self.weighting)
        if self.adaptive is not None:
            per = adaptive_weighted_loss(per, self.adaptive(t, s))
        return per, stats


class EMD(DistillationObjective):
    """AYF-EMD (Eulerian; Sabour et al. 2025, Alg. 1): the tangent is the total derivative of
    ``f(x_t, t, s)`` along the teacher's ODE in t, warmed up by r (docs/maths.md §3)."""

    def tangent(self, net, x_t, t, s, cond, r):
        with torch.no_grad():
            v = self.teacher(x_t, t, cond)
        return emd_tangent(net, x_t, t, s, v, r=1.0 if r is None else r, cond=cond, jvp_float32=self.jvp_float32,
                           shared_primal=self.shared_primal)


class LMD(DistillationObjective):
    """AYF-LMD (Lagrangian): the tangent compares ``df/ds`` with the teacher's velocity at the
    jump's end ``f(x_t, t, s)`` (docs/maths.md §4). It has no warmup."""

    def tangent(self, net, x_t, t, s, cond, r):
        return lmd_tangent(net, self.teacher, x_t, t, s, cond, jvp_float32=self.jvp_float32,
                           shared_primal=self.shared_primal)


class Consistency(EMD):
    """A continuous-time consistency model: the EMD tangent at s = 0 only, sampled with gamma = 1
    (the baseline of docs/maths.md §8). The s = 0 rule lives here alone."""

    sample_gamma = 1.0

    def __init__(self, teacher: Teacher, **settings):
        super().__init__(teacher, **settings)
        if self.semigroup:
            raise ConfigError("semigroup targets need jumps to s > 0, which the consistency objective never learns")

    def pairs(self, x0):
        t, s = super().pairs(x0)
        return t, torch.zeros_like(s)


OBJECTIVES = {"emd": EMD, "lmd": LMD, "consistency": Consistency}


def distillation_objective(name: str, teacher: Teacher, **settings) -> DistillationObjective:
    """The objective called ``name`` (``emd``, ``lmd`` or ``consistency``) on ``teacher``."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](teacher, **settings)
