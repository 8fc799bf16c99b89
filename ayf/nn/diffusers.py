"""diffusers models as ayf teachers and student backbones (the optional extra ``ayf[diffusers]``).

A diffusers model folder (what ``model.save_pretrained(folder)`` writes: ``config.json`` and the
weights) and its scheduler config become a velocity model in ayf's convention through the exact
adapters of :mod:`ayf.nn.adapters`: a DDPM / DDIM / Euler-type scheduler gives a
:class:`ayf.nn.VPTeacher` (epsilon, v or sample prediction, the scheduler's beta schedule), a
FlowMatchEuler scheduler a :class:`ayf.nn.FlowTeacher` in its ``flow_match_euler`` form.

* :class:`DiffusersBackbone` is a :class:`ayf.nn.FlowMap` backbone that conditions on time itself
  (``conditions_on_time``): the FlowMap's s and guidance branches (zero at initialisation) are
  added to the model's own time embedding, before its first nonlinearity, so a student built on the
  teacher's weights starts at the teacher, ``F(x, t, s) = v(x, t)``.
* :class:`DiffusersTeacher` is the frozen teacher: a ``FlowMap(DiffusersBackbone, s_embedding:
  none)`` that records its config, so that ``FlowMapDistillation`` builds the student from it and
  copies the teacher's weights into it (no ``net`` to write).

Supported models (:data:`MODELS`): ``UNet2DModel``, ``UNet2DConditionModel`` (its cross-attention
input is a fixed ``context`` tensor: an encoded prompt saved with ``torch.save``) and
``DiTTransformer2DModel`` (a class-conditional transformer; with learned variance its output's
second half, the variance, is dropped). Labels go to the model's ``class_labels``; ayf's null label
(classifier-free guidance) becomes the model's ``null_label`` index (DiT: ``num_classes``, its
dropped-label row).

Nothing is downloaded: ``from_pretrained`` reads the local folder only.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional, Union

import torch
from torch import nn

from ayf.errors import ConfigError
from ayf.io import load_torch
from ayf.nn.adapters import NETWORK_OUT_OF_RANGE as OUT_OF_RANGE
from ayf.nn.adapters import FlowTeacher, VPTeacher
from ayf.nn.cond import NO_COND, Cond
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import NetTeacher

MODELS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")
#: diffusers schedulers of VP models (an alphas_cumprod schedule over discrete timesteps)
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
                 "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                 "LMSDiscreteScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                 "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                 "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LCMScheduler", "TCDScheduler")
#: diffusers schedulers of flow-matching models (t = sigma, the model predicts noise - x0)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
SCHEDULERS = VP_SCHEDULERS + FLOW_SCHEDULERS


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError("diffusers models need the optional extra: pip install 'ayf[diffusers]'") from None
    return diffusers


def load_model(path: str) -> nn.Module:
    """The diffusers model saved in the folder ``path`` (``config.json`` names its class)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        where = "" if os.path.isabs(path) else f" (from {os.getcwd()})"
        raise ConfigError(f"diffusers model folder not found: {path}{where}", missing=path)
    if not os.path.isfile(config_file):
        raise ConfigError(f"{path}: not a diffusers model folder (no config.json); save one with model.save_pretrained(folder)")
    with open(config_file) as f:
        kind = json.load(f).get("_class_name")
    if kind not in MODELS:
        raise ConfigError(f"{path}: unsupported diffusers model {kind!r}; supported: {', '.join(MODELS)}")
    return getattr(_diffusers(), kind).from_pretrained(path, local_files_only=True)


def model_from_config(config: dict) -> nn.Module:
    """A diffusers model of a supported class built from its config dict, with fresh weights."""
    kind = config.get("_class_name")
    if kind not in MODELS:
        raise ConfigError(f"unsupported diffusers model {kind!r}; supported: {', '.join(MODELS)}")
    return getattr(_diffusers(), kind).from_config(config)


def read_scheduler_config(scheduler: Union[str, dict, None], model_path: Optional[str]) -> dict:
    """A scheduler config: a dict, a ``scheduler_config.json`` file or its folder; None looks next to
    the model folder (``<model>/scheduler_config.json``, then a pipeline's ``<model>/../scheduler/``)."""
    if isinstance(scheduler, dict):
        return dict(scheduler)
    if scheduler is None:
        if model_path is None:
            raise ConfigError("a diffusers model given as a module needs its scheduler config (scheduler: FILE or dict)")
        tried = [os.path.join(model_path, "scheduler_config.json"),
                 os.path.join(os.path.dirname(os.path.normpath(model_path)), "scheduler", "scheduler_config.json")]
    else:
        tried = [os.path.join(scheduler, "scheduler_config.json") if os.path.isdir(scheduler) else scheduler]
    for file in tried:
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f)
    raise ConfigError(f"no scheduler config at {' or '.join(tried)}; give scheduler: the scheduler's folder or its "
                      "scheduler_config.json (scheduler.save_pretrained(folder) writes one)")


