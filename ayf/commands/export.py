"""Write a distilled flow map as a folder that diffusers loads and samples.

The folder is a diffusers pipeline (FlowMapPipeline): the flow map under flow_map/ (its EMA
weights in safetensors, with the network's config), a FlowMapEulerDiscreteScheduler under
scheduler/, and model_index.json. It names no file of the run it came from. Loading it needs
`pip install 'ayf[diffusers]'`; see the README's "Take a student to diffusers".

A LoRA student of a FLUX transformer is written as a diffusers LoRA (pytorch_lora_weights.safetensors,
what FluxPipeline.load_lora_weights reads) with its s branch (s_branch/) and flow_map.json, and
samples with ayf.export_flux.FlowMapFluxPipeline.from_export(BASE_PIPELINE, OUTPUT).
"""
from __future__ import annotations

import argparse

EPILOG = """example:
  ayf export --ckpt_path runs/digits/distill_emd/latest/checkpoints/last.ckpt --output exported/digits

then, in Python:
  from ayf.export import FlowMapPipeline
  pipe = FlowMapPipeline.from_pretrained("exported/digits")
  images = pipe(batch_size=20, num_inference_steps=4, class_labels=list(range(10)) * 2).images
"""


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="a flow-map checkpoint (FlowMapDistillation or "
                   "AdversarialFinetuning) written by `ayf fit`")
    p.add_argument("--output", required=True, help="the folder to write (must not exist unless --overwrite)")
    p.add_argument("--no_ema", action="store_true", help="export the raw trained weights instead of the EMA")
    p.add_argument("--model_folder", default=None, help="a diffusers student's model folder, when it moved since "
                   "the checkpoint was written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def run(args) -> int:
    from ayf.export import export

    pipe = export(args.ckpt_path, args.output, use_ema=not args.no_ema, overwrite=args.overwrite,
                  model_folder=args.model_folder)
    if pipe is None:  # a text-to-image LoRA
        print(f"ayf: exported the LoRA and s branch of {args.ckpt_path} to {args.output}; sample it with "
              "ayf.export_flux.FlowMapFluxPipeline.from_export(BASE_PIPELINE, OUTPUT)(prompt, num_inference_steps=4)")
        return 0
    config = pipe.flow_map.config
    what = [f"data shape {tuple(config.data_shape)}"]
    if pipe.flow_map.num_classes:
        what.append(f"{pipe.flow_map.num_classes} classes")
    if config.guidance_scale is not None:
        what.append(f"guidance scale {config.guidance_scale} by default")
    print(f"ayf: exported {config.source} to {args.output} ({', '.join(what)})")
    return 0
