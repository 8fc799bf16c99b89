"""Training time pairs and sampling grids (docs/maths.md §5)."""
from __future__ import annotations

import torch


def logit_normal(batch: int, p_mean: float, p_std: float, generator=None, device=None, dtype=torch.float32):
    """``t = sigmoid(N(p_mean, p_std^2))``, ``(B,)``: the training-time distribution."""
    n = torch.randn(batch, generator=generator, device=device, dtype=dtype)
    return torch.sigmoid(p_mean + p_std * n)


class TimePairSampler:
    """Draws training pairs ``(t, s)`` with ``0 <= s <= t <= 1`` (docs/maths.md §5).

    :meth:`propose` draws ``t = sigmoid(N(p_mean, p_std^2))`` and ``s ~ U(0, t)`` (a subclass may
    propose otherwise); then a share of examples is set to t = 1, a share (drawn independently) to
    s = 0, and a share to ``s = t`` (the flow-matching limit), in that order.

    Args:
        p_mean: mean of the logit-normal for t.
        p_std: standard deviation of the logit-normal for t.
        p_t_one: share of examples with t = 1 (pure noise).
        p_s_zero: share of examples with s = 0 (jump to data).
        p_diagonal: share of examples with s = t (the flow-matching limit).
    """

    def __init__(self, p_mean: float = -0.8, p_std: float = 1.6, p_t_one: float = 0.1, p_s_zero: float = 0.1,
                 p_diagonal: float = 0.0):
        for name, p in (("p_t_one", p_t_one), ("p_s_zero", p_s_zero), ("p_diagonal", p_diagonal)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        if p_std <= 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        self.p_mean, self.p_std = p_mean, p_std
        self.p_t_one, self.p_s_zero, self.p_diagonal = p_t_one, p_s_zero, p_diagonal

    @staticmethod
    def _uniform(batch, generator, device, dtype):
        """A function that draws ``U(0, 1)`` of shape ``(batch,)`` at each call."""
        return lambda: torch.rand(batch, generator=generator, device=device, dtype=dtype)

    def propose(self, batch: int, generator=None, device=None, dtype=torch.float32):
        """The pair ``(t, s)`` before the t = 1, s = 0 and s = t shares."""
        t = logit_normal(batch, self.p_mean, self.p_std, generator, device, dtype)
        return t, t * self._uniform(batch, generator, device, dtype)()

    def __call__(self, batch: int, generator=None, device=None, dtype=torch.float32):
        """Returns ``(t, s)``, each ``(B,)``."""
        t, s = self.propose(batch, generator, device, dtype)
        u = self._uniform(batch, generator, device, dtype)
        t = torch.where(u() < self.p_t_one, torch.ones_like(t), t)  # s stays: it is below the old t
        s = torch.where(u() < self.p_s_zero, torch.zeros_like(s), s)
        s = torch.where(u() < self.p_diagonal, t, s)
        return t, s


def time_grid(steps: int, dtype=torch.float64):
    """Uniform sampling grid ``1 = t_0 > t_1 > ... > t_N = 0``, ``(N + 1,)``; any other grid is
    given explicitly (:func:`check_grid`, ``ayf sample --grid``)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {steps}")
    return torch.linspace(1.0, 0.0, int(steps) + 1, dtype=dtype)


def check_grid(grid) -> torch.Tensor:
    """Validates an explicit grid: 1-D, strictly decreasing (each jump has s < t), in [0, 1]."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError("a time grid needs at least two times, e.g. 1,0")
    if (grid < 0).any() or (grid > 1).any():
        raise ValueError(f"grid times must lie in [0, 1] (t = 0 data, t = 1 noise): {grid.tolist()}")
    bad = (grid[1:] >= grid[:-1]).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"grid must decrease from noise to data, but step {i} goes from t={grid[i].item():g} "
            f"to s={grid[i + 1].item():g} (s > t or s = t)"
        )
    return grid
