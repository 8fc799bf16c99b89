"""The adversarial terms of finetuning (docs/maths.md §7): relativistic pairing GAN losses on
few-step flow-map samples, with R1/R2 gradient penalties on the discriminator."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ayf.errors import ConfigError
from ayf.math.losses import r1_penalty, rpgan_discriminator_loss, rpgan_generator_loss
from ayf.math.samplers import sample_flow_map
from ayf.math.times import time_grid
from ayf.nn.cond import Cond


class RpGAN:
    """``L_D = RpGAN_D + gamma / 2 (R1 + R2)`` and the generator's ``RpGAN_G`` (weighted by
    ``lambda_adv`` in ``L_G``), on fakes sampled by the flow map from fresh noise.

    Args:
        lambda_adv: weight of the generator's term, ``L_G = regression + lambda_adv * RpGAN_G``.
        r1_gamma: gamma of the R1 (real) and R2 (fake) penalties (0: none).
        fake_steps: flow-map step counts of the fakes, used in turn (e.g. [1, 2, 4]).
        fake_steps_schedule: later lists of fake step counts, keyed by the global step (as in
            ``trainer.max_steps``) from which each replaces ``fake_steps``; e.g.
            ``{8000: [1, 2, 4, 8, 8]}`` trains on 1-step fakes, then on 1/2/4/8-step fakes.
    """

    def __init__(self, lambda_adv: float = 0.1, r1_gamma: float = 1.0, fake_steps: List[int] = (1,),
                 fake_steps_schedule: Optional[Dict[int, List[int]]] = None):
        if lambda_adv < 0 or r1_gamma < 0:
            raise ConfigError("lambda_adv and r1_gamma must be >= 0")
        schedule = {0: fake_steps, **{int(start): c for start, c in (fake_steps_schedule or {}).items()}}
        for start, counts in schedule.items():
            if start < 0 or not counts or min(counts) < 1:
                raise ConfigError(f"fake_steps (from step {start}) must be a non-empty list of step counts >= 1")
        self.lambda_adv, self.r1_gamma = float(lambda_adv), float(r1_gamma)
        self.schedule = sorted((start, [int(k) for k in counts]) for start, counts in schedule.items())

    def steps_at(self, global_step: int) -> int:
        """The fakes' step count at ``global_step`` (two optimiser steps, the discriminator's and
        the generator's, per iteration): the list in force, in turn from its first iteration."""
        start, counts = [(start, c) for start, c in self.schedule if start <= global_step][-1]
        return counts[((global_step - start) // 2) % len(counts)]

    @staticmethod
    def fakes(net, x0, cond: Cond, steps: int):
        """``steps``-step flow-map samples from fresh noise (with graph when grad is enabled);
        ``cond`` carries the labels and guidance scales of the fakes."""
        return sample_flow_map(net, torch.randn_like(x0), time_grid(steps).to(x0), cond)

    @staticmethod
    def score(discriminator, x, cond: Cond):
        """Discriminator logits ``(B,)``; a class-conditional discriminator gets the labels."""
        return discriminator(x, cond.label if getattr(discriminator, "num_classes", 0) else None)

    def discriminator_loss(self, discriminator, net, x0, cond: Cond, steps: int):
        """Mean ``L_D`` and statistics; the fakes carry no graph."""
        with torch.no_grad():
            fake = self.fakes(net, x0, cond, steps)
        real = x0.detach().requires_grad_(True)
        fake = fake.detach().requires_grad_(True)
        d_real, d_fake = self.score(discriminator, real, cond), self.score(discriminator, fake, cond)
        loss = rpgan_discriminator_loss(d_real, d_fake).mean()
        stats = {"d_real": d_real.mean().detach(), "d_fake": d_fake.mean().detach()}
        if self.r1_gamma > 0:
            r1, r2 = r1_penalty(d_real, real).mean(), r1_penalty(d_fake, fake).mean()
            loss = loss + self.r1_gamma / 2 * (r1 + r2)
            stats.update(r1=r1.detach(), r2=r2.detach())
        return loss, stats

    def generator_loss(self, discriminator, net, x0, cond: Cond, steps: int):
        """Mean ``RpGAN_G`` of fresh fakes (graph through the flow map, not the real logits);
        the task weighs it by :attr:`lambda_adv`."""
        fake = self.fakes(net, x0, cond, steps)
        with torch.no_grad():
            d_real = self.score(discriminator, x0, cond)
        return rpgan_generator_loss(d_real, self.score(discriminator, fake, cond)).mean()
