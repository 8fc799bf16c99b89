"""Turn a foreign network into an ayf teacher checkpoint (key maps and shape checks).

``ayf convert edm2 EXPORT.pt --output TEACHER.ckpt`` reads the ``{"state_dict", "init_kwargs"}``
file that a user exports from an EDM2 pickle (README, "Distil your own model") and writes a
checkpoint that ``ayf sample``, :class:`ayf.checkpoints.CheckpointTeacher`, ``GuidedTeacher`` and a
student's initialisation accept. ayf never unpickles an EDM2 file: it reads tensors only.
"""
from __future__ import annotations

import argparse
import inspect
import os

import torch

from ayf.checkpoints import CONVERTED_KIND, make_record
from ayf.errors import ConfigError
from ayf.io import check_output, save_torch
from ayf.nn.edm2 import EDM2Net
from ayf.nn.flow_map import FlowMap

EXPORT_HOWTO = (
    "inside an EDM2 checkout run: python -c \"import pickle, torch; net = pickle.load(open('NET.pkl', 'rb'))['ema']; "
    "torch.save({'state_dict': net.state_dict(), 'init_kwargs': dict(net.init_kwargs)}, 'EXPORT.pt')\""
)
#: EDM2 Precond keyword arguments that ayf reads but does not keep
EDM2_IGNORED = {"use_fp16": "ayf runs in the trainer's precision (e.g. --trainer.precision bf16-mixed)"}
#: how EDM2's parameter names map to a converted FlowMap's
EDM2_PREFIXES = {"unet.": "backbone.unet.", "logvar_fourier.": "backbone.logvar_fourier.",
                 "logvar_linear.": "backbone.logvar_linear."}


def read_export(path: str) -> dict:
    """The tensors-only export ``{"state_dict", "init_kwargs"}``; a pickle of network objects, or
    any other file, is refused with a one-line error that says how to export it."""
    if not os.path.isfile(path):
        raise ConfigError(f"EDM2 export not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickle of classes, or not a torch file at all
        raise ConfigError(f"{path} is not a tensors-only export (ayf never unpickles network objects); "
                          f"{EXPORT_HOWTO}") from None
    if isinstance(obj, dict) and isinstance(obj.get("ayf"), dict):
        raise ConfigError(f"{path} is already an ayf {obj['ayf'].get('kind')} checkpoint: use it as it is "
                          f"(e.g. --model.teacher.init_args.ckpt_path {path}, or ayf sample --solver heun)")
    if not isinstance(obj, dict) or not {"state_dict", "init_kwargs"} <= set(obj):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"{path} must hold a dict with keys state_dict and init_kwargs, found {found}; {EXPORT_HOWTO}")
    return obj


def edm2_kwargs(init_kwargs: dict, **ayf_kwargs) -> tuple:
    """EDM2's ``init_kwargs`` with EDM2's defaults filled in, as :class:`EDM2Net` arguments, and
    the notes on what was left out. An argument that EDM2Net does not know is a ConfigError."""
    params = inspect.signature(EDM2Net.__init__).parameters
    known = [name for name in params if name != "self"]
    kwargs, notes = {}, []
    for key, value in dict(init_kwargs).items():
        if key in EDM2_IGNORED:
            notes.append(f"{key}={value} ignored: {EDM2_IGNORED[key]}")
        elif key in known:
            kwargs[key] = list(value) if isinstance(value, (list, tuple)) else value
        else:
            raise ConfigError(f"unknown EDM2 network argument {key!r} in init_kwargs (known: {', '.join(known)})")
    kwargs.update(ayf_kwargs)
    for name in ("img_resolution", "img_channels"):
        if name not in kwargs:
            raise ConfigError(f"init_kwargs lacks {name}, which EDM2 networks always record")
    full = {}
    for name in known:  # every default written out, so the checkpoint does not depend on ayf's defaults
        default = params[name].default
        value = kwargs.get(name, default)
        full[name] = list(value) if isinstance(value, tuple) else value
    return full, notes


