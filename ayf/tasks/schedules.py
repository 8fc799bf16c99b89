"""Learning-rate schedules for the tasks' ``lr_scheduler`` argument (stepped every batch)."""
from __future__ import annotations

import torch

from ayf.errors import ConfigError


class WarmupStableDecay(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup, a constant plateau, then a linear decay (stepped once per optimiser step).

    After ``n`` steps the learning rate is ``base_lr * factor(n)`` with
    ``factor = n / warmup_steps`` during the warmup, ``1`` on the plateau, and from
    ``decay_start`` on ``1 - (1 - final_factor) * min(1, (n - decay_start) / decay_steps)``.
    The step count lives in the scheduler's state, so a resumed run carries on where it stopped.

    Args:
        optimizer: the optimiser whose learning rates are scheduled (given by the task).
        decay_start: optimiser step at which the decay begins.
        decay_steps: length of the decay in steps; the rate then stays at ``final_factor * base_lr``.
        final_factor: fraction of the base learning rate reached at the end of the decay.
        warmup_steps: length of the linear warmup from 0 (0: none).
    """

    def __init__(self, optimizer, decay_start: int, decay_steps: int, final_factor: float = 0.0,
                 warmup_steps: int = 0, last_epoch: int = -1):
        if decay_steps < 1 or warmup_steps < 0 or decay_start < warmup_steps:
            raise ConfigError("WarmupStableDecay needs decay_steps >= 1 and 0 <= warmup_steps <= decay_start, "
                              f"got decay_start={decay_start}, decay_steps={decay_steps}, warmup_steps={warmup_steps}")
        if not 0.0 <= final_factor <= 1.0:
            raise ConfigError(f"final_factor must lie in [0, 1], got {final_factor}")
        self.decay_start, self.decay_steps = int(decay_start), int(decay_steps)
        self.final_factor, self.warmup_steps = float(final_factor), int(warmup_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self, n: int) -> float:
        """Multiplier of the base learning rate after ``n`` optimiser steps."""
        if n < self.warmup_steps:
            return n / self.warmup_steps
        done = min(1.0, max(0, n - self.decay_start) / self.decay_steps)
        return 1.0 - (1.0 - self.final_factor) * done

    def get_lr(self):
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
