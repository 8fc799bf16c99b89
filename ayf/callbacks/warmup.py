"""Tangent warmup: r derived from global_step, so it is right after a resume."""
from __future__ import annotations

import lightning as L

from ayf.math.tangents import warmup_ratio


class TangentWarmup(L.Callback):
    """Sets ``pl_module.tangent_r = min(r_max, global_step / horizon)`` before every batch.

    Args:
        horizon: warmup length H in optimiser steps (paper: 10k).
        r_max: the cap on r (at most 0.99).
    """

    def __init__(self, horizon: int = 10_000, r_max: float = 0.99):
        warmup_ratio(0, horizon, r_max)  # validates r_max
        self.horizon, self.r_max = horizon, r_max

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.tangent_r = warmup_ratio(trainer.global_step, self.horizon, self.r_max)
