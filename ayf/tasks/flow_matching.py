"""FlowMatching: train (or realign) a velocity teacher on data (spec section 1)."""
from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ayf.errors import ConfigError
from ayf.math.guidance import guided_velocity
from ayf.math.losses import flow_matching_loss
from ayf.math.path import interpolate, velocity_target
from ayf.math.times import logit_normal
from ayf.nn.flow_map import NULL_LABEL, FlowMap
from ayf.tasks.base import AyfTask


class FlowMatching(AyfTask):
    """Flow matching ``|| v_theta(x_t, t) - (eps - x0) ||^2`` with ``x_t = (1 - t) x0 + t eps``.

    Args:
        net: the velocity network, a FlowMap with ``s_embedding: none``.
        optimizer: optimiser factory (default Adam, lr 1e-3).
        lr_scheduler: optional learning-rate scheduler factory, stepped every batch.
        p_mean: mean of the logit-normal training-time distribution.
        p_std: standard deviation of the logit-normal training-time distribution.
        label_dropout: share of training labels replaced by the null label, so that the same
            network also learns the unconditional velocity that classifier-free guidance needs.
        compile: run the loss computation through ``torch.compile`` (first step compiles).
    """

    kind = "FlowMatching"

    def __init__(
        self,
        net: FlowMap,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        p_mean: float = 0.0,
        p_std: float = 1.0,
        label_dropout: float = 0.0,
        compile: bool = False,
    ):
        super().__init__(optimizer, lr_scheduler, compile)
        if net.is_flow_map:
            raise ConfigError("FlowMatching trains a velocity model: give the net `s_embedding: none`")
        if not 0.0 <= label_dropout < 1.0:
            raise ConfigError(f"label_dropout must lie in [0, 1), got {label_dropout}")
        if label_dropout > 0 and net.num_classes == 0:
            raise ConfigError("label_dropout needs a class-conditional net (`num_classes` > 0)")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = net

    def loss_terms(self, x0, eps, t, label):
        v = self.net.velocity(interpolate(x0, eps, t), t, label=label)
        return flow_matching_loss(v, velocity_target(x0, eps))

    def drop_labels(self, label):
        """Replaces a ``label_dropout`` share of the labels by :data:`NULL_LABEL` (training only)."""
        p = self.hparams.label_dropout
        if label is None or p <= 0 or not self.training:
            return label
        drop = torch.rand(label.shape, device=label.device) < p
        return torch.where(drop, torch.full_like(label, NULL_LABEL), label)

    def _loss(self, batch):
        x0, label = self.split_batch(batch)
        label = self.drop_labels(label)
        t = logit_normal(x0.shape[0], self.hparams.p_mean, self.hparams.p_std, device=x0.device, dtype=x0.dtype)
        return self.per_example_loss(x0, torch.randn_like(x0), t, label).mean()

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._loss(batch))

    def set_sample_guidance(self, lam: float) -> None:
        cfg_velocity(self.net, lam, self.hparams.label_dropout)  # raises when CFG is impossible
        self.sample_guidance = lam

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["ayf"]["label_dropout"] = self.hparams.label_dropout

    @torch.no_grad()
    def generate(self, noise, steps: int, label=None, generator=None, solver: str = "euler", guidance=None):
        """Teacher samples: ``steps`` Euler (or Heun) steps of the probability-flow ODE, with
        classifier-free guidance of scale ``guidance`` (default :attr:`sample_guidance`)."""
        lam = self.sample_guidance if guidance is None else guidance
        velocity = cfg_velocity(self.net, lam, self.hparams.label_dropout)
        return self.solve_ode(lambda x, t: velocity(x, t, label), noise, steps, solver)


def cfg_velocity(net: FlowMap, lam, label_dropout):
    """``v(x, t, label)`` of a velocity net, with classifier-free guidance of scale lam
    (None or 1: the plain conditional velocity). CFG needs a net trained with label dropout."""
    if lam is None or lam == 1:
        return lambda x, t, label: net.velocity(x, t, label=label)
    if net.num_classes == 0:
        raise ConfigError("classifier-free guidance needs a class-conditional model")
    if not label_dropout:
        raise ConfigError("classifier-free guidance needs a teacher trained with label_dropout > 0 "
                          "(it never learned the unconditional velocity)")

    def velocity(x, t, label):
        return guided_velocity(net.velocity(x, t, label=label),
                               net.velocity(x, t, label=torch.full_like(label, NULL_LABEL)), lam)

    return velocity
