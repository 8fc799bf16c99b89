"""Teachers: frozen velocity models ``v_phi(x_t, t, label) -> (B, *D)`` in ayf's convention."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ayf.errors import ConfigError
from ayf.math.analytic import MixtureOracle
from ayf.math.guidance import guided_velocity
from ayf.nn.flow_map import NULL_LABEL


class Teacher(nn.Module):
    """Base class. Subclasses set ``data_shape`` and implement ``forward(x, t, label=None)``;
    a guided teacher (``guided = True``) also takes ``guidance``, the scale lam ``(B,)``."""

    data_shape: Optional[tuple] = None
    num_classes: int = 0
    guided: bool = False
    #: whether the teacher knows the unconditional velocity (null label), as CFG needs
    unconditional: bool = False

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

        self.net, meta = load_network(ckpt_path, use_ema=use_ema, kinds=("FlowMatching",), what="teacher checkpoint",
                                      hint="train a teacher with `ayf fit`, or pass its path, e.g. "
                                      "--model.teacher.init_args.ckpt_path PATH")
        self.net.requires_grad_(False)
        self.data_shape = self.net.data_shape
        self.num_classes = self.net.num_classes
        self.unconditional = self.num_classes == 0 or bool(meta.get("label_dropout"))
        self.ckpt_path = ckpt_path

    def forward(self, x, t, label=None):
        return self.net.velocity(x, t, label=label)


class GuidedTeacher(Teacher):
    """A guided velocity ``v = lam * v_strong + (1 - lam) * v_weak`` (spec section 6).

    With ``weak`` given this is autoguidance: the weak teacher is a weaker model of the same task
    (a smaller network or an earlier checkpoint). Without it, classifier-free guidance: the weak
    prediction is the same teacher's unconditional one (null label), which needs a teacher
    trained with ``label_dropout``. lam = 1 is the plain teacher.

    Args:
        teacher: the strong teacher.
        weak: the weak teacher of autoguidance (leave out for classifier-free guidance).
    """

    guided = True

    def __init__(self, teacher: Teacher, weak: Optional[Teacher] = None):
        super().__init__()
        self.teacher, self.weak = teacher, weak
        self.num_classes = teacher.num_classes
        if weak is None:
            if teacher.num_classes == 0:
                raise ConfigError("classifier-free guidance needs a class-conditional teacher; "
                                  "give GuidedTeacher a `weak` teacher for autoguidance")
            if not teacher.unconditional:
                raise ConfigError("classifier-free guidance needs a teacher trained with label_dropout > 0 "
                                  "(it never learned the unconditional velocity)")
        self._check()

    @property
    def net(self):
        """The strong teacher's network (a student copies it)."""
        return getattr(self.teacher, "net", None)

    def _check(self):
        self.data_shape = self.teacher.data_shape
        if self.weak is None:
            return
        if self.weak.num_classes != self.teacher.num_classes:
            raise ConfigError(f"weak teacher has {self.weak.num_classes} classes but the teacher has "
                              f"{self.teacher.num_classes}: autoguidance needs a model of the same task")
        shapes = (self.weak.data_shape, self.teacher.data_shape)
        if None not in shapes and tuple(shapes[0]) != tuple(shapes[1]):
            raise ConfigError(f"weak teacher data shape {tuple(shapes[0])} differs from the teacher's "
                              f"{tuple(shapes[1])}: autoguidance needs a model of the same task")

    def bind_data(self, datamodule) -> None:
        for t in (self.teacher, self.weak):
            if t is not None:
                t.bind_data(datamodule)
        self._check()

    def forward(self, x, t, label=None, guidance=None):
        strong = self.teacher(x, t, label)
        if guidance is None:
            return strong
        if self.weak is not None:
            weak = self.weak(x, t, label)
        else:
            weak = self.teacher(x, t, torch.full_like(label, NULL_LABEL))
        return guided_velocity(strong, weak, guidance)
