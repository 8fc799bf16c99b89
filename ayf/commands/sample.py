"""Draw samples from a checkpoint or a diffusers model to a .npy file or a PNG grid.

A text-to-image model samples from prompts (--prompt, --prompts FILE), encoded by its pipeline's
text encoders; latents are decoded through the recorded VAE for a PNG (or with --decode).

A flow-map checkpoint (FlowMapDistillation, AdversarialFinetuning) samples with the flow map
(gamma-sampling optional), with the solver, gamma and guidance scale of its training run unless
given; a teacher checkpoint (FlowMatching, Realignment, `ayf convert`) and a diffusers model folder
(--diffusers, read through the adapter of its scheduler) need --solver euler or heun.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from ayf.checkpoints import (
    CONVERTED_KIND,
    FLOW_MAP_KINDS,
    TEACHER_KINDS,
    make_record,
    network_from,
    read_checkpoint,
    sampling_defaults,
)
from ayf.encoders import encoder_from_manifest
from ayf.errors import ConfigError
from ayf.figures import save_png
from ayf.io import check_output
from ayf.nn.cond import Cond
from ayf.nn.teachers import velocity_teacher
from ayf.sampling import SOLVERS, generate_batched, make_grid


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt_path", help="checkpoint written by `ayf fit` or `ayf convert`")
    src.add_argument("--diffusers", metavar="FOLDER", help="a diffusers model folder (model.save_pretrained, or a "
                     "pipeline's unet/ or transformer/ folder; its scheduler config beside it), sampled as a teacher")
    p.add_argument("--scheduler", default=None, help="with --diffusers: the scheduler config's folder or file, "
                   "when it is not beside the model")
    p.add_argument("--model_folder", default=None, help="with --ckpt_path of a diffusers student: its model folder, "
                   "when it moved since the checkpoint was written (the checkpoint records the old place)")
    p.add_argument("--output", required=True, help="where to write the samples: .npy (model units; latents for a "
                   "model of latent data, unless --decode), or .png (images only: a tiled grid, one class per column "
                   "with --label all; latents are decoded)")
    p.add_argument("--decode", action="store_true", help="a model of latent data: write decoded pixels (model units) "
                   "to the .npy instead of latents")
    p.add_argument("--steps", type=int, default=None, help="number of steps on a uniform grid (default 1)")
    p.add_argument("--grid", default=None, help="explicit times from 1 to 0, comma-separated, e.g. 1,0.6,0.3,0")
    p.add_argument("--num_samples", type=int, default=None, help="how many samples (default 1000, or the noise file's count)")
    p.add_argument("--noise", default=None, help="a .npy file of noise x_1 of shape (N, *data_shape) to use instead of drawing it")
    p.add_argument("--gamma", type=float, default=None, help="gamma-sampling in [0, 1] (0 deterministic, 1 consistency-style); default 0, 1 for consistency checkpoints")
    p.add_argument("--solver", choices=SOLVERS, default=None, help="flow_map (default for flow-map checkpoints), or the teacher's euler / heun")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and of gamma-sampling")
    p.add_argument("--label", default=None, help="class label for class-conditional models, or `all` to cycle "
                   "through the classes (sample i gets class i mod K)")
    p.add_argument("--prompt", action="append", default=None, help="text-to-image models: a prompt (repeat it for "
                   "several; sample i gets prompt i mod P, one prompt per grid column)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="text-to-image models: a file of prompts, one a line")
    p.add_argument("--pipeline", default=None, metavar="DIR", help="with prompts: the pipeline folder whose text "
                   "encoders encode them (default: the one the model's transformer sits in)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale lam: of a guided flow map (default: "
                   "its training run's sample_guidance), or classifier-free guidance of a teacher trained with label_dropout")
    p.add_argument("--scale", type=int, default=0, help="PNG output: zoom each pixel this many times (nearest "
                   "neighbour); default 0 picks the smallest zoom that makes the grid at least 512 pixels wide")
    p.add_argument("--batch_size", type=int, default=4096, help="samples per forward batch")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def model_to_sample(args):
    """``(net, record, source)``: the network of ``--ckpt_path`` with its record, or the velocity
    network of a ``--diffusers`` folder with a teacher's record."""
    if args.ckpt_path and args.scheduler:
        raise ConfigError("--scheduler goes with --diffusers (a checkpoint records its scheduler)")
    if args.diffusers and args.model_folder:
        raise ConfigError("--model_folder goes with --ckpt_path (with --diffusers, the folder is --diffusers itself)")
    if args.ckpt_path:
        ckpt = read_checkpoint(args.ckpt_path)
        if args.model_folder:
            backbone = ckpt["ayf"]["net"].get("init_args", {}).get("backbone", {})
            if "model" not in backbone.get("init_args", {}):
                raise ConfigError(f"--model_folder: {args.ckpt_path} records no model folder (not a diffusers model)")
            backbone["init_args"]["model"] = os.path.abspath(args.model_folder)
        net, record, _ = network_from(ckpt, args.ckpt_path, not args.no_ema, (*FLOW_MAP_KINDS, *TEACHER_KINDS))
        return net, record, args.ckpt_path
    from ayf.nn.diffusers import DiffusersTeacher

    teacher = DiffusersTeacher(args.diffusers, scheduler=args.scheduler)
    print(f"ayf: {teacher.describe()[0]}")
    record = make_record(CONVERTED_KIND, teacher.net_config, teacher.data_shape, "euler",
                         label_dropout=float(teacher.unconditional and teacher.num_classes > 0))
    return teacher.net, record, args.diffusers


