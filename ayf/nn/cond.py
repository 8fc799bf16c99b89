"""The condition of a model call: everything beyond ``(x, t, s)`` that a network is given.

One value travels unchanged through the samplers, :class:`ayf.nn.FlowMap`, every teacher and
every objective, so that adding a kind of condition (text embeddings, say) touches this file and
the modules that read it, not every function signature on the way.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

NULL_LABEL = -1  # "no class": the unconditional prediction of classifier-free guidance
TEXT_FIELDS = ("text", "text_mask", "pooled")  # a prompt's fields, as batches and shards name them


@dataclass(frozen=True)
class Cond:
    """What a model is conditioned on, per example.

    Attributes:
        label: class labels ``(B,)`` (long); :data:`NULL_LABEL` asks for the unconditional
            prediction. None for an unconditional model.
        lam: guidance scales lambda ``(B,)`` of a guided teacher, and of a flow map distilled
            from one (docs/maths.md §6). None: no guidance (lambda = 1).
        text: a prompt's sequence embeddings ``(B, L, D)`` (a text encoder's last hidden states).
        text_mask: which of the ``L`` positions are tokens of the prompt ``(B, L)`` (bool); None:
            all of them.
        pooled: the prompt's pooled embedding ``(B, P)``.
        null_text: ``(B,)`` bool: True asks for the empty prompt instead of ``text`` and ``pooled``
            (the null condition of classifier-free guidance, whose embeddings the text-conditional
            model holds). None: no example asks for it.
    """

    label: Optional[torch.Tensor] = None
    lam: Optional[torch.Tensor] = None
    text: Optional[torch.Tensor] = None
    text_mask: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None
    null_text: Optional[torch.Tensor] = None

    def with_(self, **changes) -> "Cond":
        """A copy with some fields replaced."""
        return Cond(**{f.name: changes.get(f.name, getattr(self, f.name)) for f in fields(self)})

    @property
    def has_text(self) -> bool:
        return self.text is not None or self.pooled is not None

    def unconditional(self) -> "Cond":
        """The same condition with every label set to :data:`NULL_LABEL` and every prompt to the
        empty one."""
        cond = self if self.label is None else self.with_(label=torch.full_like(self.label, NULL_LABEL))
        if self.has_text:
            some = self.text if self.text is not None else self.pooled
            cond = cond.with_(null_text=torch.ones(some.shape[0], dtype=torch.bool, device=some.device))
        return cond

    def drop(self, drop: torch.Tensor) -> "Cond":
        """The condition with the examples where ``drop`` ``(B,)`` is True made unconditional
        (label :data:`NULL_LABEL`, empty prompt): condition dropout for classifier-free guidance."""
        cond = self
        if self.label is not None:
            cond = cond.with_(label=torch.where(drop, torch.full_like(self.label, NULL_LABEL), self.label))
        if self.has_text:
            null = drop if self.null_text is None else drop | self.null_text
            cond = cond.with_(null_text=null)
        return cond

    def _map(self, fn) -> "Cond":
        return Cond(**{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                       for f in fields(self)})

    def __getitem__(self, index) -> "Cond":
        """The condition of a slice of the batch (``cond[i:j]``)."""
        return self._map(lambda v: v[index])

    def to(self, device) -> "Cond":
        return self._map(lambda v: v.to(device))

    @staticmethod
    def build(batch: int, label=None, lam=None, device=None, dtype=torch.float32, **text) -> "Cond":
        """A condition for ``batch`` examples; a scalar label or lambda is repeated per example;
        ``text`` (the text fields) are taken as they are."""
        if label is not None:
            label = torch.as_tensor(label, dtype=torch.long, device=device)
            label = label.expand(batch) if label.ndim == 0 else label
        if lam is not None:
            lam = torch.as_tensor(lam, dtype=dtype, device=device)
            lam = lam.expand(batch) if lam.ndim == 0 else lam
        return Cond(label=label, lam=lam, **text)


NO_COND = Cond()
