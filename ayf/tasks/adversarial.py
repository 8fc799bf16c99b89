"""AdversarialFinetuning: AYF-EMD plus a relativistic GAN loss on few-step samples (docs/maths.md §7)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from ayf.checkpoints import FLOW_MAP_KINDS, ema_weights, network_from_checkpoint, read_checkpoint
from ayf.errors import ConfigError
from ayf.math.times import TimePairSampler
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import Teacher
from ayf.objectives.adversarial import RpGAN
from ayf.tasks.flow_maps import FlowMapTask

INIT_WEIGHTS = ("ema", "raw")


def default_gan_optimizer(params):
    return torch.optim.Adam(params, lr=2e-5, betas=(0.0, 0.99))


class AdversarialFinetuning(FlowMapTask):
    """Finetunes a distilled flow map with ``L_G = AYF-EMD + lambda_adv * RpGAN`` against a
    discriminator trained with ``L_D = RpGAN + gamma / 2 (R1 + R2)`` (Sabour et al. 2025, sec. 4).

    Each iteration makes one discriminator step, then one generator step (manual optimisation
    with two optimisers). Lightning counts both optimiser steps in ``global_step``, so
    ``trainer.max_steps`` (and step-based checkpoint / metric intervals) are twice the number of
    iterations. Fakes are flow-map samples from noise with the real batch's labels, at a step
    count cycling through ``fake_steps`` (or, from a given step on, through the list that
    ``fake_steps_schedule`` gives for it). The student starts from the distilled checkpoint and
    the EMA callback continues that run's EMA. The regression term is a distillation objective
    (:mod:`ayf.objectives`) of its own, built from the arguments below.

    Args:
        distilled_ckpt: checkpoint of the distilled flow map (FlowMapDistillation, or an earlier
            AdversarialFinetuning run).
        teacher: the frozen teacher of the EMD term (as in the distillation config).
        discriminator: ayf.nn.ImageDiscriminator for images, ayf.nn.MLPDiscriminator for vectors.
        net: the student network; default: rebuilt from the config recorded in distilled_ckpt.
        init_weights: start the student from the checkpoint's ``ema`` weights (default) or its
            ``raw`` trained weights.
        lambda_adv: weight of the generator's RpGAN term.
        r1_gamma: gamma of the R1 (real) and R2 (fake) gradient penalties, ``gamma / 2 (R1 + R2)``.
        fake_steps: flow-map step counts of the fakes, used in turn (e.g. [1, 2, 4]).
        fake_steps_schedule: later lists of fake step counts, keyed by the global step (as in
            ``trainer.max_steps``) from which each replaces ``fake_steps``; e.g.
            ``{8000: [1, 2, 4, 8, 8]}`` trains on 1-step fakes, then on 1/2/4/8-step fakes.
        objective: distillation objective of the regression term (``emd`` or ``lmd``).
        weighting: per-example weight of the regression term: ``none``, ``f_space``, ``gap``, ``inv_gap``
            or ``adaptive``.
        tangent_norm: constant c of the tangent normalisation.
        time_sampler: (t, s) pair sampler of the regression term.
        guidance_range: ``[lo, hi]`` of the guidance scale drawn per example for a guided teacher.
        sample_guidance: lam of validation, plots and ``ayf test``.
        optimizer: generator optimiser factory (default Adam, lr 2e-5, betas (0, 0.99)).
        d_optimizer: discriminator optimiser factory (default as the generator's).
        compile: run the regression term (teacher, JVP, forward) through ``torch.compile``, as
            FlowMapDistillation's ``compile`` does; fakes and discriminator stay eager.
        mask_nonfinite, jvp_float32, shared_primal, nonfinite, max_skips: as for FlowMapDistillation.
    """

    kind = "AdversarialFinetuning"

    def __init__(
        self,
        distilled_ckpt: str,
        teacher: Teacher,
        discriminator: nn.Module,
        net: Optional[FlowMap] = None,
        init_weights: str = "ema",
        lambda_adv: float = 0.1,
        r1_gamma: float = 1.0,
        fake_steps: List[int] = (1,),
        fake_steps_schedule: Optional[Dict[int, List[int]]] = None,
        objective: str = "emd",
        weighting: str = "none",
        tangent_norm: float = 0.1,
        time_sampler: Optional[TimePairSampler] = None,
        guidance_range: List[float] = (1.0, 3.0),
        sample_guidance: Optional[float] = None,
        optimizer: Optional[OptimizerCallable] = None,
        d_optimizer: Optional[OptimizerCallable] = None,
        compile: bool = False,
        mask_nonfinite: bool = False,
        jvp_float32: bool = True,
        shared_primal: bool = False,
        nonfinite: str = "stop",
        max_skips: int = 10,
    ):
        if init_weights not in INIT_WEIGHTS:
            raise ConfigError(f"unknown init_weights {init_weights!r}; choose one of {', '.join(INIT_WEIGHTS)}")
        if objective == "consistency":
            raise ConfigError("adversarial finetuning needs a flow-map objective (emd or lmd)")
        schedule = {0: fake_steps, **{int(start): c for start, c in (fake_steps_schedule or {}).items()}}
        if lambda_adv < 0 or r1_gamma < 0:
            raise ConfigError("lambda_adv and r1_gamma must be >= 0")
        for start, counts in schedule.items():
            if start < 0 or not counts or min(counts) < 1:
                raise ConfigError(f"fake_steps (from step {start}) must be a non-empty list of step counts >= 1")
        ckpt = read_checkpoint(distilled_ckpt)
        loaded, meta = network_from_checkpoint(ckpt, distilled_ckpt, use_ema=init_weights == "ema", kinds=FLOW_MAP_KINDS)
        if net is None:
            net = loaded
        else:
            try:
                net.load_state_dict(loaded.state_dict())
            except RuntimeError as err:
                raise ConfigError(f"the net does not match {distilled_ckpt}: {str(err).splitlines()[0]}") from None
        super().__init__(optimizer or default_gan_optimizer, None, compile, nonfinite, max_skips)
        self.save_hyperparameters(ignore=["optimizer", "d_optimizer"])
        self.wire(net.train(), teacher, objective, sample_guidance, time_sampler=time_sampler,
                  tangent_norm=tangent_norm, weighting=weighting, guidance_range=guidance_range, mask_nonfinite=mask_nonfinite,
                  jvp_float32=jvp_float32, shared_primal=shared_primal)
        self.automatic_optimization = False
        self._net_config = meta["net"]
        self.initial_ema = ema_weights(ckpt)  # picked up by the EMA callback
        self.discriminator = discriminator
        self.adversary = RpGAN(r1_gamma, self.objective.draw_lam)
        self._d_optimizer = d_optimizer or default_gan_optimizer
        self.fake_steps_schedule = sorted((start, [int(k) for k in counts]) for start, counts in schedule.items())
        self.check_discriminator()

    def check_discriminator(self):
        d_classes = getattr(self.discriminator, "num_classes", 0)
        if d_classes and d_classes != self.net.num_classes:
            raise ConfigError(f"the discriminator has {d_classes} classes but the flow map has {self.net.num_classes}")
        self.check_shapes()

    def known_shapes(self, datamodule=None) -> dict:
        return {**super().known_shapes(datamodule),
                "discriminator data shape": getattr(self.discriminator, "data_shape", None)}

    #: each iteration makes two backward passes, each of which leaves the other player's
    #: parameters without a gradient
    unused_parameters = True

    def configure_optimizers(self):
        return [self._optimizer(list(self.trainable_parameters())),
                self._d_optimizer(list(self.discriminator.parameters()))]

    # --- the two losses ---------------------------------------------------------------------
    def discriminator_loss(self, x0, cond, steps: int):
        """``RpGAN_D + gamma / 2 (R1 + R2)`` (mean) and statistics."""
        return self.adversary.discriminator_loss(self.discriminator, self.net, x0, cond, steps)

    def generator_loss(self, batch, steps: int):
        """``mean EMD + lambda_adv * RpGAN_G`` and its parts."""
        b = self.to_batch(batch)
        per, stats = self.objective(self.net, b, self.objective_state())
        adv = self.adversary.generator_loss(self.discriminator, self.net, b.x0, b.cond, steps)
        regression = per.mean()
        return regression + self.hparams.lambda_adv * adv, {"regression": regression.detach(), "g_adv": adv.detach(), **stats}

    # --- manual optimisation ----------------------------------------------------------------
    def discriminator_step(self, batch, steps: int = 1):
        """One discriminator update; the generator's weights do not change."""
        _, d_opt = self.optimizers()
        b = self.to_batch(batch)
        with self.toggled_optimizer(d_opt):
            loss, stats = self.discriminator_loss(b.x0, b.cond, steps)
            if not self.check_finite(loss, "discriminator loss"):  # skipped (nonfinite: skip)
                return loss.detach(), stats
            d_opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            d_opt.step()
        return loss.detach(), stats

    def generator_step(self, batch, steps: int = 1):
        """One generator (flow map) update; the discriminator's weights do not change."""
        g_opt, _ = self.optimizers()
        with self.toggled_optimizer(g_opt):
            loss, stats = self.generator_loss(batch, steps)
            if not self.check_finite(loss, "generator loss"):  # skipped (nonfinite: skip)
                return loss.detach(), stats
            g_opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            g_opt.step()
        return loss.detach(), stats

    def fake_steps_at(self, global_step: int) -> int:
        """The fakes' step count at ``global_step``: the list in force, in turn from its first iteration."""
        start, counts = [(start, c) for start, c in self.fake_steps_schedule if start <= global_step][-1]
        return counts[((global_step - start) // 2) % len(counts)]

    def training_step(self, batch, batch_idx):
        iteration = self.global_step // 2
        steps = self.fake_steps_at(self.global_step)
        d_loss, d_stats = self.discriminator_step(batch, steps)
        g_loss, g_stats = self.generator_step(batch, steps)
        self.log("train/loss", g_stats["regression"], prog_bar=True)
        self.log("train/g_adv", g_stats["g_adv"], prog_bar=True)
        self.log("train/d_loss", d_loss, prog_bar=True)
        self.log("train/tangent_norm", g_stats["tangent_norm"])
        for name, value in d_stats.items():
            self.log(f"train/{name}", value)
        self.log("train/iteration", float(iteration))

    def net_config(self):
        return self._net_config
