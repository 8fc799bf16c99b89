"""AdversarialFinetuning: a distilled flow map finetuned with its distillation objective plus a
relativistic GAN loss on few-step samples (docs/maths.md §7)."""
from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from ayf.errors import ConfigError
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import Teacher
from ayf.objectives import EMD, DistillationObjective, RpGAN
from ayf.tasks.flow_maps import FlowMapTask


def default_gan_optimizer(params):
    return torch.optim.Adam(params, lr=2e-5, betas=(0.0, 0.99))


class AdversarialFinetuning(FlowMapTask):
    """Finetunes a distilled flow map with ``L_G = regression + lambda_adv * RpGAN_G`` against a
    discriminator trained with ``L_D = RpGAN_D + gamma / 2 (R1 + R2)`` (Sabour et al. 2025, sec. 4).

    Each iteration makes one discriminator step, then one generator step (manual optimisation
    with two optimisers). Lightning counts both optimiser steps in ``global_step``, so
    ``trainer.max_steps`` (and step-based checkpoint / metric intervals) are twice the number of
    iterations. Fakes are flow-map samples from noise with the real batch's labels, at the step
    counts of ``adversary``. The EMA callback continues the student checkpoint's EMA.

    Args:
        student: the distilled flow map, e.g. ``ayf.checkpoints.CheckpointFlowMap`` of a
            FlowMapDistillation (or an earlier AdversarialFinetuning) checkpoint.
        teacher: the frozen teacher of the regression term (as in the distillation config).
        discriminator: ayf.nn.ImageDiscriminator for images, ayf.nn.MLPDiscriminator for vectors.
        objective: the regression term, a distillation objective (default ``ayf.objectives.EMD``
            without warm-up: the student is distilled already).
        adversary: the GAN terms and the fakes' step counts (default ``ayf.objectives.RpGAN``).
        optimizer: generator optimiser factory (default Adam, lr 2e-5, betas (0, 0.99)).
        d_optimizer: discriminator optimiser factory (default as the generator's).
        sample_guidance: lam of validation, plots and ``ayf test`` for a guided teacher (default:
            the middle of the objective's guidance_range).
        skip_nonfinite: non-finite losses in a row to skip before training stops (0: stop at the first).
    """

    kind = "AdversarialFinetuning"
    #: each iteration makes two backward passes, each of which leaves the other player's
    #: parameters without a gradient
    unused_parameters = True

    def __init__(self, student: FlowMap, teacher: Teacher, discriminator: nn.Module,
                 objective: Optional[DistillationObjective] = None, adversary: Optional[RpGAN] = None,
                 optimizer: Optional[OptimizerCallable] = None, d_optimizer: Optional[OptimizerCallable] = None,
                 sample_guidance: Optional[float] = None, skip_nonfinite: int = 0):
        super().__init__(optimizer or default_gan_optimizer, None, skip_nonfinite)
        self.save_hyperparameters(ignore=["optimizer", "d_optimizer"])
        if getattr(objective, "to_data_only", False):
            raise ConfigError("adversarial finetuning needs a flow-map objective (EMD or LMD), not Consistency")
        self.attach(student.train(), teacher, EMD(warmup=0) if objective is None else objective, sample_guidance)
        self.automatic_optimization = False
        self.initial_ema = getattr(student, "initial_ema", None)  # picked up by the EMA callback
        self.discriminator = discriminator
        self.adversary = RpGAN() if adversary is None else adversary
        self._d_optimizer = d_optimizer or default_gan_optimizer
        d_classes = getattr(discriminator, "num_classes", 0)
        if d_classes and d_classes != self.net.num_classes:
            raise ConfigError(f"the discriminator has {d_classes} classes but the flow map has {self.net.num_classes}")
        self.check_shapes()

    def known_shapes(self, datamodule=None) -> dict:
        return {**super().known_shapes(datamodule),
                "discriminator data shape": getattr(self.discriminator, "data_shape", None)}

    def configure_optimizers(self):
        return [self._optimizer(list(self.trainable_parameters())),
                self._d_optimizer(list(self.discriminator.parameters()))]

    def fake_cond(self, b):
        """The condition of a batch's fakes: its labels, and guidance scales drawn like the regression term's."""
        return b.cond.with_(lam=self.objective.draw_lam(b.x0))

    def player_step(self, opt, loss_fn, what: str):
        """One update of the player that ``opt`` trains; the other player's weights do not change."""
        with self.toggled_optimizer(opt):
            loss, stats = loss_fn()
            if self.guard.finite(self, loss, what):  # else skipped (skip_nonfinite)
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                opt.step()
        return loss.detach(), stats

    def discriminator_step(self, batch, steps: int = 1):
        """One discriminator update: ``RpGAN_D + gamma / 2 (R1 + R2)`` (mean) and statistics."""
        b = self.to_batch(batch)
        return self.player_step(self.optimizers()[1], lambda: self.adversary.discriminator_loss(
            self.discriminator, self.net, b.x0, self.fake_cond(b), steps), "discriminator loss")

    def generator_loss(self, batch, steps: int):
        """``mean regression + lambda_adv * RpGAN_G`` and its parts."""
        b = self.to_batch(batch)
        per, stats = self.objective(self.net, b, self.state())
        adv = self.adversary.generator_loss(self.discriminator, self.net, b.x0, self.fake_cond(b), steps)
        regression = per.mean()
        return regression + self.adversary.lambda_adv * adv, {"regression": regression.detach(), "g_adv": adv.detach(),
                                                                **stats}

    def generator_step(self, batch, steps: int = 1):
        """One generator (flow map) update."""
        return self.player_step(self.optimizers()[0], lambda: self.generator_loss(batch, steps), "generator loss")

    def training_step(self, batch, batch_idx):
        steps = self.adversary.steps_at(self.global_step)
        d_loss, d_stats = self.discriminator_step(batch, steps)
        _, g_stats = self.generator_step(batch, steps)
        self.log("train/loss", g_stats["regression"], prog_bar=True)
        self.log("train/g_adv", g_stats["g_adv"], prog_bar=True)
        self.log("train/d_loss", d_loss, prog_bar=True)
        for name in ("tangent_norm", "tangent_r"):
            self.log(f"train/{name}", g_stats[name])
        for name, value in d_stats.items():
            self.log(f"train/{name}", value)
        self.log("train/iteration", float(self.global_step // 2))
