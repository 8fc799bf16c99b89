"""Choices that ayf measured and did not keep (docs/results/ablation.md), as subclasses that the
ablation benchmark injects by class_path (`--model.objective ablation_options.GapEMD`, ...): other
(t, s) proposals, other per-example weightings, and the two-jump target on random examples.
benchmarks/ablation.py puts this folder on the Python path of its runs."""
from __future__ import annotations

import torch

from ayf.math.times import TimePairSampler, logit_normal
from ayf.objectives import EMD


class SortedSampler(TimePairSampler):
    """t and s: the larger and the smaller of two independent logit-normal draws."""

    def propose(self, batch, generator=None, device=None, dtype=torch.float32):
        a, b = (logit_normal(batch, self.p_mean, self.p_std, generator, device, dtype) for _ in range(2))
        return torch.maximum(a, b), torch.minimum(a, b)


class IntervalSampler(TimePairSampler):
    """The gap first, ``t - s = sigmoid(N(gap_mean, gap_std^2))``, then its position, ``s ~ U(0, 1 - gap)``.

    Args:
        gap_mean: mean of the logit-normal gap.
        gap_std: standard deviation of the logit-normal gap.
    """

    def __init__(self, gap_mean: float = 0.0, gap_std: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if gap_std <= 0:
            raise ValueError(f"gap_std must be positive, got {gap_std}")
        self.gap_mean, self.gap_std = gap_mean, gap_std

    def propose(self, batch, generator=None, device=None, dtype=torch.float32):
        gap = logit_normal(batch, self.gap_mean, self.gap_std, generator, device, dtype)
        s = (1 - gap) * self._uniform(batch, generator, device, dtype)()
        return s + gap, s


class LongGapSampler(TimePairSampler):
    """The default proposal, with a share ``p_long`` of the pairs drawn instead with a gap
    ``t - s ~ U(1/2, 1)`` at a uniform position (extra mass on long jumps).

    Args:
        p_long: share of long-gap pairs.
    """

    def __init__(self, p_long: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= p_long <= 1.0:
            raise ValueError(f"p_long must lie in [0, 1], got {p_long}")
        self.p_long = p_long

    def propose(self, batch, generator=None, device=None, dtype=torch.float32):
        u = self._uniform(batch, generator, device, dtype)
        t, s = super().propose(batch, generator, device, dtype)
        gap = 0.5 + 0.5 * u()
        s_long = (1 - gap) * u()
        long = u() < self.p_long
        return torch.where(long, s_long + gap, t), torch.where(long, s_long, s)


class GapEMD(EMD):
    """AYF-EMD with each example's loss multiplied by ``t - s`` (the weight the continuous EMD
    gradient carries)."""

    def regression(self, F, step, t, s):
        return super().regression(F, step, t, s) * (t - s).to(F.dtype)


class InvGapEMD(EMD):
    """AYF-EMD with each example's loss divided by ``t - s + 0.05`` (favours short jumps)."""

    def regression(self, F, step, t, s):
        return super().regression(F, step, t, s) / (t - s + 0.05).to(F.dtype)


class RandomPickEMD(EMD):
    """AYF-EMD with the two-jump target on the first examples of the batch (in random order
    already) instead of its longest jumps."""

    def two_jump_examples(self, t, s, k: int):
        return torch.arange(k, device=t.device)
