"""The FlowMap wrapper: owns time conditioning and the parametrisation (docs/maths.md §2)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ayf.errors import ConfigError
from ayf.math.flow_map import apply_flow_map
from ayf.nn.cond import NO_COND, NULL_LABEL, Cond  # noqa: F401  (NULL_LABEL: re-exported)
from ayf.nn.embeddings import ScalarEmbedding

S_EMBEDDINGS = ("t_minus_s", "s", "none")


class FlowMap(nn.Module):
    """Average velocity ``F(x_t, t, s)`` of a flow map ``f = x_t + (s - t) F`` around a backbone.

    The conditioning vector is ``emb(t) + emb_s(t - s or s) + emb(label) + emb(lam - 1)``, with
    label and lam read from the call's :class:`ayf.nn.Cond`.
    A negative label (:data:`NULL_LABEL`) contributes no class embedding: the unconditional
    model that classifier-free guidance needs (train it with ``FlowMatching(label_dropout=...)``).
    The s and guidance branches start at zero, so a student copied from a teacher (which has
    ``s_embedding: none``) satisfies ``F(x, t, s) = v(x, t)`` for every s at init.

    A backbone with its own time conditioning (``conditions_on_time = True``: a converted EDM2
    network, a diffusers model) is called ``backbone(x, t, extra, cond)`` and returns the
    velocity-parametrised output itself; its architecture fixes how t and the label enter, so
    FlowMap adds only the s and guidance branches, as ``extra`` (None for a velocity model), which
    the backbone adds to its conditioning vector before its first nonlinearity.

    Args:
        backbone: network ``(x, emb, cond) -> output``; must expose ``emb_dim`` and ``data_shape``.
        s_embedding: how the target time enters: ``t_minus_s`` (default), ``s``, or ``none``
            (a velocity model, e.g. a flow-matching teacher).
        num_classes: number of class labels (0: unconditional).
        guidance_input: the net takes a guidance scale lam (``cond.lam``) as an input: a student
            distilled from a guided teacher.
        num_freqs: Fourier frequencies of each scalar embedding.
        max_freq: largest Fourier frequency (cycles per unit time).
    """

    def __init__(
        self,
        backbone: nn.Module,
        s_embedding: str = "t_minus_s",
        num_classes: int = 0,
        guidance_input: bool = False,
        num_freqs: int = 16,
        max_freq: float = 16.0,
    ):
        super().__init__()
        if s_embedding not in S_EMBEDDINGS:
            raise ConfigError(f"unknown s_embedding {s_embedding!r}; choose one of {', '.join(S_EMBEDDINGS)}")
        for attr in ("emb_dim", "data_shape"):
            if not hasattr(backbone, attr):
                raise ConfigError(f"backbone {type(backbone).__name__} must define `{attr}`")
        self.backbone = backbone
        self.s_embedding = s_embedding
        self.num_classes = num_classes
        self.guidance_input = guidance_input
        emb = backbone.emb_dim
        self.native = bool(getattr(backbone, "conditions_on_time", False))
        if self.native:
            own = int(getattr(backbone, "num_classes", 0))
            if num_classes not in (0, own):
                raise ConfigError(f"num_classes {num_classes} disagrees with the backbone's {own}")
            self.num_classes = num_classes = own
        self.t_emb = None if self.native else ScalarEmbedding(emb, num_freqs, max_freq)
        self.s_emb = None
        if s_embedding != "none":  # a backbone may bring its own s branch (zero at its output)
            make = getattr(backbone, "s_embedding", None)
            self.s_emb = make() if make is not None else ScalarEmbedding(emb, num_freqs, max_freq, zero_init=True)
        self.label_emb = nn.Embedding(num_classes, emb) if num_classes > 0 and not self.native else None
        self.guidance_emb = ScalarEmbedding(emb, num_freqs, 4.0, zero_init=True) if guidance_input else None

    @property
    def data_shape(self) -> tuple:
        return tuple(self.backbone.data_shape)

    @property
    def is_flow_map(self) -> bool:
        return self.s_emb is not None

    def frozen_key(self, key: str) -> bool:
        """Whether a state entry belongs to a frozen base that the backbone loads from its own
        folder (a LoRA student's model): checkpoints and the EMA leave it out."""
        frozen = getattr(self.backbone, "frozen_key", None)
        return key.startswith("backbone.") and frozen is not None and bool(frozen(key[len("backbone."):]))

    def base_record(self) -> Optional[dict]:
        """The frozen base's folder and weights fingerprint (None without a frozen base)."""
        record = getattr(self.backbone, "base_record", None)
        return record() if record is not None else None

    @property
    def reads_text(self) -> bool:
        """The net is text-conditional: its backbone reads a prompt's embeddings from ``cond``."""
        return hasattr(self.backbone, "text_dim")

    @property
    def reads_lam(self) -> bool:
        """The net reads the guidance scale ``cond.lam``: through its guidance input, or as a
        guidance-distilled backbone's own input (``backbone.guided``: FLUX.1-dev)."""
        return self.guidance_emb is not None or bool(getattr(self.backbone, "guided", False))

    def forward(self, x, t, s=None, cond: Optional[Cond] = None):
        """``F(x, t, s)``; x ``(B, *D)``, t and s ``(B,)``. ``s = None`` means s = t: the
        instantaneous velocity ``v(x, t)`` (a velocity model, which has no s branch, ignores s)."""
        cond = NO_COND if cond is None else cond
        if self.native:
            return self.backbone(x, t, self._branches(t, s, cond, None), cond)
        emb = self._branches(t, s, cond, self.t_emb(t))
        if self.label_emb is not None:
            if cond.label is None:
                raise ConfigError("this model is class-conditional: pass a label")
            known = (cond.label >= 0).unsqueeze(1)
            emb = emb + self.label_emb(cond.label.clamp(min=0)) * known.to(emb.dtype)
        return self.backbone(x, emb, cond)

    def _branches(self, t, s, cond: Cond, emb):
        """``emb`` plus the s and guidance branches (None stays None when there are none)."""
        def add(a, b):
            return b if a is None else a + b

        if self.s_emb is not None:
            s = t if s is None else s
            emb = add(emb, self.s_emb(t - s if self.s_embedding == "t_minus_s" else s))
        if self.guidance_emb is not None:
            lam = torch.ones_like(t) if cond.lam is None else cond.lam.to(t.dtype).expand_as(t)
            emb = add(emb, self.guidance_emb(lam - 1.0))
        elif not getattr(self.backbone, "guided", False):  # a guidance-distilled backbone reads lam itself
            self.check_lam(cond.lam)
        return emb

    def check_lam(self, lam) -> None:
        """A guidance scale given to a net without the guidance input is a ConfigError."""
        if lam is not None and self.guidance_emb is None:
            raise ConfigError("this network was not distilled with guidance (no guidance input): "
                              "leave out the guidance scale")

    def velocity(self, x, t, cond: Optional[Cond] = None):
        """Instantaneous velocity ``v(x, t) = F(x, t, t)``."""
        return self(x, t, t, cond)

    def flow(self, x, t, s, cond: Optional[Cond] = None):
        """``f(x, t, s) = x + (s - t) F(x, t, s)``."""
        return apply_flow_map(x, t, s, self(x, t, s, cond))

    @torch.no_grad()
    def init_from_teacher(self, teacher: "FlowMap") -> None:
        """Copy a teacher's weights so that at init ``F(x, t, s) = v_teacher(x, t)`` for all s.

        Every teacher weight must exist here with the same shape (a layer that LoRA adapts here
        holds it as its ``base_layer``); the weights the teacher lacks (s and guidance branches, LoRA
        adapters, which start at zero) keep theirs, the branches zeroed at their output.
        """
        own = self.state_dict()
        theirs = {base_layer_key(k, own): v for k, v in teacher.state_dict().items()}
        bad = [k for k, v in theirs.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ConfigError(
                f"student and teacher architectures differ (e.g. {bad[0]}); give the student the "
                "teacher's backbone and sizes"
            )
        own.update(theirs)
        self.load_state_dict(own)
        for branch in (self.s_emb, self.guidance_emb):
            if branch is not None:
                branch.zero_output()


def base_layer_key(key: str, own: dict) -> str:
    """``key`` of a plain layer's weight as the same layer names it when LoRA (peft) adapts it:
    ``a.b.weight`` -> ``a.b.base_layer.weight``, where ``own`` has that and not ``key``."""
    if key in own:
        return key
    head, _, leaf = key.rpartition(".")
    lora = f"{head}.base_layer.{leaf}"
    return lora if lora in own else key
