"""Distilled flow maps as diffusers models: what ``ayf export`` writes and what diffusers reads.

A flow map ``f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)`` (docs/maths.md §2) is exactly what
diffusers' ``FlowMapEulerDiscreteScheduler`` steps: its ``step(out, timestep, sample, r_timestep)``
returns ``sample - (sigma_t - sigma_r) * out``, and its sigma is ayf's t (1 = noise, 0 = data).
:class:`FlowMapModel` is a diffusers ``ModelMixin`` around an ayf :class:`ayf.nn.FlowMap` whose
``forward(sample, timestep, r_timestep)`` returns ``F`` with both times in the scheduler's units
(``timestep = t * num_train_timesteps``), so that a loop of ``scheduler.step`` samples it at any
number of steps; :class:`FlowMapPipeline` is that loop in one call.

An exported folder is self-contained: the network's ``class_path``/``init_args`` config (a
diffusers backbone's model and scheduler configs written into it, not their folders), the EMA
weights in safetensors, and the scheduler's config. Loading it needs ayf and diffusers, no file
the export came from.
"""
from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ayf.checkpoints import FLOW_MAP_KINDS, TEACHER_KINDS, build_object, network_from, read_checkpoint
from ayf.encoders import VAEEncoder, encoder_from_manifest
from ayf.errors import ConfigError
from ayf.figures import pipeline_output as to_output
from ayf.nn.cond import Cond
from ayf.nn.flow_map import FlowMap

try:
    from diffusers import AutoencoderKL, DiffusionPipeline, FlowMapEulerDiscreteScheduler, ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError:  # pragma: no cover - the optional extra is missing
    raise ConfigError("ayf export and its diffusers classes need the optional extra: pip install 'ayf[diffusers]'") from None

#: diffusers' timestep units: ``timestep = t * NUM_TRAIN_TIMESTEPS`` (the scheduler's default)
NUM_TRAIN_TIMESTEPS = 1000
DIFFUSERS_BACKBONE = "ayf.nn.diffusers.DiffusersBackbone"


@dataclass
class FlowMapOutput(BaseOutput):
    """``sample``: the average velocity ``F(x_t, t, s)``, what the scheduler's ``step`` takes."""

    sample: torch.Tensor


