"""What every objective shares: the batch and state it is given, and ``compile``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ayf.nn.cond import Cond


@dataclass
class Batch:
    """One training batch: data ``x0`` ``(B, *D)`` and its condition (labels)."""

    x0: torch.Tensor
    cond: Cond


@dataclass
class State:
    """What the schedules set from ``global_step`` (callbacks), handed to every call.

    Attributes:
        r: tangent warmup ratio (docs/maths.md §3, step 3), a 0-d tensor or a float.
    """

    r: object = 0.99


class Objective(nn.Module):
    """Base class: :meth:`forward` draws the example's randomness (times, noise, guidance
    scales, label dropout) eagerly, then computes the loss in :meth:`terms` from tensors only,
    which is what ``compile`` compiles.

    Only calls with grad enabled run compiled: validation and test batches are few, and a
    no-grad call would compile a second graph, which costs more than it saves.
    """

    def __init__(self):
        super().__init__()
        self.compile = False
        self._compiled = None

    def draw(self, batch: Batch):  # pragma: no cover - abstract
        """``(cond, drawn)``: the condition of the call (the batch's, with e.g. labels dropped or
        guidance scales drawn) and the example's random inputs of :meth:`terms`, a tuple of tensors."""
        raise NotImplementedError

    def terms(self, net, x0, cond, *drawn, r=None):  # pragma: no cover - abstract
        """``(per-example loss, stats)`` from tensors."""
        raise NotImplementedError

    def forward(self, net, batch: Batch, state: State = None):
        state = State() if state is None else state
        r = torch.as_tensor(state.r, device=batch.x0.device, dtype=batch.x0.dtype)  # a tensor: no recompiles
        cond, drawn = self.draw(batch)
        return self.compute(net, batch.x0, cond, *drawn, r=r)

    def compute(self, net, x0, cond, *drawn, r=None):
        """:meth:`terms`, through ``torch.compile`` when :attr:`compile` is set and grad is on."""
        if not self.compile or not torch.is_grad_enabled():
            return self.terms(net, x0, cond, *drawn, r=r)
        if self._compiled is None:
            # static shapes: a training batch keeps its shape, and a rare odd one (a last partial
            # batch) compiles once more rather than turning every size symbolic
            self._compiled = torch.compile(self.terms, dynamic=False)
        return self._compiled(net, x0, cond, *drawn, r=r)
