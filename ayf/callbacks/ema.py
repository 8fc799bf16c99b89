"""Exponential moving average of the student (``pl_module.net``) only."""
from __future__ import annotations

import contextlib
import copy

import lightning as L
import torch

from ayf.checkpoints import EMA_STATE_KEY


class EMA(L.Callback):
    """Keeps ``ema <- d * ema + (1 - d) * net`` with ``d = min(decay, (1 + k) / (10 + k))`` at
    optimiser step k. Validation, tests and plots run on the EMA weights; the EMA is saved in
    the checkpoint (the teacher is not) and restored on resume.

    A task that starts from an earlier run's EMA (``pl_module.initial_ema``, e.g. adversarial
    finetuning of a distilled flow map) continues that average at the full decay.

    Args:
        decay: the long-run decay.
    """

    def __init__(self, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.ema = None
        self._pending = None
        self._backup = None
        self.continued = False

    @property
    def state_key(self) -> str:
        return EMA_STATE_KEY  # the checkpoint layer finds the EMA weights under this key

    def _ensure(self, pl_module):
        if self.ema is None:
            self.ema = copy.deepcopy(pl_module.net).requires_grad_(False).eval()
            initial = getattr(pl_module, "initial_ema", None)
            if self._pending is not None:
                self.ema.load_state_dict(self._pending)
                self._pending = None
            elif initial is not None:
                self.ema.load_state_dict(initial)
                self.continued = True
        return self.ema

    def decay_at(self, step: int) -> float:
        return self.decay if self.continued else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ema = self._ensure(pl_module)
        d = self.decay_at(trainer.global_step)
        for e, p in zip(ema.state_dict().values(), pl_module.net.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(p.to(e.dtype), 1.0 - d)
            else:
                e.copy_(p)

    def swap_in(self, pl_module):
        """Load the EMA weights into ``pl_module.net`` (the trained weights are kept aside)."""
        if self.ema is None and self._pending is None and getattr(pl_module, "initial_ema", None) is None:
            return
        ema = self._ensure(pl_module)
        self._backup = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        pl_module.net.load_state_dict(ema.state_dict())

    def swap_out(self, pl_module):
        """Put the trained weights back after :meth:`swap_in`."""
        if self._backup is not None:
            pl_module.net.load_state_dict(self._backup)
            self._backup = None

    def on_validation_start(self, trainer, pl_module):
        self.swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module):
        self.swap_out(pl_module)

    def on_test_start(self, trainer, pl_module):
        self.swap_in(pl_module)

    def on_test_end(self, trainer, pl_module):
        self.swap_out(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # the checkpoint must hold the trained weights, never the swapped-in EMA
        if self._backup is not None:
            checkpoint["state_dict"].update({f"net.{k}": v for k, v in self._backup.items()})

    def state_dict(self):
        return {"decay": self.decay, "continued": self.continued,
                "ema": None if self.ema is None else copy.deepcopy(self.ema.state_dict())}

    def load_state_dict(self, state_dict):
        self.continued = bool(state_dict.get("continued", False))
        if state_dict.get("ema") is not None:
            if self.ema is not None:
                self.ema.load_state_dict(state_dict["ema"])
            else:
                self._pending = state_dict["ema"]


@contextlib.contextmanager
def sampling_weights(trainer, pl_module):
    """Eval mode with the EMA weights swapped in (when an EMA callback runs); restored after."""
    was_training = pl_module.training
    pl_module.eval()
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    if ema is not None:
        ema.swap_in(pl_module)
    try:
        with torch.no_grad():
            yield
    finally:
        if ema is not None:
            ema.swap_out(pl_module)
        pl_module.train(was_training)
