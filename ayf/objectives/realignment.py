"""Teacher realignment (docs/maths.md §11): a converted teacher's time input c_noise(sigma) is
replaced by a smooth embedding of t, fitted to the old one, then optionally fine-tuned."""
from __future__ import annotations

import torch

from ayf.errors import ConfigError
from ayf.math.losses import flow_matching_loss
from ayf.math.path import interpolate, velocity_target
from ayf.math.times import logit_normal
from ayf.objectives.base import Batch, Objective, State

TARGETS = ("teacher", "data", "none")


class RealignmentObjective(Objective):
    """Two phases, chosen by the step of the :class:`State`:

    - before ``embedding_steps`` (and throughout with ``target: none``), the embedding phase:
      ``|| E_new(t) - E_old(t) ||^2 / dim`` with ``t ~ U(0, 1)``, where ``E_old`` is the original
      network's time embedding (its time input clamped to its valid range) and ``E_new`` the
      realigned one; nothing else enters the loss, so no other weight moves.
    - then fine-tuning: flow matching of the whole network at ``t = sigmoid(N(p_mean, p_std^2))``,
      against the frozen original's velocity (``target: teacher``) or the data's ``eps - x0``
      (``target: data``).

    Args:
        teacher: the frozen original network, as a teacher (:class:`ayf.nn.NetTeacher`).
        embedding_steps: optimiser steps of the embedding phase.
        target: what the fine-tuning phase regresses on: `teacher`, `data` or `none` (no fine-tuning).
        p_mean: mean of the logit-normal fine-tuning time distribution.
        p_std: standard deviation of the logit-normal fine-tuning time distribution.
        compile: run the loss terms through ``torch.compile``.
    """

    def __init__(self, teacher, embedding_steps: int, target: str = "teacher", p_mean: float = 0.0,
                 p_std: float = 1.0, compile: bool = False):
        super().__init__(compile)
        if target not in TARGETS:
            raise ConfigError(f"realignment target must be one of {', '.join(TARGETS)}, got {target!r}")
        if embedding_steps < 0:
            raise ConfigError(f"embedding_steps must be >= 0, got {embedding_steps}")
        self.teacher, self.target, self.p_mean, self.p_std = teacher, target, p_mean, p_std
        self.embedding_steps = int(embedding_steps)

    def embedding_phase(self, state: State) -> bool:
        return state.step < self.embedding_steps or self.target == "none"

    def draw(self, batch: Batch, state: State):
        x0 = batch.x0
        embedding = self.embedding_phase(state)
        if embedding:
            t = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)
        else:
            t = logit_normal(x0.shape[0], self.p_mean, self.p_std, device=x0.device, dtype=x0.dtype)
        return batch.cond, (torch.randn_like(x0), t, embedding)

    def terms(self, net, x0, cond, eps, t, embedding: bool):
        if embedding:
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
