"""Teachers: frozen velocity models ``v_phi(x_t, t, label) -> (B, *D)`` in ayf's convention."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ayf.errors import ConfigError
from ayf.math.analytic import MixtureOracle


class Teacher(nn.Module):
    """Base class. Subclasses set ``data_shape`` and implement ``forward(x, t, label=None)``."""

    data_shape: Optional[tuple] = None
    num_classes: int = 0

    def bind_data(self, datamodule) -> None:
        """Called by the distillation task with the run's data module before training."""

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher is always in eval mode


class MixtureTeacher(Teacher):
    """The exact velocity of an isotropic Gaussian mixture (closed form, float64 inside).

    Args:
        mixture: mapping with keys ``means`` (K x D), ``stds`` (K) and ``weights`` (K). Leave it
            out to read the mixture of the run's ``ayf.data.GaussianMixture`` data module.
    """

    def __init__(self, mixture: Optional[dict] = None):
        super().__init__()
        self.oracle = None
        if mixture is not None:
            self._set(mixture)

    def _set(self, mixture):
        try:
            self.oracle = MixtureOracle.from_config(mixture)
        except ValueError as err:
            raise ConfigError(f"teacher mixture: {err}") from None
        self.data_shape = (self.oracle.dim,)

    def bind_data(self, datamodule) -> None:
        if self.oracle is None:
            mixture = getattr(datamodule, "mixture", None)
            if mixture is None:
                raise ConfigError("MixtureTeacher needs `mixture`, or a GaussianMixture data module to read it from")
            self._set(mixture)

    def forward(self, x, t, label=None):
        if self.oracle is None:
            raise ConfigError("MixtureTeacher has no mixture yet")
        return self.oracle.velocity(x.double(), t.double()).to(x.dtype)


class CheckpointTeacher(Teacher):
    """A velocity network loaded from a ``FlowMatching`` checkpoint written by ``ayf fit``.

    Args:
        ckpt_path: path of the FlowMatching checkpoint.
        use_ema: use the EMA weights saved in the checkpoint when it has them.
    """

    def __init__(self, ckpt_path: str, use_ema: bool = True):
        super().__init__()
        from ayf.nn.io import load_network

        self.net, meta = load_network(ckpt_path, use_ema=use_ema, kinds=("FlowMatching",))
        self.net.requires_grad_(False)
        self.data_shape = self.net.data_shape
        self.num_classes = self.net.num_classes
        self.ckpt_path = ckpt_path

    def forward(self, x, t, label=None):
        return self.net.velocity(x, t, label=label)
