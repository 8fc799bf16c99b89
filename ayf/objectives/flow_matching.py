"""Flow matching (docs/maths.md §1): the teacher's objective."""
from __future__ import annotations

import torch

from ayf.errors import ConfigError
from ayf.math.losses import flow_matching_loss
from ayf.math.path import interpolate, velocity_target
from ayf.math.times import logit_normal
from ayf.nn.cond import Cond
from ayf.objectives.base import Batch, Objective, State


class FlowMatchingObjective(Objective):
    """``|| v_theta(x_t, t, cond) - (eps - x0) ||^2 / D`` with ``x_t = (1 - t) x0 + t eps`` and
    ``t = sigmoid(N(p_mean, p_std^2))``.

    Args:
        p_mean: mean of the logit-normal training-time distribution.
        p_std: standard deviation of the logit-normal training-time distribution.
        label_dropout: share of training examples made unconditional: the null label, the empty
            prompt (training mode only).
        compile: run the loss terms through ``torch.compile``.
    """

    def __init__(self, p_mean: float = 0.0, p_std: float = 1.0, label_dropout: float = 0.0, compile: bool = False):
        super().__init__(compile)
        if not 0.0 <= label_dropout < 1.0:
            raise ConfigError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        self.p_mean, self.p_std, self.label_dropout = p_mean, p_std, label_dropout

    def drop_conditions(self, cond: Cond, batch: int, device) -> Cond:
        """Makes a ``label_dropout`` share of the examples unconditional (:data:`ayf.nn.NULL_LABEL`,
        the empty prompt; training only)."""
        p = self.label_dropout
        if p <= 0 or not self.training or (cond.label is None and not cond.has_text):
            return cond
        return cond.drop(torch.rand(batch, device=device) < p)

    def draw(self, batch: Batch, state: State):
        x0 = batch.x0
        t = logit_normal(x0.shape[0], self.p_mean, self.p_std, device=x0.device, dtype=x0.dtype)
        return self.drop_conditions(batch.cond, x0.shape[0], x0.device), (torch.randn_like(x0), t)

    def terms(self, net, x0, cond, eps, t):
        v = net.velocity(interpolate(x0, eps, t), t, cond)
        return flow_matching_loss(v, velocity_target(x0, eps)), {}
