"""LoRA flow-map students of FLUX-shaped transformers as diffusers LoRAs: what ``ayf export``
writes for them, and the pipeline that samples them.

An export folder holds what the student trained and nothing of its base model:

- ``pytorch_lora_weights.safetensors``: the adapters in the layout that diffusers'
  ``FluxPipeline.load_lora_weights(folder)`` reads (``transformer.<layer>.lora_A.weight`` and
  ``lora_B.weight``; LoRA's ``alpha / rank`` scale folded into ``lora_B``, so it loads at scale 1);
- ``s_branch/``: the s branch (:class:`SBranch`, a diffusers model: the zero-started copy of the
  timestep embedder that reads ``t - s``);
- ``flow_map.json``: the base model's folder and weights fingerprint, the latent shape, the text
  length and the guidance scale.

:class:`FlowMapFluxPipeline` is diffusers' ``FluxPipeline`` with the s branch and
``FlowMapEulerDiscreteScheduler``: :meth:`FlowMapFluxPipeline.from_export` loads the base pipeline
folder, the LoRA (through ``load_lora_weights``) and the s branch, and its call samples a prompt in
``num_inference_steps`` jumps of the flow map.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from ayf.errors import ConfigError

try:
    from diffusers import FlowMapEulerDiscreteScheduler, FluxPipeline, ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError:  # pragma: no cover - the optional extra is missing
    raise ConfigError("exporting a text-to-image student needs the optional extra: pip install 'ayf[text]'") from None

LORA_FILE = "pytorch_lora_weights.safetensors"
RECORD_FILE = "flow_map.json"
FLUX_BACKBONE = "ayf.nn.flux.FluxBackbone"


class SBranch(ModelMixin, ConfigMixin):
    """The s branch of a FLUX flow map: ``embedder(projection((t - s) * 1000))``, added to the
    transformer's conditioning vector (:class:`ayf.nn.flux.TimeDifferenceEmbedding`)."""

    @register_to_config
    def __init__(self, num_channels: int = 256, embedding_dim: int = 3072):
        super().__init__()
        self.projection = Timesteps(num_channels=num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embedder = TimestepEmbedding(in_channels=num_channels, time_embed_dim=embedding_dim)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.embedder(self.projection(u * 1000).to(self.embedder.linear_1.weight.dtype))


def lora_state(backbone) -> dict:
    """The adapters of a LoRA :class:`ayf.nn.flux.FluxBackbone` in diffusers' layout, scale folded."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in backbone.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            scale = float(module.scaling["default"])
            out[f"transformer.{name}.lora_A.weight"] = module.lora_A["default"].weight.detach().clone().contiguous()
            out[f"transformer.{name}.lora_B.weight"] = (module.lora_B["default"].weight.detach() * scale).contiguous()
    return out


def export_lora(net, record: dict, source: str, output: str) -> None:
    """Writes the LoRA student ``net`` (a FlowMap on a LoRA FluxBackbone) to the folder ``output``."""
    from safetensors.torch import save_file

    backbone = net.backbone
    if not backbone.lora_rank:
        raise ConfigError("only LoRA students of a FLUX transformer export as a LoRA (this one trains every weight)")
    s_branch = SBranch(num_channels=backbone.model.time_text_embed.time_proj.num_channels,
                       embedding_dim=backbone.emb_dim)
    s_branch.load_state_dict(net.s_emb.state_dict())
    tmp = output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(lora_state(backbone), os.path.join(tmp, LORA_FILE))
    s_branch.save_pretrained(os.path.join(tmp, "s_branch"))
    info = {"base": record.get("base"), "data_shape": list(record["data_shape"]), "source": source,
            "guidance_scale": (record.get("sampling") or {}).get("guidance") if backbone.guided else None,
            "encoder": {k: v for k, v in (record.get("encoder") or {}).items() if k != "folder"} or None}
    with open(os.path.join(tmp, RECORD_FILE), "w") as f:
        json.dump(info, f, indent=1)
    if os.path.exists(output):
        shutil.rmtree(output)
    os.replace(tmp, output)


class FlowMapFluxPipeline(FluxPipeline):
    """``FluxPipeline`` sampling a flow map: the base pipeline with the exported LoRA and s branch,
    stepped by ``FlowMapEulerDiscreteScheduler`` (one transformer call per jump)."""

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 s_branch: Optional[SBranch] = None, image_encoder=None, feature_extractor=None):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder, feature_extractor)
        self.register_modules(s_branch=s_branch)
        self.flow_map_record = {}

    @classmethod
    def from_export(cls, base: str, export: str, **kwargs) -> "FlowMapFluxPipeline":
        """The base pipeline folder with the LoRA and s branch of the export folder ``export``."""
        record_file = os.path.join(export, RECORD_FILE)
        if not os.path.isfile(record_file):
            raise ConfigError(f"{export} is not an exported text-to-image flow map (no {RECORD_FILE}); write one with `ayf export`")
        pipe = cls.from_pretrained(base, scheduler=FlowMapEulerDiscreteScheduler(num_train_timesteps=1000),
                                   s_branch=SBranch.from_pretrained(os.path.join(export, "s_branch")),
                                   local_files_only=True, **kwargs)
        pipe.load_lora_weights(export, weight_name=LORA_FILE)
        with open(record_file) as f:
            pipe.flow_map_record = json.load(f)
        return pipe

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 4, guidance_scale: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, latents: Optional[torch.Tensor] = None,
                 max_sequence_length: Optional[int] = None, output_type: str = "pil", return_dict: bool = True):
        """Samples one image per prompt (a string or a list) from ``latents`` ``(B, C, H, W)`` (the
        noise; drawn when None). output_type: ``pil``, ``np``, ``pt`` (pixels in [-1, 1]) or ``latent``."""
        from ayf.figures import pipeline_output
        from ayf.nn.flux import image_ids, pack, unpack

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        length = max_sequence_length or min(self.tokenizer_2.model_max_length, 512)
        text, pooled, text_ids = self.encode_prompt(prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=length)
        shape = tuple(self.flow_map_record.get("data_shape") or ())
        if latents is None:
            latents = randn_tensor((len(prompts), *shape), generator=generator, device=self.device, dtype=text.dtype)
        x = latents.to(device=self.device, dtype=self.transformer.dtype)
        _, c, h, w = x.shape
        kw = {}
        if self.transformer.config.guidance_embeds:
            lam = guidance_scale or self.flow_map_record.get("guidance_scale") or 3.5
            kw["guidance"] = torch.full((x.shape[0],), float(lam), device=x.device, dtype=x.dtype)
        extra = {}
        hook = self.transformer.time_text_embed.register_forward_hook(lambda m, i, out: out + extra["emb"].to(out.dtype))
        try:
            self.scheduler.set_timesteps(num_inference_steps, device=x.device)
            scale, sigmas = self.scheduler.config.num_train_timesteps, self.scheduler.sigmas
            for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
                r = sigmas[i + 1] * scale
                sigma = (t / scale).expand(x.shape[0]).to(x.dtype)
                extra["emb"] = self.s_branch(sigma - (r / scale).to(x.dtype))
                out = self.transformer(pack(x), encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma,
                                       img_ids=image_ids(h, w, x.device, x.dtype), txt_ids=text_ids, **kw).sample
                x = self.scheduler.step(unpack(out, (c, h, w)), t, x, r_timestep=r).prev_sample
        finally:
            hook.remove()
        if output_type != "latent":
            vae = self.vae.config
            x = self.vae.decode(x / vae.scaling_factor + (vae.shift_factor or 0.0)).sample.clamp(-1.0, 1.0)
        images = pipeline_output(x, "pt" if output_type == "latent" else output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