def map_state(state: dict, target: dict, drop_logvar: bool) -> dict:
    """EDM2's state dict renamed to the converted FlowMap's keys; missing or unexpected keys are
    named, and so is a tensor of the wrong shape."""
    mapped, unexpected = {}, []
    for key, value in state.items():
        for old, new in EDM2_PREFIXES.items():
            if key.startswith(old):
                if not (drop_logvar and old.startswith("logvar")):
                    mapped[new + key[len(old):]] = value
                break
        else:
            unexpected.append(key)
    unexpected += [k for k in mapped if k not in target]
    missing = [k for k in target if k not in mapped]
    if missing or unexpected:
        def some(keys):
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        parts = ([f"missing keys: {some(missing)}"] if missing else []) + \
                ([f"unexpected keys: {some(unexpected)}"] if unexpected else [])
        raise ConfigError("the EDM2 state dict does not fit the network its init_kwargs describe: " + "; ".join(parts))
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ConfigError(f"tensor {key} has shape {tuple(value.shape)}, but the network needs "
                              f"{tuple(target[key].shape)}")
    return {k: v.to(torch.float32) for k, v in mapped.items()}


def convert_edm2(path: str, drop_logvar: bool = False, **ayf_kwargs) -> tuple:
    """An EDM2 export -> ``(checkpoint dict, report lines)``."""
    export = read_export(path)
    has_logvar = any(k.startswith("logvar_") for k in export["state_dict"])
    kwargs, notes = edm2_kwargs(export["init_kwargs"], **ayf_kwargs)
    if drop_logvar or not has_logvar:
        kwargs["logvar_channels"] = 0
    config = {"class_path": "ayf.nn.FlowMap",
              "init_args": {"backbone": {"class_path": "ayf.nn.edm2.EDM2Net", "init_args": kwargs},
                            "s_embedding": "none", "num_classes": int(kwargs["label_dim"])}}
    net = FlowMap(EDM2Net(**kwargs), s_embedding="none", num_classes=int(kwargs["label_dim"]))
    state = map_state(export["state_dict"], net.state_dict(), drop_logvar or not has_logvar)
    net.load_state_dict(state)
    logvar = ("kept" if kwargs["logvar_channels"] else
              "dropped (--no_logvar)" if has_logvar else "absent from the export")
    lo, hi = net.backbone.t_range
    report = [f"EDM2 network: {sum(p.numel() for p in net.parameters()):,} parameters, data shape "
              f"{tuple(net.data_shape)}, {kwargs['label_dim']} classes, sigma_data {kwargs['sigma_data']}",
              f"logvar head: {logvar}",
              f"valid t range [{lo:.6g}, {hi:.6g}] (sigma in [{kwargs['sigma_min']:g}, {kwargs['sigma_max']:g}]); "
              f"outside it the time input is {'clamped' if kwargs['out_of_range'] == 'clamp' else 'an error'}",
              *notes]
    ckpt = {"state_dict": {"net." + k: v for k, v in state.items()},
            "ayf": make_record(CONVERTED_KIND, config, net.data_shape, "euler", label_dropout=0.0,
                               source={"from": "edm2", "file": os.path.abspath(path), "logvar": logvar,
                                       "init_kwargs": {k: (list(v) if isinstance(v, tuple) else v)
                                                       for k, v in dict(export["init_kwargs"]).items()}})}
    return ckpt, report


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Convert a foreign network into an ayf teacher checkpoint (for "
                                "ayf sample --solver euler|heun, CheckpointTeacher, GuidedTeacher and a student's "
                                "initialisation).")
    sub = p.add_subparsers(dest="source", required=True)
    e = sub.add_parser("edm2", help="an EDM2 network exported as {state_dict, init_kwargs}",
                       description=f"Convert an EDM2 network. Export its ema network first: {EXPORT_HOWTO}")
    e.add_argument("export", help="the exported .pt file (tensors only; ayf never unpickles an EDM2 .pkl)")
    e.add_argument("--output", required=True, help="where to write the teacher checkpoint")
    e.add_argument("--no_logvar", action="store_true", help="drop EDM2's uncertainty (logvar) head")
    e.add_argument("--sigma_min", type=float, default=0.002, help="smallest noise level of the valid range (EDM2: 0.002)")
    e.add_argument("--sigma_max", type=float, default=80.0, help="largest noise level of the valid range (EDM2: 80)")
    e.add_argument("--out_of_range", choices=("clamp", "error"), default="clamp",
                   help="a time outside the range: clamp the time input (default) or raise an error")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def run(args) -> int:
    check_output(args.output, args.overwrite, inputs=(args.export,))
    ckpt, report = convert_edm2(args.export, drop_logvar=args.no_logvar, sigma_min=args.sigma_min,
                                sigma_max=args.sigma_max, out_of_range=args.out_of_range)
    save_torch(ckpt, args.output)
    for line in report:
        print(line)
    print(f"wrote {args.output}")
    return 0
