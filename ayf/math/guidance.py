"""Guided velocities (docs/maths.md §6)."""
from __future__ import annotations

import torch

from ayf.math.flow_map import bcast


def guided_velocity(v_strong: torch.Tensor, v_weak: torch.Tensor, lam) -> torch.Tensor:
    """``v = lam * v_strong + (1 - lam) * v_weak``.

    Autoguidance uses a weaker model of the same task as ``v_weak``; classifier-free guidance
    uses the unconditional prediction. ``lam = 1`` returns ``v_strong``. lam: scalar or ``(B,)``.
    """
    lam = bcast(lam, v_strong)
    return lam * v_strong + (1 - lam) * v_weak
