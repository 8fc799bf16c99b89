"""Teachers: frozen velocity models with one signature ``v(x_t, t, cond) -> (B, *D)`` in ayf's
time convention (docs/maths.md §1)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ayf.errors import ConfigError
from ayf.math.analytic import MixtureOracle
from ayf.math.guidance import guided_velocity
from ayf.nn.cond import NO_COND, Cond
from ayf.nn.flow_map import FlowMap


class Teacher(nn.Module):
    """Base class. Subclasses set ``data_shape`` and implement ``forward(x, t, cond=None)``.

    Attributes:
        data_shape: shape of one example (None until known, e.g. a mixture read from the data).
        num_classes: class labels the teacher knows (0: unconditional).
        unconditional: whether it also knows the unconditional velocity (the null label), as
            classifier-free guidance needs.
        reads_lam: whether it reads the guidance scale ``cond.lam`` (a :class:`GuidedTeacher`).
    """

    data_shape: Optional[tuple] = None
    num_classes: int = 0
    unconditional: bool = False
    reads_lam: bool = False

    def bind_data(self, datamodule) -> None:
        """Called by the distillation task with the run's data module before training."""

    def describe(self) -> list:
        """Lines that say what this teacher is and what it read (``ayf fit`` prints them)."""
        return [f"{type(self).__name__}: {_classes(self.num_classes)}"]

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher is always in eval mode


def _classes(n: int) -> str:
    return f"{n} classes" if n else "unconditional"


class MixtureTeacher(Teacher):
    """The exact velocity of an isotropic Gaussian mixture (closed form, float64 inside).

    Args:
        mixture: mapping with keys ``means`` (K x D), ``stds`` (K) and ``weights`` (K). Leave it
            out to read the mixture of the run's ``ayf.data.GaussianMixture`` data module.
    """

    unconditional = True

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

    def describe(self) -> list:
        n = 0 if self.oracle is None else len(self.oracle.weights)
        where = "of the data module" if self.oracle is None else f"of {n} component{'s' if n != 1 else ''}"
        return [f"the exact velocity of a Gaussian mixture {where} (MixtureTeacher)"]

    def forward(self, x, t, cond: Optional[Cond] = None):
        if self.oracle is None:
            raise ConfigError("MixtureTeacher has no mixture yet")
        return self.oracle.velocity(x.double(), t.double()).to(x.dtype)


class NetTeacher(Teacher):
    """A velocity network (a :class:`ayf.nn.FlowMap` without s branch) used as a frozen teacher.

    Args:
        net: the velocity network.
        unconditional: the net also learned the unconditional velocity (trained with label dropout).
        freeze: turn off the net's gradients and put it in eval mode (off: a view of a net that
            is still training, e.g. to sample it).
    """

    def __init__(self, net: FlowMap, unconditional: bool = False, freeze: bool = True):
        super().__init__()
        self.net = net.requires_grad_(False).eval() if freeze else net
        self.data_shape = tuple(net.data_shape)
        self.num_classes = net.num_classes
        self.unconditional = self.num_classes == 0 or bool(unconditional)
        self.reads_lam = net.reads_lam  # a guidance-distilled network reads lam as its own input

    def forward(self, x, t, cond: Optional[Cond] = None):
        return self.net.velocity(x, t, cond)


class GuidedTeacher(Teacher):
    """A guided velocity ``v = lam * v_strong + (1 - lam) * v_weak`` (docs/maths.md §6), with lam
    read from ``cond.lam`` (none: the plain teacher, lam = 1).

    With ``weak`` given this is autoguidance: the weak teacher is a weaker model of the same task
    (a smaller network or an earlier checkpoint), or an unconditional model of the same data
    (classifier-free guidance with a separate unconditional network, as EDM2 does it; it ignores
    the labels). Without it, classifier-free guidance: the weak
    prediction is the same teacher's unconditional one (null label), which needs a teacher
    trained with ``label_dropout``. This is the one place where a guided teacher is assembled
    and where the combination is checked.

    Args:
        teacher: the strong teacher.
        weak: the weak teacher of autoguidance (leave out for classifier-free guidance).
    """

    reads_lam = True

    def __init__(self, teacher: Teacher, weak: Optional[Teacher] = None):
        super().__init__()
        self.teacher, self.weak = teacher, weak
        self.num_classes = teacher.num_classes
        self.unconditional = teacher.unconditional
        self._check()

    @property
    def net(self):
        """The strong teacher's network (a student copies it)."""
        return getattr(self.teacher, "net", None)

    def _check(self):
        self.data_shape = self.teacher.data_shape
        if self.weak is None:
            if self.teacher.num_classes == 0:
                raise ConfigError("classifier-free guidance needs a class-conditional teacher; "
                                  "give GuidedTeacher a `weak` teacher for autoguidance")
            if not self.teacher.unconditional:
                raise ConfigError("classifier-free guidance needs a teacher trained with label_dropout > 0 "
                                  "(it never learned the unconditional velocity)")
            return
        if self.weak.num_classes not in (0, self.teacher.num_classes):
            raise ConfigError(f"weak teacher has {self.weak.num_classes} classes but the teacher has "
                              f"{self.teacher.num_classes}: autoguidance needs a model of the same task "
                              "(or an unconditional one, as EDM2's classifier-free guidance uses)")
        shapes = (self.weak.data_shape, self.teacher.data_shape)
        if None not in shapes and tuple(shapes[0]) != tuple(shapes[1]):
            raise ConfigError(f"weak teacher data shape {tuple(shapes[0])} differs from the teacher's "
                              f"{tuple(shapes[1])}: autoguidance needs a model of the same task")

    def bind_data(self, datamodule) -> None:
        for t in (self.teacher, self.weak):
            if t is not None:
                t.bind_data(datamodule)
        self._check()

    def describe(self) -> list:
        weak = (["weak (autoguidance): " + line for line in self.weak.describe()] if self.weak is not None
                else ["weak: the teacher's own unconditional velocity (classifier-free guidance)"])
        return ["teacher: " + line for line in self.teacher.describe()] + weak

    def forward(self, x, t, cond: Optional[Cond] = None):
        cond = NO_COND if cond is None else cond
        lam, plain = cond.lam, cond.with_(lam=None)
        strong = self.teacher(x, t, plain)
        if lam is None:
            return strong
        weak = self.weak(x, t, plain) if self.weak is not None else self.teacher(x, t, plain.unconditional())
        return guided_velocity(strong, weak, lam)


def velocity_teacher(net: FlowMap, label_dropout: float = 0.0, lam=None, freeze: bool = True) -> Teacher:
    """A velocity net as the model to sample at guidance scale ``lam``: the plain net for lam
    None or 1, else classifier-free guidance (:class:`GuidedTeacher`, which checks that the net
    learned the unconditional velocity, i.e. was trained with ``label_dropout``)."""
    plain = NetTeacher(net, unconditional=bool(label_dropout), freeze=freeze)
    return plain if lam is None or lam == 1 else GuidedTeacher(plain)
