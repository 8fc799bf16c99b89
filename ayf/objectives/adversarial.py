"""The adversarial terms of finetuning (docs/maths.md §7): relativistic pairing GAN losses on
few-step flow-map samples, with R1/R2 gradient penalties on the discriminator."""
from __future__ import annotations

import torch

from ayf.math.losses import r1_penalty, rpgan_discriminator_loss, rpgan_generator_loss
from ayf.math.samplers import sample_flow_map
from ayf.math.times import time_grid
from ayf.nn.cond import Cond


class RpGAN:
    """``L_D = RpGAN_D + gamma / 2 (R1 + R2)`` and the generator's ``RpGAN_G``.

    Args:
        r1_gamma: gamma of the R1 (real) and R2 (fake) penalties (0: none).
        draw_lam: ``x0 -> lam (B,) or None``: the guidance scales of the fakes, drawn like the
            regression term's (a distillation objective's ``draw_lam``).
    """

    def __init__(self, r1_gamma: float, draw_lam):
        self.r1_gamma, self.draw_lam = r1_gamma, draw_lam

    def fakes(self, net, x0, cond: Cond, steps: int):
        """``steps``-step flow-map samples from fresh noise (with graph when grad is enabled)."""
        cond = cond.with_(lam=self.draw_lam(x0))
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
        """Mean ``RpGAN_G`` of fresh fakes (graph through the flow map, not the real logits)."""
        fake = self.fakes(net, x0, cond, steps)
        with torch.no_grad():
            d_real = self.score(discriminator, x0, cond)
        return rpgan_generator_loss(d_real, self.score(discriminator, fake, cond)).mean()
