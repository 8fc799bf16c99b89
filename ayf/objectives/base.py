"""What every objective shares: the batch and state it is given, and compilation of its terms."""
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
    """Where training stands, handed to every call by the task; an objective's schedules (the
    tangent warm-up, realignment's phases) are functions of it, never counters of their own.

    Attributes:
        step: the optimiser step (the trainer's ``global_step``; in ``ayf test``, the checkpoint's).
    """

    step: int = 0


class Objective(nn.Module):
    """Base class: :meth:`forward` draws the example's randomness (times, noise, guidance
    scales, label dropout) eagerly in :meth:`draw`, then computes the loss in :meth:`terms` from
    tensors only, which is what ``compile`` compiles.

    Only calls with grad enabled run compiled: validation and test batches are few, and a
    no-grad call would compile a second graph, which costs more than it saves.

    Args:
        compile: run :meth:`terms` (teacher call, JVP, forward) through ``torch.compile``; the
            first training step compiles.
    """

    def __init__(self, compile: bool = False):
        super().__init__()
        self.compile_terms = bool(compile)
        self._compiled = None

    def draw(self, batch: Batch, state: State):  # pragma: no cover - abstract
        """``(cond, drawn)``: the condition of the call (the batch's, with e.g. labels dropped or
        guidance scales drawn) and the inputs of :meth:`terms` (a tuple of tensors) at ``state``."""
        raise NotImplementedError

    def terms(self, net, x0, cond, *drawn):  # pragma: no cover - abstract
        """``(per-example loss, stats)`` from tensors."""
        raise NotImplementedError

    def forward(self, net, batch: Batch, state: State = None):
        cond, drawn = self.draw(batch, State() if state is None else state)
        return self.compute(net, batch.x0, cond, *drawn)

    def compute(self, net, x0, cond, *drawn):
        """:meth:`terms`, through ``torch.compile`` when :attr:`compile_terms` is set and grad is on."""
        if not self.compile_terms or not torch.is_grad_enabled():
            return self.terms(net, x0, cond, *drawn)
        if self._compiled is None:
            # static shapes: a training batch keeps its shape, and a rare odd one (a last partial
            # batch) compiles once more rather than turning every size symbolic
            self._compiled = torch.compile(self.terms, dynamic=False)
        return self._compiled(net, x0, cond, *drawn)
