"""What keeps a run from failing late or silently: the non-finite loss policy and the compiler probe."""
from __future__ import annotations

import logging

import torch

from ayf.errors import ConfigError, NonFiniteLossError

log = logging.getLogger("ayf.tasks")


def check_compile(device) -> None:
    """A one-line ConfigError when ``torch.compile`` cannot compile on ``device`` here (no C++
    compiler for the CPU backend, no Triton for the GPU one, an unsupported platform), instead of a
    long compiler traceback at the first training step."""
    probe = torch.compile(lambda x: torch.sin(x) * 2.0 + 1.0, dynamic=False)
    try:
        probe(torch.ones(4, device=device))
    except Exception as err:  # noqa: BLE001 - any failure of the compiler stack means the same
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"compile: true, but torch.compile cannot compile for {device.type} on this machine "
                          f"({type(err).__name__}: {first}); set compile: false") from None


class NonFiniteGuard:
    """Decides what a non-finite loss does: with ``max_skips`` 0 it stops training (the last
    saved checkpoint is untouched); otherwise the step is skipped (no update), counted in
    ``train/skipped_steps``, and training stops after ``max_skips`` such steps in a row."""

    def __init__(self, max_skips: int = 0):
        if max_skips < 0:
            raise ConfigError(f"skip_nonfinite must be >= 0, got {max_skips}")
        self.max_skips, self.skipped, self.in_a_row = int(max_skips), 0, 0

    def finite(self, task, loss: torch.Tensor, what: str = "loss") -> bool:
        """True when ``loss`` is finite on every rank; False when the step is to be skipped.
        Every rank must call it: under DDP a non-finite loss on one rank skips the step on all."""
        bad = not bool(torch.isfinite(loss).all())
        trainer = task._trainer
        if trainer is not None and trainer.world_size > 1:
            bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            self.in_a_row = 0
            return True
        step = task.global_step
        if self.max_skips == 0:
            raise NonFiniteLossError(
                f"non-finite {what} ({loss.item()}) at step {step}: training stopped; the last saved checkpoint "
                "is untouched (lower the learning rate, check the data, or set skip_nonfinite: N to skip such steps)")
        self.skipped += 1
        self.in_a_row += 1
        task.log("train/skipped_steps", float(self.skipped))
        if self.in_a_row > self.max_skips:
            raise NonFiniteLossError(
                f"non-finite {what} in {self.in_a_row} steps in a row (skip_nonfinite {self.max_skips}) at step "
                f"{step}: training stopped; the last saved checkpoint is untouched")
        log.warning("non-finite %s at step %d: step skipped (%d in a row, %d in all)", what, step, self.in_a_row,
                    self.skipped)
        return False