def load_noise(path: str, data_shape) -> torch.Tensor:
    if not os.path.isfile(path):
        raise ConfigError(f"noise file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot read noise file {path} as .npy: {err}") from None
    if arr.ndim != 1 + len(data_shape) or tuple(arr.shape[1:]) != tuple(data_shape):
        raise ConfigError(f"noise file {path} has shape {arr.shape}; expected (N, {', '.join(map(str, data_shape))})")
    if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
        raise ConfigError(f"noise file {path} must hold finite floating-point values")
    return torch.from_numpy(arr.astype(np.float32))


def class_labels(arg, num_classes: int, n: int):
    """The ``--label`` of ``n`` samples: None (unconditional), one class, or ``all`` in turn."""
    if num_classes == 0:
        return None
    if arg is None:
        raise ConfigError("this model is class-conditional: pass --label K or --label all")
    if arg == "all":
        return torch.arange(n) % num_classes
    if not arg.lstrip("-").isdigit() or not 0 <= int(arg) < num_classes:
        raise ConfigError(f"--label must be `all` or a class in 0..{num_classes - 1}, got {arg}")
    return torch.full((n,), int(arg), dtype=torch.long)


def read_prompts(args) -> list:
    """The prompts of ``--prompt`` and ``--prompts FILE`` (blank lines skipped), in order."""
    prompts = list(args.prompt or [])
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise ConfigError(f"prompt file not found: {args.prompts}")
        with open(args.prompts) as f:
            prompts += [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ConfigError(f"{args.prompts} holds no prompt")
    return prompts


def prompt_cond(net, prompts: list, n: int, pipeline=None) -> dict:
    """The text fields of :class:`Cond` for ``n`` samples (prompt i mod P), by the text encoders of
    ``pipeline`` (default: the pipeline folder that the model's transformer sits in)."""
    if not net.reads_text:
        if prompts:
            raise ConfigError("--prompt: this model takes no prompt")
        return {}
    if not prompts:
        raise ConfigError("this model is text-conditional: pass --prompt TEXT (or --prompts FILE)")
    from ayf.text import PromptEncoder

    folder = pipeline or net.backbone.pipeline
    if folder is None:
        raise ConfigError("give --pipeline: the pipeline folder whose text encoders encode the prompts")
    cond = PromptEncoder(folder)([prompts[i % len(prompts)] for i in range(n)])
    print(f"ayf: {len(prompts)} prompt(s) encoded by {os.path.abspath(folder)}")
    return {"text": cond.text, "text_mask": cond.text_mask, "pooled": cond.pooled}


def run(args) -> int:
    check_output(args.output, args.overwrite, inputs=(args.ckpt_path, args.noise), suffixes=(".npy", ".png"))
    grid = make_grid(steps=args.steps, grid=[float(v) for v in args.grid.split(",")] if args.grid else None)
    if args.scale < 0:
        raise ConfigError(f"--scale must be 0 (automatic) or a zoom >= 1, got {args.scale}")
    prompts = read_prompts(args)
    net, record, source = model_to_sample(args)
    if not net.is_flow_map and args.solver in (None, "flow_map"):
        raise ConfigError(f"{source} holds a velocity model (a {record['kind']}), not a flow map: "
                          "pass --solver euler or heun")
    settings = sampling_defaults(record, solver=args.solver, gamma=args.gamma, guidance=args.guidance)
    solver, gamma, lam = settings["solver"], settings["gamma"], settings["guidance"]
    shape = tuple(net.data_shape)
    png = args.output.lower().endswith(".png")
    if png and len(shape) != 3:
        raise ConfigError("a .png output needs image data (C, H, W); this model's data shape is " + str(shape))
    gen = torch.Generator().manual_seed(args.seed)
    if args.noise:
        noise = load_noise(args.noise, shape)
        if args.num_samples is not None and args.num_samples != len(noise):
            raise ConfigError(f"--num_samples {args.num_samples} disagrees with the {len(noise)} rows of {args.noise}")
    else:
        noise = torch.randn(args.num_samples or (len(prompts) if prompts else 1000), *shape, generator=gen)
    if net.is_flow_map:
        net.check_lam(lam)
        model = net
    else:  # a teacher: classifier-free guidance when asked
        model = velocity_teacher(net, record.get("label_dropout"), lam)
        lam = lam if model.reads_lam else None
    cond = Cond.build(len(noise), label=class_labels(args.label, net.num_classes, len(noise)), lam=lam,
                      **prompt_cond(net, prompts, len(noise), args.pipeline))
    encoder = encoder_from_manifest(record.get("encoder")) if record.get("encoder") else None
    if args.decode and encoder is None:
        raise ConfigError(f"--decode: {source} is a model of pixel data (no encoder recorded); leave it out")
    decode = None
    if encoder is not None and (png or args.decode):
        decode = encoder.to(args.device).decode
        print(f"ayf: decoding through the {encoder.describe()}")
    samples = generate_batched(model.to(args.device), noise, grid, cond, solver=solver, gamma=gamma, generator=gen,
                               batch_size=args.batch_size, device=args.device, postprocess=decode,
                               progress=f"sampling ({solver}, {len(grid) - 1} steps)")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if png:
        cols = (net.num_classes if args.label == "all" else len(prompts) if len(prompts) > 1
                else max(1, int(len(samples) ** 0.5)))
        h, w = save_png(samples, args.output, cols, args.scale)
        print(f"wrote a {w}x{h}-pixel grid of {len(samples)} samples to {args.output}")
    else:
        np.save(args.output, samples.numpy())
        what = "decoded samples" if decode is not None else ("latent samples" if encoder is not None else "samples")
        print(f"wrote {len(samples)} {what} of shape {tuple(samples.shape[1:])} to {args.output}")
    return 0
