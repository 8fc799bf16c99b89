"""Moving average of the student (``pl_module.net``) only: the classic EMA with a warm-up, or
EDM2's power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Sec. 3)."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import Optional

import lightning as L
import torch

from ayf.checkpoints import EMA_STATE_KEY
from ayf.errors import ConfigError

log = logging.getLogger("ayf.callbacks")

DEFAULT_DECAY = 0.999
# the relative standard deviation of the profile tau^gamma at gamma = 0 (a flat average of the
# whole run); a narrower profile has gamma > 0, a wider one would weight early steps more
SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)


def power_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 of the power-function profile ``p(tau) ∝ tau^gamma`` on [0, t] whose
    standard deviation is ``sigma_rel * t``, for 0 < sigma_rel < sqrt(1/12).

    The profile's mean is ``(gamma + 1) / (gamma + 2) * t`` and its variance
    ``(gamma + 1) / ((gamma + 2)^2 (gamma + 3)) * t^2``; with ``s = sigma_rel^-2`` gamma is thus a
    root of the cubic ``gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s)``. Shifting
    ``gamma = x - 7/3`` leaves ``x^3 + p x + q`` with ``p = -(3 s + 1) / 3`` and
    ``q = (36 s + 2) / 27``. It has three real roots (for s >= 12 one lies below -3 and one in
    (-1, 0]), and the largest, trigonometric (Viete) form, is the one wanted:
    ``x = 2 sqrt(-p/3) cos(arccos((3 q / (2 p)) sqrt(-3/p)) / 3)``, i.e.
    ``gamma = -7/3 + (2/3) r cos(arccos(-(18 s + 1) / r^3) / 3)`` with ``r = sqrt(3 s + 1)``.
    """
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:
        raise ConfigError(f"EMA sigma_rel must lie in (0, sqrt(1/12) = {SIGMA_REL_MAX:.6f}), got {sigma_rel}")
    s = sigma_rel ** -2
    r = math.sqrt(3.0 * s + 1.0)
    return -7.0 / 3.0 + 2.0 / 3.0 * r * math.cos(math.acos(-(18.0 * s + 1.0) / r ** 3) / 3.0)


