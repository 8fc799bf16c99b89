"""FlowMapDistillation: AYF-EMD / AYF-LMD / continuous consistency (spec sections 3-5)."""
from __future__ import annotations

from typing import List, Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ayf.errors import ConfigError
from ayf.math.losses import WEIGHTINGS, adaptive_weighted_loss, flow_map_loss
from ayf.math.path import interpolate
from ayf.math.samplers import sample_flow_map
from ayf.math.tangents import emd_tangent, lmd_tangent, normalize_tangent
from ayf.math.times import TimePairSampler
from ayf.nn.embeddings import FourierFeatures
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import Teacher
from ayf.tasks.base import AyfTask

OBJECTIVES = ("emd", "lmd", "consistency")


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


class FlowMapDistillation(AyfTask):
    """Distils a frozen teacher into a flow map ``f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)``.

    Args:
        net: the student FlowMap (same backbone as the teacher, with an s embedding).
        teacher: frozen velocity model: a CheckpointTeacher or the analytic MixtureTeacher.
        objective: ``emd`` (AYF-EMD, default), ``lmd`` (AYF-LMD) or ``consistency`` (s = 0 only,
            a continuous-time consistency model trained with the EMD tangent).
        weighting: per-example weight: ``none`` (F-space), ``f_space`` ((t - s)^2) or ``adaptive``.
        tangent_norm: constant c of the tangent normalisation ``g / (||g|| + c)``; 0 disables it.
        time_sampler: (t, s) pair sampler (default: logit-normal t, uniform s).
        init_from_teacher: copy the teacher's weights into the student before training (default:
            when the teacher is a network).
        optimizer: optimiser factory (default Adam, lr 1e-3).
        lr_scheduler: optional learning-rate scheduler factory, stepped every batch.
        compile: run the loss computation (teacher, JVP, forward) through ``torch.compile``;
            the first step compiles. See benchmarks/cost.py.
        guidance_range: ``[lo, hi]`` of the guidance scale lam drawn per example (uniformly) for
            a guided teacher (ayf.nn.GuidedTeacher); the student (``guidance: true``) learns
            every lam in it. Paper: [1, 3].
        sample_guidance: lam of validation, plots and ``ayf test`` (default: the middle of
            guidance_range); ``ayf test --guidance`` overrides it.
    """

    kind = "FlowMapDistillation"

    def __init__(
        self,
        net: FlowMap,
        teacher: Teacher,
        objective: str = "emd",
        weighting: str = "none",
        tangent_norm: float = 0.1,
        time_sampler: Optional[TimePairSampler] = None,
        init_from_teacher: Optional[bool] = None,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        compile: bool = False,
        guidance_range: List[float] = (1.0, 3.0),
        sample_guidance: Optional[float] = None,
    ):
        super().__init__(optimizer, lr_scheduler, compile)
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if not net.is_flow_map:
            raise ConfigError("the student net needs an s embedding (`s_embedding: t_minus_s` or `s`)")
        self.guidance_range = check_guidance(net, teacher, guidance_range)
        if self.guidance_range is not None and sample_guidance is None:
            sample_guidance = sum(self.guidance_range) / 2
        self.sample_guidance = sample_guidance
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = net
        self.teacher = teacher.requires_grad_(False).eval()
        self.time_sampler = time_sampler or TimePairSampler()
        self.adaptive = AdaptiveWeight() if weighting == "adaptive" else None
        self.tangent_r = 0.99  # set from global_step by the TangentWarmup callback
        teacher_net = getattr(teacher, "net", None)
        if init_from_teacher is None:
            init_from_teacher = isinstance(teacher_net, FlowMap)
        if init_from_teacher:
            if not isinstance(teacher_net, FlowMap):
                raise ConfigError(f"init_from_teacher needs a network teacher; {type(teacher).__name__} has none (set init_from_teacher: false)")
            self.check_shapes()
            net.init_from_teacher(teacher_net)

    # --- wiring -----------------------------------------------------------------------------
    def known_shapes(self, datamodule=None) -> dict:
        return {
            "teacher data shape": self.teacher.data_shape,
            "data shape": getattr(datamodule, "data_shape", None),
            "student data shape": self.net.data_shape,
        }

    def setup(self, stage):
        dm = self.attached_datamodule()
        if dm is not None:
            self.teacher.bind_data(dm)
        self.check_shapes(dm)

    def trainable_parameters(self):
        params = list(self.net.parameters())
        return params + (list(self.adaptive.parameters()) if self.adaptive is not None else [])

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        for key in [k for k in sd if k.startswith("teacher.")]:
            del sd[key]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        for key, value in self.teacher.state_dict(prefix="teacher.").items():
            state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- the objective ----------------------------------------------------------------------
    def teacher_velocity(self, label, lam):
        """``v(x, t)`` of the (guided, at scale lam) teacher."""
        if self.teacher.guided:
            return lambda x, t: self.teacher(x, t, label, guidance=lam)
        return lambda x, t: self.teacher(x, t, label)

    def loss_terms(self, x0, eps, t, s, r, label, lam=None):
        """Per-example loss and mean unnormalised tangent norm; r is a 0-d tensor (no recompiles).
        lam ``(B,)``: guidance scales (guided teachers); the JVP holds it fixed (tangent 0)."""
        x_t = interpolate(x0, eps, t)
        F_fn = lambda x, tt, ss: self.net(x, tt, ss, label=label, guidance=lam)  # noqa: E731
        teacher = self.teacher_velocity(label, lam)
        if self.hparams.objective == "lmd":
            F, g = lmd_tangent(F_fn, teacher, x_t, t, s)
        else:
            with torch.no_grad():
                v = teacher(x_t, t)
            F, g = emd_tangent(F_fn, x_t, t, s, v, r=r)
        g_norm = g.flatten(1).norm(dim=1).mean()
        per = flow_map_loss(F, normalize_tangent(g, self.hparams.tangent_norm), t, s, self.hparams.weighting)
        if self.adaptive is not None:
            per = adaptive_weighted_loss(per, self.adaptive(t, s))
        return per, g_norm

    def draw_guidance(self, x0):
        """Training guidance scales ``lam ~ U[guidance_range]`` per example ``(B,)``; None when
        the teacher is not guided."""
        if self.guidance_range is None:
            return None
        lo, hi = self.guidance_range
        return lo + (hi - lo) * torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)

    def losses(self, batch):
        """Per-example loss and tangent statistics for one batch."""
        x0, label = self.split_batch(batch)
        t, s = self.time_sampler(x0.shape[0], device=x0.device, dtype=x0.dtype)
        if self.hparams.objective == "consistency":
            s = torch.zeros_like(s)
        r = torch.tensor(float(self.tangent_r), device=x0.device, dtype=x0.dtype)
        per, g_norm = self.per_example_loss(x0, torch.randn_like(x0), t, s, r, label, self.draw_guidance(x0))
        return per, {"tangent_norm": g_norm}

    def training_step(self, batch, batch_idx):
        per, stats = self.losses(batch)
        loss = per.mean()
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tangent_norm", stats["tangent_norm"])
        self.log("train/tangent_r", float(self.tangent_r))
        return loss

    def validation_step(self, batch, batch_idx):
        per, stats = self.losses(batch)
        self.log("val/loss", per.mean(), prog_bar=True)
        self.log("val/tangent_norm", stats["tangent_norm"])

    def test_step(self, batch, batch_idx):
        per, _ = self.losses(batch)
        self.log("test/loss", per.mean())

    def set_sample_guidance(self, lam: float) -> None:
        if not self.net.guidance:
            raise ConfigError("this flow map was not distilled with guidance; leave out --guidance")
        self.sample_guidance = lam

    def sampling_guidance(self, guidance, like):
        """lam ``(B,)`` for sampling: ``guidance``, else :attr:`sample_guidance`; None without guidance."""
        lam = self.sample_guidance if guidance is None else guidance
        if lam is not None and not self.net.guidance:
            raise ConfigError("this flow map was not distilled with guidance; sample it without a guidance scale")
        return None if lam is None else torch.full((like.shape[0],), float(lam), device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def generate(self, noise, steps: int, label=None, generator=None, gamma: Optional[float] = None, grid=None,
                 guidance=None):
        """Flow-map samples; the consistency objective samples with gamma = 1 by default.
        guidance: lam of a guided student (default :attr:`sample_guidance`)."""
        if gamma is None:
            gamma = 1.0 if self.hparams.objective == "consistency" else 0.0
        grid = self.grid(steps, noise) if grid is None else grid
        lam = self.sampling_guidance(guidance, noise)
        F_fn = lambda x, t, s: self.net(x, t, s, label=label, guidance=lam)  # noqa: E731
        return sample_flow_map(F_fn, noise, grid, gamma=gamma, generator=generator)

    @torch.no_grad()
    def teacher_generate(self, noise, steps: int, label=None, solver: str = "euler", guidance=None):
        """The teacher's own ODE samples from the same noise (the reference beside the student),
        guided at the student's sampling scale."""
        lam = self.sampling_guidance(guidance, noise) if self.teacher.guided else None
        return self.solve_ode(self.teacher_velocity(label, lam), noise, steps, solver)

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["ayf"]["sample_guidance"] = self.sample_guidance


def check_guidance(net: FlowMap, teacher: Teacher, guidance_range):
    """The lam range when the teacher is guided (None otherwise); a student and a teacher that
    disagree about guidance are a ConfigError."""
    if teacher.guided != net.guidance:
        if teacher.guided:
            raise ConfigError("a guided teacher needs a student built with `guidance: true` (ayf.nn.FlowMap)")
        raise ConfigError("the student is built with `guidance: true` but the teacher is not guided "
                          "(wrap it in ayf.nn.GuidedTeacher)")
    if not teacher.guided:
        return None
    lo, hi = (float(v) for v in guidance_range)
    if not 0.0 <= lo <= hi:
        raise ConfigError(f"guidance_range must be [lo, hi] with 0 <= lo <= hi, got {list(guidance_range)}")
    return lo, hi
