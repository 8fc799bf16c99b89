"""Teacher realignment (docs/maths.md §11): a converted teacher's time input c_noise(sigma) is
replaced by a smooth embedding of t, fitted to the old one, then optionally fine-tuned."""
from __future__ import annotations

import torch

from ayf.errors import ConfigError
from ayf.math.losses import flow_matching_loss
from ayf.math.path import interpolate, velocity_target
from ayf.math.times import logit_normal
from ayf.objectives.base import Batch, Objective

PHASES = ("embedding", "finetune")
TARGETS = ("teacher", "data", "none")


class RealignmentObjective(Objective):
    """Two phases, chosen by :attr:`phase` (the task sets it from ``global_step``):

    - ``embedding``: ``|| E_new(t) - E_old(t) ||^2 / dim`` with ``t ~ U(0, 1)``, where ``E_old`` is
      the original network's time embedding (its time input clamped to its valid range) and
      ``E_new`` the realigned one; nothing else enters the loss, so no other weight moves.
    - ``finetune``: flow matching of the whole network at ``t = sigmoid(N(p_mean, p_std^2))``,
      against the frozen original's velocity (``target: teacher``) or the data's
      ``eps - x0`` (``target: data``).

    Args:
        teacher: the frozen original network, as a teacher (:class:`ayf.nn.NetTeacher`).
        target: what the fine-tuning phase regresses on: `teacher`, `data` or `none` (no fine-tuning).
        p_mean: mean of the logit-normal fine-tuning time distribution.
        p_std: standard deviation of the logit-normal fine-tuning time distribution.
    """

    def __init__(self, teacher, target: str = "teacher", p_mean: float = 0.0, p_std: float = 1.0):
        super().__init__()
        if target not in TARGETS:
            raise ConfigError(f"realignment target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.teacher, self.target, self.p_mean, self.p_std = teacher, target, p_mean, p_std
        self.phase = "embedding"

    def draw(self, batch: Batch):
        x0 = batch.x0
        if self.phase == "embedding":
            t = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)
        else:
            t = logit_normal(x0.shape[0], self.p_mean, self.p_std, device=x0.device, dtype=x0.dtype)
        return batch.cond, (torch.randn_like(x0), t)

    def terms(self, net, x0, cond, eps, t, r=None):
        if self.phase == "embedding":
            new = net.backbone.time_embedding(t)
            with torch.no_grad():
                old = self.teacher.net.backbone.time_embedding(t)
            err = (new - old).pow(2).mean(1)
            return err, {"embedding_rel_error": (err.mean() / old.pow(2).mean()).sqrt().detach()}
        x_t = interpolate(x0, eps, t)
        if self.target == "teacher":
            with torch.no_grad():
                target = self.teacher(x_t, t, cond)
        else:
            target = velocity_target(x0, eps)
        return flow_matching_loss(net.velocity(x_t, t, cond), target), {}
