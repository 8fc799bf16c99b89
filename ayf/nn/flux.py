"""FLUX-shaped text-to-image transformers (diffusers' ``FluxTransformer2DModel``) as ayf teachers
and flow-map students, optionally as a LoRA of the teacher (the optional extra ``ayf[text]``).

The model works on packed latents: a ``(C, H, W)`` latent becomes ``H W / 4`` tokens of ``4 C``
channels (2 x 2 patches), with rotary position ids per token; its time is FlowMatchEuler's sigma,
which is ayf's t (t = 1 noise), and its output is the velocity ``eps - x0``, ayf's, so no
conversion is needed (the scheduler's resolution-dependent shift moves only where a sampler puts
its steps). :class:`FluxBackbone` packs and unpacks, so that ayf sees ``(B, C, H, W)`` latents.

The prompt comes in the call's :class:`ayf.nn.Cond`: ``text`` (the T5 sequence embeddings,
``encoder_hidden_states``) and ``pooled`` (CLIP's pooled embedding, ``pooled_projections``); FLUX
attends to every text position, so ``text_mask`` is not used. ``null_text`` asks for the empty
prompt, whose embeddings the backbone holds (``null_prompt``). A guidance-distilled model
(``guidance_embeds``, FLUX.1-dev) reads the guidance scale as its own input: lam.

The flow map's s enters through a copy of the model's timestep embedder, fed ``t - s``, whose
last layer starts at zero (added to the model's conditioning vector with the guidance branch, if
any), so that a student built on the teacher's weights starts at the teacher. With ``lora_rank``
the student trains only LoRA adapters (peft) on the attention and feed-forward projections, and
the s branch.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ayf.errors import ConfigError
from ayf.io import load_torch
from ayf.nn.cond import NO_COND, Cond
from ayf.nn.flow_map import FlowMap
from ayf.nn.flux_layout import image_ids, pack, transformer_folder, unpack, weights_fingerprint  # noqa: F401
from ayf.nn.teachers import NetTeacher

#: the projections that LoRA adapts by default: attention (image and text streams) and feed-forward
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")


class TimeDifferenceEmbedding(nn.Module):
    """The s branch: the model's sinusoidal time projection and a copy of its timestep MLP, fed
    ``t - s`` in the model's units (x 1000); its last layer starts at zero."""

    def __init__(self, projection: nn.Module, embedder: nn.Module):
        super().__init__()
        self.projection, self.embedder = copy.deepcopy(projection), copy.deepcopy(embedder)
        self.requires_grad_(True)  # trains, whether or not the model it was copied from does
        self.zero_output()

    def zero_output(self):
        nn.init.zeros_(self.embedder.linear_2.weight)
        nn.init.zeros_(self.embedder.linear_2.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        weight = self.embedder.linear_1.weight
        return self.embedder(self.projection(u * 1000).to(weight.dtype))


class FluxBackbone(nn.Module):
    """A ``FluxTransformer2DModel`` as a :class:`ayf.nn.FlowMap` backbone on ``(B, C, H, W)`` latents.

    Args:
        model: a transformer folder or a pipeline folder (``pipe.save_pretrained``: its
            ``transformer/``), the transformer's config as a dict (fresh weights, for a caller that
            loads its own), or the model itself (from Python).
        latent_size: height and width of the latents (even); None: from the pipeline's VAE
            (``sample_size`` over its downsampling), which a lone transformer folder lacks.
        null_prompt: a ``.pt`` file with the empty prompt's embeddings ``{"text": (L, D),
            "pooled": (P,)}`` (what ``ayf shards captions`` writes): the null condition of
            classifier-free guidance. None: the model knows no unconditional prediction.
        guidance: the guidance input of a guidance-distilled model when a call gives no lam.
        lora_rank: 0: train every weight; otherwise only LoRA adapters of this rank on
            ``lora_targets`` (and the s branch).
        lora_alpha: LoRA's scale numerator (None: the rank, scale 1).
        lora_targets: module names that get adapters (:data:`LORA_TARGETS`).
        math_attention: run attention on PyTorch's math kernel, which forward-mode AD (the JVP)
            runs through.
    """

    conditions_on_time = True

    def __init__(self, model: Union[str, dict, nn.Module], latent_size: Optional[int] = None,
                 null_prompt: Optional[str] = None, guidance: float = 3.5, lora_rank: int = 0,
                 lora_alpha: Optional[float] = None, lora_targets: Sequence[str] = LORA_TARGETS,
                 math_attention: bool = True):
        super().__init__()
        from ayf.nn.diffusers import _diffusers

        diffusers = _diffusers()
        path = None
        if isinstance(model, (str, os.PathLike)):
            path = transformer_folder(os.path.abspath(model))
            model = diffusers.FluxTransformer2DModel.from_pretrained(path, local_files_only=True)
        elif isinstance(model, dict):
            model = diffusers.FluxTransformer2DModel.from_config(model)
        if type(model).__name__ != "FluxTransformer2DModel":
            raise ConfigError(f"unsupported transformer {type(model).__name__!r}; supported: FluxTransformer2DModel")
        self.model, self.folder = model, path
        cfg = model.config
        if cfg.in_channels % 4 or cfg.patch_size != 1:
            raise ConfigError(f"a FLUX transformer with in_channels {cfg.in_channels} and patch_size {cfg.patch_size} "
                              "does not take 2 x 2 packed latents")
        if latent_size is None:
            latent_size = self._latent_size_from_pipeline(path)
        if int(latent_size) % 2:
            raise ConfigError(f"latent_size must be even (2 x 2 patches), got {latent_size}")
        self.data_shape = (cfg.in_channels // 4, int(latent_size), int(latent_size))
        self.emb_dim = int(model.inner_dim)
        self.num_classes = 0
        self.guided = bool(cfg.guidance_embeds)
        self.guidance = float(guidance)
        self.text_dim, self.pooled_dim = int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)
        self.math_attention = bool(math_attention)
        self._extra = None
        model.time_text_embed.register_forward_hook(self._add_extra)
        null = None if null_prompt is None else self._null_prompt(null_prompt)
        self.register_buffer("null_text", None if null is None else null[0], persistent=False)
        self.register_buffer("null_pooled", None if null is None else null[1], persistent=False)
        self.lora_rank = int(lora_rank)
        self._fingerprint = None  # of the frozen base; loading weights into the model forgets it
        model.register_load_state_dict_post_hook(lambda *_: setattr(self, "_fingerprint", None))
        if self.lora_rank:
            self._add_lora(self.lora_rank, lora_alpha, lora_targets)

    @staticmethod
    def _latent_size_from_pipeline(path: Optional[str]) -> int:
        vae = None if path is None else os.path.join(os.path.dirname(path), "vae", "config.json")
        if vae is None or not os.path.isfile(vae):
            raise ConfigError("give latent_size: the latents' height and width (no pipeline VAE config to read it from)")
        with open(vae) as f:
            config = json.load(f)
        return int(config["sample_size"]) // 2 ** (len(config["block_out_channels"]) - 1)

    def _null_prompt(self, path: str):
        data = load_torch(path, "the empty prompt's embeddings", hint="check null_prompt")
        text, pooled = (data.get(k) if isinstance(data, dict) else None for k in ("text", "pooled"))
        if not isinstance(text, torch.Tensor) or text.ndim != 2 or text.shape[1] != self.text_dim \
                or not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (self.pooled_dim,):
            raise ConfigError(f"null_prompt {path}: need {{'text': (L, {self.text_dim}), 'pooled': ({self.pooled_dim},)}}")
        return text, pooled

    def _add_lora(self, rank: int, alpha: Optional[float], targets: Sequence[str]) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise ConfigError("LoRA students need peft: pip install 'ayf[text]'") from None
        names = {n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        wanted = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        if not wanted:
            raise ConfigError(f"no linear layer of the transformer matches lora_targets {list(targets)}")
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=sorted(wanted), init_lora_weights=True)
        inject_adapter_in_model(config, self.model)
        for name, p in self.model.named_parameters():
            p.requires_grad_("lora_" in name)

    @property
    def pipeline(self) -> Optional[str]:
        """The pipeline folder the transformer sits in (with its text encoders), or None."""
        if self.folder is None:
            return None
        parent = os.path.dirname(self.folder)
        return parent if os.path.isdir(os.path.join(parent, "text_encoder")) else None

    def frozen_key(self, key: str) -> bool:
        """A LoRA student's base weights (its model's, not the adapters'): loaded from the folder,
        never trained, left out of checkpoints."""
        return self.lora_rank > 0 and key.startswith("model.") and "lora_" not in key

    def base_record(self) -> Optional[dict]:
        """``{"folder", "fingerprint"}`` of a LoRA student's base model; None for a full model."""
        if not self.lora_rank:
            return None
        if self._fingerprint is None:  # the base never trains: hashed once per load, not per record
            base = {k.replace(".base_layer.", "."): v for k, v in self.model.state_dict().items() if "lora_" not in k}
            self._fingerprint = weights_fingerprint(base)
        return {"folder": self.folder, "fingerprint": self._fingerprint}

    def s_embedding(self) -> nn.Module:
        """The s branch (:class:`TimeDifferenceEmbedding`) that :class:`ayf.nn.FlowMap` uses for this backbone."""
        embed = self.model.time_text_embed
        return TimeDifferenceEmbedding(embed.time_proj, embed.timestep_embedder)

    def _add_extra(self, module, inputs, output):
        return None if self._extra is None else output + self._extra.to(output.dtype)

    def prompt(self, cond: Cond, dtype):
        """``(encoder_hidden_states, pooled_projections)`` of ``cond``, the empty prompt where it asks."""
        if cond.text is None or cond.pooled is None:
            raise ConfigError("this transformer is text-conditional: pass the prompt's embeddings (text and pooled)")
        text, pooled = cond.text.to(dtype), cond.pooled.to(dtype)
        if text.shape[-1] != self.text_dim or pooled.shape[-1] != self.pooled_dim:
            raise ConfigError(f"prompt embeddings of width {text.shape[-1]} / {pooled.shape[-1]} do not fit this "
                              f"transformer ({self.text_dim} / {self.pooled_dim}): were they made by its pipeline's text encoders?")
        if cond.null_text is not None and bool(cond.null_text.any()):
            if self.null_text is None:
                raise ConfigError("this transformer has no empty-prompt embeddings (null_prompt) for the unconditional prediction")
            null = self.null_text.to(dtype)
            if null.shape[0] != text.shape[1]:
                raise ConfigError(f"the empty prompt has {null.shape[0]} positions, the prompts {text.shape[1]}")
            pick = cond.null_text.view(-1, 1, 1)
            text = torch.where(pick, null.expand_as(text), text)
            pooled = torch.where(pick[:, 0], self.null_pooled.to(dtype).expand_as(pooled), pooled)
        return text, pooled

    def forward(self, x: torch.Tensor, t: torch.Tensor, extra: Optional[torch.Tensor] = None, cond=None):
        cond = NO_COND if cond is None else cond
        b, _, h, w = x.shape
        text, pooled = self.prompt(cond, x.dtype)
        kw = {}
        if self.guided:
            lam = torch.full_like(t, self.guidance) if cond.lam is None else cond.lam.to(t.dtype).expand_as(t)
            kw["guidance"] = lam.to(x.dtype)
        kernel = contextlib.nullcontext()
        if self.math_attention:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            kernel = sdpa_kernel(SDPBackend.MATH)
        self._extra = extra
        try:
            with kernel:
                out = self.model(pack(x), encoder_hidden_states=text, pooled_projections=pooled,
                                 timestep=t.to(x.dtype).expand(b), img_ids=image_ids(h, w, x.device, x.dtype),
                                 txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype), **kw).sample
        finally:
            self._extra = None
        return unpack(out, (out.shape[-1] // 4, h, w))


class FluxTeacher(NetTeacher):
    """A frozen FLUX-shaped transformer as a teacher ``v(x_t, t, cond)`` (arguments as for
    :class:`FluxBackbone`; ``model`` a transformer or pipeline folder). It records its net config,
    so that a ``FlowMapDistillation`` without ``net`` builds a student on the same model (every
    weight trained); a LoRA student is a ``net`` of its own: ``FlowMap(FluxBackbone(model,
    lora_rank=R))``, which starts from the same weights."""

    def __init__(self, model: str, latent_size: Optional[int] = None, null_prompt: Optional[str] = None,
                 guidance: float = 3.5, math_attention: bool = True):
        model, null_prompt = (None if p is None else os.path.abspath(p) for p in (model, null_prompt))
        args = dict(model=model, latent_size=latent_size, null_prompt=null_prompt, guidance=guidance,
                    math_attention=math_attention)
        backbone = FluxBackbone(**args)
        super().__init__(FlowMap(backbone, s_embedding="none"), unconditional=null_prompt is not None)
        self.net_config = {"class_path": "ayf.nn.FlowMap", "init_args": {
            "backbone": {"class_path": "ayf.nn.flux.FluxBackbone", "init_args": args}, "s_embedding": "none"}}

    def describe(self) -> list:
        b = self.net.backbone
        size = sum(p.numel() for p in b.model.parameters()) / 1e6
        guided = ", lam its guidance input" if b.guided else ""
        return [f"{b.folder} (FluxTransformer2DModel, {size:.3g}M parameters, latents {b.data_shape}{guided})"]