def adapter_for(config: dict, model, out_of_range: str = "clamp", **kw):
    """The exact adapter (:mod:`ayf.nn.adapters`) of a model under its diffusers scheduler config."""
    kind = config.get("_class_name")
    if kind in FLOW_SCHEDULERS:
        return FlowTeacher(model, "flow_match_euler", timestep_scale=float(config.get("num_train_timesteps", 1000)),
                           out_of_range=out_of_range, **kw)
    if kind in VP_SCHEDULERS:
        return VPTeacher.from_scheduler_config(model, config, out_of_range=out_of_range, **kw)
    raise ConfigError(f"unsupported diffusers scheduler {kind!r}; supported: {', '.join(SCHEDULERS)}")


class DiffusersBackbone(nn.Module):
    """A diffusers model as a :class:`ayf.nn.FlowMap` backbone: ``backbone(x, t, extra, cond)`` is the
    model's velocity in ayf's convention (through the adapter of its scheduler), with ``extra`` (the
    FlowMap's s and guidance branches) added to the model's time embedding.

    Args:
        model: a diffusers model folder (``save_pretrained``), its ``config.json`` as a dict (the model
            is built from it with fresh weights, for a caller that loads its own: ``ayf.export``),
            or the model itself (from Python).
        scheduler: the scheduler config: a ``scheduler_config.json``, its folder, or a dict (None: next
            to the model folder, see :func:`read_scheduler_config`).
        context: for ``UNet2DConditionModel``: a file holding a ``(L, D)`` tensor (``torch.save``),
            the ``encoder_hidden_states`` of every call (an encoded prompt).
        null_label: the model's class index of "no class" (None: DiT's dropped-label row when it has
            one, otherwise the model knows no unconditional prediction).
        out_of_range: a t outside the scheduler's valid range: ``clamp`` or ``error``
            (:class:`ayf.nn.adapters.AdapterTeacher`).
        math_attention: run scaled-dot-product attention on PyTorch's math kernel, the one that
            forward-mode AD (the distillation objectives' JVP) runs through.
    """

    conditions_on_time = True

    def __init__(self, model: Union[str, dict, nn.Module], scheduler: Union[str, dict, None] = None,
                 context: Optional[str] = None, null_label: Optional[int] = None, out_of_range: str = "clamp",
                 math_attention: bool = True):
        super().__init__()
        if out_of_range not in OUT_OF_RANGE:
            raise ConfigError(f"out_of_range must be one of {', '.join(OUT_OF_RANGE)}, got {out_of_range!r}")
        path = os.path.abspath(model) if isinstance(model, (str, os.PathLike)) else None
        if isinstance(model, dict):
            model = model_from_config(model)
        self.model = load_model(str(path)) if path is not None else model
        kind = type(self.model).__name__
        if kind not in MODELS:
            raise ConfigError(f"unsupported diffusers model {kind!r}; supported: {', '.join(MODELS)}")
        cfg = self.model.config
        self.kind = kind
        self.math_attention = bool(math_attention)
        self._extra = None
        if kind == "DiTTransformer2DModel":
            self.num_classes = int(cfg.num_embeds_ada_norm or 0)
            self.emb_dim = int(cfg.num_attention_heads * cfg.attention_head_dim)
            hooked = [m for m in self.model.modules() if type(m).__name__ == "CombinedTimestepLabelEmbeddings"]
            if null_label is None and hooked and hooked[0].class_embedder.embedding_table.num_embeddings > self.num_classes:
                null_label = self.num_classes
            for module in hooked:  # DiT drops labels at random in training mode; ayf's tasks do that themselves
                module.class_embedder.dropout_prob = 0.0
            size = cfg.sample_size
        else:
            if cfg.get("class_embed_type") not in (None,) or getattr(self.model, "time_embedding", None) is None:
                raise ConfigError(f"{kind} with class_embed_type {cfg.get('class_embed_type')!r} is not supported "
                                  "(supported: class labels through num_class_embeds)")
            self.num_classes = int(cfg.get("num_class_embeds") or 0)
            self.emb_dim = int(self.model.time_embedding.linear_2.out_features)
            hooked = [self.model.time_embedding]
            size = cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.data_shape = (int(cfg.in_channels), *map(int, size))
        for module in hooked:
            module.register_forward_hook(self._add_extra)
        self.null_label = null_label
        context_tensor = None
        if kind == "UNet2DConditionModel":
            if context is None:
                raise ConfigError("UNet2DConditionModel needs its cross-attention input: give context: FILE.pt, "
                                  "a (L, D) tensor saved with torch.save (an encoded prompt)")
            tensor = load_torch(context, "context (an encoded prompt)", hint="check the context path")
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or tensor.shape[1] != cfg.cross_attention_dim:
                raise ConfigError(f"context {context}: need a (L, {cfg.cross_attention_dim}) tensor, "
                                  f"got {getattr(tensor, 'shape', type(tensor).__name__)}")
            context_tensor = tensor
        elif context is not None:
            raise ConfigError(f"{kind} has no cross-attention input: leave out context")
        self.register_buffer("context", context_tensor, persistent=False)
        scheduler_config = read_scheduler_config(scheduler, None if path is None else str(path))
        self.folder, self.scheduler_kind = path, scheduler_config.get("_class_name")
        self.scheduler_config = scheduler_config
        self.adapter = adapter_for(scheduler_config, self._call, out_of_range=out_of_range, data_shape=self.data_shape,
                                   num_classes=self.num_classes, unconditional=null_label is not None)

    @property
    def t_range(self) -> tuple:
        """Where the model's time is valid, in ayf's t (its scheduler's range)."""
        return self.adapter.t_range

    @property
    def unconditional(self) -> bool:
        return self.num_classes == 0 or self.null_label is not None

    def _add_extra(self, module, inputs, output):
        return None if self._extra is None else output + self._extra.to(output.dtype)

    def class_labels(self, cond: Cond) -> Optional[torch.Tensor]:
        """The model's ``class_labels`` of ``cond.label`` (ayf's null label -> ``null_label``)."""
        if not self.num_classes:
            return None
        if cond.label is None:
            raise ConfigError("this model is class-conditional: pass a label")
        null = cond.label < 0
        if bool(null.any()):
            if self.null_label is None:
                raise ConfigError(f"this {self.kind} has no unconditional prediction (give null_label: the class index it uses for none)")
            return torch.where(null, torch.full_like(cond.label, self.null_label), cond.label)
        return cond.label

    def _call(self, x: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The model's raw output at its own input and time (the adapter's ``model``)."""
        kw = {}
        labels = self.class_labels(cond)
        if labels is not None:
            kw["class_labels"] = labels
        if self.context is not None:
            kw["encoder_hidden_states"] = self.context.to(x.dtype).expand(x.shape[0], *self.context.shape)
        kernel = contextlib.nullcontext()
        if self.math_attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            kernel = sdpa_kernel(SDPBackend.MATH)
        with kernel:
            out = self.model(x, timestep.to(x.dtype), **kw).sample
        if out.shape[1] == 2 * x.shape[1]:  # learned variance (DiT): the prediction is the first half
            out = out[:, : x.shape[1]]
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, extra: Optional[torch.Tensor] = None, cond=None):
        self._extra = extra
        try:
            return self.adapter(x, t, NO_COND if cond is None else cond)
        finally:
            self._extra = None


class DiffusersTeacher(NetTeacher):
    """A frozen diffusers model as a teacher ``v(x_t, t, cond)`` (see :class:`DiffusersBackbone` for
    the arguments). It records its net config, so that a ``FlowMapDistillation`` without ``net``
    builds the student on the same model, with the s branch, and starts it at the teacher."""

    def __init__(self, model: str, scheduler: Optional[str] = None, context: Optional[str] = None,
                 null_label: Optional[int] = None, out_of_range: str = "clamp", math_attention: bool = True):
        # recorded absolute, so that a student built on it samples from any working directory
        model, scheduler, context = (None if p is None else os.path.abspath(p) for p in (model, scheduler, context))
        args = dict(model=model, scheduler=scheduler, context=context, null_label=null_label,
                    out_of_range=out_of_range, math_attention=math_attention)
        backbone = DiffusersBackbone(**args)
        super().__init__(FlowMap(backbone, s_embedding="none"), unconditional=backbone.unconditional)
        self.t_range = backbone.t_range
        self.net_config = {"class_path": "ayf.nn.FlowMap", "init_args": {
            "backbone": {"class_path": "ayf.nn.diffusers.DiffusersBackbone", "init_args": args},
            "s_embedding": "none"}}

    def describe(self) -> list:
        b = self.net.backbone
        return [f"{b.folder} ({b.kind} under {b.scheduler_kind}): " + b.adapter.describe()[0]]