class FlowMapModel(ModelMixin, ConfigMixin):
    """An ayf flow map as a diffusers model (``FlowMapModel.from_pretrained(folder)``).

    Args:
        network: the flow map's ``class_path``/``init_args`` config, self-contained (no file paths).
        data_shape: the shape of one sample (latent or pixel), without the batch.
        num_train_timesteps: the scheduler's time scale (``timestep = t * num_train_timesteps``).
        guidance_scale: the guidance scale used when a call gives none (a guided student only).
        source: where the weights came from (the checkpoint, its kind and step), for the record.
        encoder: for latent data, the encoder record (:mod:`ayf.encoders`: normalisation, pixel
            range) by which the pipeline's ``vae`` decodes the samples; None for pixels.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, network: dict, data_shape: list, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 guidance_scale: Optional[float] = None, source: Optional[str] = None,
                 encoder: Optional[dict] = None):
        super().__init__()
        self.net = build_flow_map(network)

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    @property
    def guided(self) -> bool:
        return self.net.guidance_emb is not None

    def _times(self, timestep, batch: int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=like.device).to(torch.float64) / self.config.num_train_timesteps
        return t.reshape(-1).expand(batch).to(like.dtype) if t.numel() == 1 else t.reshape(batch).to(like.dtype)

    def forward(self, sample: torch.Tensor, timestep, r_timestep, class_labels=None,
                guidance_scale: Optional[float] = None, return_dict: bool = True):
        """``F(sample, t, r)`` with ``t = timestep / num_train_timesteps`` and ``r`` likewise; a
        class-conditional model takes ``class_labels`` (an int or ``(B,)``; -1: no class, for a model
        that knows one), a guided one ``guidance_scale`` (default: the exported one)."""
        batch = sample.shape[0]
        t, s = self._times(timestep, batch, sample), self._times(r_timestep, batch, sample)
        if guidance_scale is None and self.guided:
            guidance_scale = self.config.guidance_scale
        if self.num_classes and class_labels is None:
            raise ValueError(f"this flow map is class-conditional ({self.num_classes} classes): pass class_labels")
        cond = Cond.build(batch, label=class_labels, lam=guidance_scale, device=sample.device, dtype=sample.dtype)
        out = self.net(sample, t, s, cond)
        return FlowMapOutput(sample=out) if return_dict else (out,)


class FlowMapPipeline(DiffusionPipeline):
    """Samples an exported flow map: ``FlowMapPipeline.from_pretrained(folder)(num_inference_steps=4)``.

    One model call per step on the scheduler's grid (uniform in t by default, ``shift`` as its
    config says), each a jump ``x_t -> x_r`` of the flow map; deterministic given the noise. A flow
    map of latent data comes with its ``vae``, which decodes the samples (the flow map's config
    holds the latent normalisation).
    """

    model_cpu_offload_seq = "flow_map->vae"
    _optional_components = ["vae"]

    def __init__(self, flow_map: FlowMapModel, scheduler: FlowMapEulerDiscreteScheduler,
                 vae: Optional[AutoencoderKL] = None):
        super().__init__()
        self.register_modules(flow_map=flow_map, scheduler=scheduler, vae=vae)

    def decoder(self) -> Optional[VAEEncoder]:
        """The encoder that turns this flow map's latents into pixels (None for pixel data)."""
        record = self.flow_map.config.encoder
        if record is None:
            return None
        if self.vae is None:
            raise ValueError("this flow map samples latents but the pipeline has no vae to decode them")
        return encoder_from_manifest({**record, "folder": "vae"}).attach(self.vae)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 1, class_labels=None,
                 guidance_scale: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "pil", return_dict: bool = True):
        """Samples ``batch_size`` examples (or as many as ``latents``, the noise ``x_1``).

        output_type: ``pil`` or ``np`` (images, pixels in [0, 1] for ``np``), ``pt`` (pixels in model
        units, [-1, 1]; for vector data the samples) or ``latent`` (a latent flow map's samples,
        undecoded)."""
        model = self.flow_map
        if latents is None:
            latents = randn_tensor((batch_size, *model.config.data_shape), generator=generator, device=self.device,
                                   dtype=model.dtype)
        x = latents.to(device=self.device, dtype=model.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=x.device)
        scale = self.scheduler.config.num_train_timesteps
        sigmas = self.scheduler.sigmas
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            r = sigmas[i + 1] * scale
            out = model(x, t, r, class_labels=class_labels, guidance_scale=guidance_scale).sample
            x = self.scheduler.step(out, t, x, r_timestep=r).prev_sample
        decoder = self.decoder()
        if output_type != "latent" and decoder is not None:
            x = decoder.to(x.device).decode(x)
        images = to_output(x, "pt" if output_type == "latent" else output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def build_flow_map(config: dict) -> FlowMap:
    """A FlowMap from a self-contained ``class_path``/``init_args`` config, with fresh weights."""
    if config.get("class_path") != "ayf.nn.FlowMap":
        raise ConfigError(f"an exported network is an ayf.nn.FlowMap, not {config.get('class_path')}")
    args = copy.deepcopy(config.get("init_args", {}))
    backbone = args.pop("backbone")
    if backbone.get("class_path") == DIFFUSERS_BACKBONE:  # its model given as a config dict
        from ayf.nn.diffusers import DiffusersBackbone
        module = DiffusersBackbone(**backbone.get("init_args", {}))
    else:
        module = build_object(backbone, nn.Module)
    return FlowMap(module, **args)


def portable_config(net: FlowMap, config: dict) -> dict:
    """The record's net config with every file it names replaced by what was read from it (a
    diffusers backbone's model and scheduler configs)."""
    config = copy.deepcopy(config)
    backbone = config.get("init_args", {}).get("backbone", {})
    if backbone.get("class_path") == DIFFUSERS_BACKBONE:
        args = backbone.setdefault("init_args", {})
        if args.get("context") is not None:
            raise ConfigError("a student that reads a fixed context (an encoded prompt) cannot be exported yet")
        module = net.backbone
        args["model"] = {k: v for k, v in module.model.config.items() if not k.startswith("_") or k == "_class_name"}
        args["scheduler"] = dict(module.scheduler_config)
        args["context"] = None
    return config


def export(ckpt_path: str, output: str, use_ema: bool = True, overwrite: bool = False,
           model_folder: Optional[str] = None) -> Optional[FlowMapPipeline]:
    """Writes the flow map of ``ckpt_path`` as a diffusers pipeline folder at ``output``: the
    FlowMapModel under ``flow_map/`` (safetensors), a FlowMapEulerDiscreteScheduler under
    ``scheduler/`` and ``model_index.json``. Returns the pipeline. A LoRA student of a FLUX
    transformer is written as a diffusers LoRA with its s branch instead (:mod:`ayf.export_flux`;
    returns None)."""
    if os.path.exists(output) and not overwrite:
        raise ConfigError(f"{output} exists; pass --overwrite to replace it")
    real_out = os.path.realpath(output)
    if os.path.commonpath([real_out, os.path.realpath(ckpt_path)]) == real_out:
        raise ConfigError(f"the output {output} holds the input {ckpt_path}: write to another folder")
    ckpt = read_checkpoint(ckpt_path)
    kind = ckpt["ayf"].get("kind")
    if kind in TEACHER_KINDS:
        raise ConfigError(f"{ckpt_path} holds a {kind} (a velocity model), not a flow map: distil it with `ayf fit`, "
                          "then export the student")
    if model_folder:
        backbone = ckpt["ayf"]["net"].get("init_args", {}).get("backbone", {})
        if "model" not in backbone.get("init_args", {}):
            raise ConfigError(f"--model_folder: {ckpt_path} records no model folder (not a diffusers model)")
        backbone["init_args"]["model"] = os.path.abspath(model_folder)
    net, record, source = network_from(ckpt, ckpt_path, use_ema, FLOW_MAP_KINDS)
    if getattr(net.backbone, "lora_rank", 0):  # a LoRA of a FLUX transformer: exported as a diffusers LoRA
        from ayf.export_flux import export_lora

        export_lora(net, record, source, output)
        return None
    sampling = record.get("sampling") or {}
    if float(sampling.get("gamma") or 0.0) > 0.0:
        raise ConfigError(f"{ckpt_path} samples with gamma {sampling['gamma']} (a consistency model), which "
                          "FlowMapEulerDiscreteScheduler does not do: only deterministic flow maps export")
    encoder = record.get("encoder")
    vae = None
    if encoder is not None:  # latent data: the VAE goes with it, its folder not named
        vae = encoder_from_manifest(encoder).vae
        encoder = {k: v for k, v in encoder.items() if k != "folder"}
    model = FlowMapModel(network=portable_config(net, record["net"]), data_shape=list(record["data_shape"]),
                         guidance_scale=sampling.get("guidance") if net.guidance_emb is not None else None,
                         source=source, encoder=encoder)
    model.net.load_state_dict(net.state_dict())
    pipe = FlowMapPipeline(flow_map=model.eval(), scheduler=FlowMapEulerDiscreteScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS), vae=vae)
    tmp = output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(tmp, output)
    return pipe


def load_pipeline(folder: Union[str, os.PathLike], device: Optional[str] = None) -> FlowMapPipeline:
    """An exported folder as a :class:`FlowMapPipeline` (float32, on ``device``)."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ConfigError(f"{folder} is not an exported flow map (no model_index.json); write one with `ayf export`")
    pipe = FlowMapPipeline.from_pretrained(str(folder), local_files_only=True)
    return pipe.to(device) if device else pipe


