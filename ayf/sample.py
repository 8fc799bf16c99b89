"""``ayf sample``: draw samples from a checkpoint to a ``.npy`` file."""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from ayf.errors import ConfigError
from ayf.math.samplers import ODE_SOLVERS, sample_flow_map
from ayf.math.times import check_grid, time_grid
from ayf.nn.io import FLOW_MAP_KINDS, load_network

SOLVERS = ("flow_map", *ODE_SOLVERS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ayf sample",
        description="Draw samples from an ayf checkpoint. A flow-map checkpoint (FlowMapDistillation, AdversarialFinetuning) samples "
        "with the flow map (gamma-sampling optional); a FlowMatching (teacher) checkpoint needs "
        "--solver euler or heun.",
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `ayf fit`")
    p.add_argument("--output", required=True, help="where to write the samples: .npy (model units), or .png "
                   "(images only: a tiled grid, one class per column with --label all)")
    p.add_argument("--steps", type=int, default=None, help="number of steps on a uniform grid (default 1)")
    p.add_argument("--grid", default=None, help="explicit times from 1 to 0, comma-separated, e.g. 1,0.6,0.3,0")
    p.add_argument("--num_samples", type=int, default=None, help="how many samples (default 1000, or the noise file's count)")
    p.add_argument("--noise", default=None, help="a .npy file of noise x_1 of shape (N, *data_shape) to use instead of drawing it")
    p.add_argument("--gamma", type=float, default=None, help="gamma-sampling in [0, 1] (0 deterministic, 1 consistency-style); default 0, 1 for consistency checkpoints")
    p.add_argument("--solver", choices=SOLVERS, default=None, help="flow_map (default for flow-map checkpoints), or the teacher's euler / heun")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and of gamma-sampling")
    p.add_argument("--label", default=None, help="class label for class-conditional models, or `all` to cycle "
                   "through the classes (sample i gets class i mod K)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale lam: of a guided flow map (default: "
                   "its training run's sample_guidance), or classifier-free guidance of a teacher trained with label_dropout")
    p.add_argument("--batch_size", type=int, default=4096, help="samples per forward batch")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


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


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        raise ConfigError(f"{args.output} exists; pass --overwrite to replace it")
    if args.steps is not None and args.grid is not None:
        raise ConfigError("give --steps or --grid, not both")
    try:
        grid = check_grid([float(v) for v in args.grid.split(",")]) if args.grid else time_grid(1 if args.steps is None else args.steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    net, meta = load_network(args.ckpt_path, use_ema=not args.no_ema, kinds=(*FLOW_MAP_KINDS, "FlowMatching"))
    kind = meta["kind"]
    solver = args.solver or ("flow_map" if kind in FLOW_MAP_KINDS else None)
    if solver is None:
        raise ConfigError(f"{args.ckpt_path} is a FlowMatching (teacher) checkpoint: pass --solver euler or heun")
    if solver == "flow_map" and not net.is_flow_map:
        raise ConfigError(f"{args.ckpt_path} holds a velocity model, not a flow map: use --solver euler or heun")
    objective = meta.get("objective") or "emd"
    gamma = args.gamma if args.gamma is not None else (1.0 if objective == "consistency" else 0.0)
    if not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"--gamma must lie in [0, 1], got {gamma}")
    device = torch.device(args.device)
    net = net.to(device)
    shape = tuple(net.data_shape)
    gen = torch.Generator().manual_seed(args.seed)
    if args.noise:
        noise = load_noise(args.noise, shape)
        if args.num_samples is not None and args.num_samples != len(noise):
            raise ConfigError(f"--num_samples {args.num_samples} disagrees with the {len(noise)} rows of {args.noise}")
    else:
        noise = torch.randn(args.num_samples or 1000, *shape, generator=gen)
    labels = None
    if net.num_classes > 0:
        if args.label is None:
            raise ConfigError("this model is class-conditional: pass --label K or --label all")
        if args.label == "all":
            labels = torch.arange(len(noise)) % net.num_classes
        elif not args.label.lstrip("-").isdigit() or not 0 <= int(args.label) < net.num_classes:
            raise ConfigError(f"--label must be `all` or a class in 0..{net.num_classes - 1}, got {args.label}")
        else:
            labels = torch.full((len(noise),), int(args.label), dtype=torch.long)
    lam = args.guidance if args.guidance is not None else meta.get("sample_guidance")
    if net.is_flow_map:
        if lam is not None and not net.guidance:
            raise ConfigError(f"{args.ckpt_path} was not distilled with guidance: leave out --guidance")
        velocity = lambda a, t, c: net.velocity(a, t, label=c, guidance=lam)  # noqa: E731
    else:  # a teacher: classifier-free guidance when asked
        from ayf.tasks.flow_matching import cfg_velocity

        velocity = cfg_velocity(net, lam, meta.get("label_dropout"))
    png = args.output.lower().endswith(".png")
    if png and len(shape) != 3:
        raise ConfigError("a .png output needs image data (C, H, W); this model's data shape is " + str(shape))
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad():
        chunks = noise.split(args.batch_size)
        label_chunks = labels.split(args.batch_size) if labels is not None else [None] * len(chunks)
        for chunk, label in tqdm(list(zip(chunks, label_chunks, strict=True)), desc=f"sampling ({solver}, {len(grid) - 1} steps)", unit="batch"):
            x = chunk.to(device)
            label = None if label is None else label.to(device)
            g = grid.to(x)
            if solver == "flow_map":
                F_fn = lambda a, t, s, c=label: net(a, t, s, label=c, guidance=lam)  # noqa: E731
                y = sample_flow_map(F_fn, x, g, gamma=gamma, generator=gen if device.type == "cpu" else None)
            else:
                y = ODE_SOLVERS[solver](lambda a, t, c=label: velocity(a, t, c), x, g)
            out.append(y.cpu())
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    samples = torch.cat(out)
    if png:
        from PIL import Image

        from ayf.callbacks.grids import tile

        cols = net.num_classes if args.label == "all" else max(1, int(len(samples) ** 0.5))
        img = (tile(samples, cols) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(args.output)
    else:
        np.save(args.output, samples.numpy())
    print(f"wrote {sum(len(o) for o in out)} samples of shape {shape} to {args.output}")
    return 0