class EMA(L.Callback):
    """A moving average of ``pl_module.net``; validation, tests and plots run on its weights.
    It is saved in the checkpoint (the teacher is not) and restored on resume.

    The classic EMA (``decay``) keeps ``ema <- d * ema + (1 - d) * net`` with
    ``d = min(decay, (1 + k) / (10 + k))`` at optimiser step k.

    The power-function EMA of EDM2 (``sigma_rel``) averages the weights of steps ``tau <= t`` with
    the profile ``p(tau) ∝ tau^gamma`` (gamma from :func:`power_gamma`), whose standard deviation
    is ``sigma_rel * t`` at every t: it keeps ``d = (1 - delta / t)^(gamma + 1)`` at optimiser step
    ``t = trainer.global_step``, ``delta`` steps after its last update (1, or 2 for the two
    optimisers of adversarial finetuning, 0 between the batches of an accumulated step). After K
    steps of one each, step k carries the weight ``(k / K)^(gamma + 1) - ((k - 1) / K)^(gamma + 1)``.
    The step of the last update is saved, so a resumed run continues the same average.

    A task that starts from an earlier run's EMA (``pl_module.initial_ema``, e.g. adversarial
    finetuning of a distilled flow map) continues that average at the full decay under the
    classic EMA. Under the power-function EMA the profile spans this run's own steps (sigma_rel is
    relative to this run's length; the earlier run's is not known): the initial average serves
    until the first update, which replaces it (the profile gives tau = 0 no weight), so the average
    restarts from the net, which such a task starts from those same EMA weights by default.

    A run resumed with the other mode (or an older checkpoint, which counts as the classic EMA)
    continues the saved average in the configured mode, with a warning.

    Args:
        decay: classic EMA's long-run decay (0.999 when neither decay nor sigma_rel is given).
        sigma_rel: use EDM2's power-function EMA of this relative width instead (e.g. 0.05, 0.10).
    """

    def __init__(self, decay: Optional[float] = None, sigma_rel: Optional[float] = None):
        if decay is not None and sigma_rel is not None:
            raise ConfigError(f"EMA takes decay or sigma_rel, not both (got decay={decay}, sigma_rel={sigma_rel})")
        self.gamma = None
        if sigma_rel is not None:
            self.gamma = power_gamma(sigma_rel)
        else:
            decay = DEFAULT_DECAY if decay is None else decay
            if not 0.0 <= decay < 1.0:
                raise ConfigError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.sigma_rel = sigma_rel
        self.ema = None
        self._pending = None
        self._backup = None
        self.continued = False
        self.step = None  # the global step of the last update; None until training starts

    @property
    def state_key(self) -> str:
        return EMA_STATE_KEY  # the checkpoint layer finds the EMA weights under this key

    def _ensure(self, pl_module):
        if self.ema is None:
            net = pl_module.net
            # a frozen base (a LoRA student's model) is shared, not copied: it never changes
            shared = [t for k, t in net.state_dict(keep_vars=True).items() if _frozen(net, k)]
            self.ema = copy.deepcopy(net, memo={id(t): t for t in shared}).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
            initial = getattr(pl_module, "initial_ema", None)
            if self._pending is not None:
                _load(self.ema, self._pending)
                self._pending = None
            elif initial is not None:
                _load(self.ema, initial)
                self.continued = True
        return self.ema

    def decay_at(self, step: int, delta: int = 1) -> float:
        """The share of the average kept at global step ``step``, ``delta`` steps after the last update."""
        if self.sigma_rel is None:
            return self.decay if self.continued else min(self.decay, (1 + step) / (10 + step))
        if delta <= 0:
            return 1.0  # no optimiser step since the last update: nothing new to average
        if step <= delta:
            return 0.0  # the first update: the average is the net
        return (1.0 - delta / step) ** (self.gamma + 1.0)

    def on_train_start(self, trainer, pl_module):
        if self.step is None:  # a fresh run (0), or a checkpoint that did not record it
            self.step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ema = self._ensure(pl_module)
        step = trainer.global_step  # optimiser steps so far, this batch's included; restored on resume
        d = self.decay_at(step, step - (0 if self.step is None else self.step))
        self.step = step
        net = pl_module.net.state_dict()
        for k, e in _tracked(ema).items():
            p = net[k]
            if e.dtype.is_floating_point:
                e.lerp_(p.to(e.dtype), 1.0 - d)
            else:
                e.copy_(p)

    def swap_in(self, pl_module):
        """Load the EMA weights into ``pl_module.net`` (the trained weights are kept aside)."""
        if self.ema is None and self._pending is None and getattr(pl_module, "initial_ema", None) is None:
            return
        ema = self._ensure(pl_module)
        self._backup = {k: v.detach().clone() for k, v in _tracked(pl_module.net).items()}
        _load(pl_module.net, _tracked(ema))

    def swap_out(self, pl_module):
        """Put the trained weights back after :meth:`swap_in`."""
        if self._backup is not None:
            _load(pl_module.net, self._backup)
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
        return {"decay": self.decay, "sigma_rel": self.sigma_rel, "step": self.step, "continued": self.continued,
                "ema": None if self.ema is None else copy.deepcopy(_tracked(self.ema))}

    def load_state_dict(self, state_dict):
        saved = state_dict.get("sigma_rel")  # absent from checkpoints older than the power EMA: classic
        if saved != self.sigma_rel:
            log.warning("the checkpoint's EMA is %s; its average continues as %s",
                        _mode(saved), _mode(self.sigma_rel))
        self.continued = bool(state_dict.get("continued", False))
        self.step = state_dict.get("step")
        if state_dict.get("ema") is not None:
            if self.ema is not None:
                _load(self.ema, state_dict["ema"])
            else:
                self._pending = state_dict["ema"]


def _frozen(net, key: str) -> bool:
    frozen = getattr(net, "frozen_key", None)
    return bool(frozen(key)) if frozen is not None else False


def _tracked(net) -> dict:
    """The state the average tracks: all of ``net``'s but a frozen base (:meth:`ayf.nn.FlowMap.frozen_key`)."""
    return {k: v for k, v in net.state_dict().items() if not _frozen(net, k)}


def _load(net, state: dict) -> None:
    """Load the tracked ``state`` into ``net``: every tracked entry, the frozen base left as it is."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _frozen(net, k)]
    if missing or unexpected:
        raise RuntimeError(f"EMA weights do not fit the network: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _mode(sigma_rel) -> str:
    return "the classic EMA" if sigma_rel is None else f"the power-function EMA of sigma_rel {sigma_rel}"


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
