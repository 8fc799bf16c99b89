"""Images per second on the U-Net: training (flow-matching teacher step, AYF-EMD distillation
step) and sampling (flow map at 1 and 4 steps), for the digits and Fashion-MNIST network sizes.

    python benchmarks/throughput.py [--device cpu|cuda] [--sizes digits fashion_mnist] [--repeats 10] \
        [--precision fp32 bf16] [--compile] [--tangents jvp central forward]

The EMD step counts the teacher call, the no-grad JVP and the student's forward/backward; the
teacher is a velocity U-Net of the same size. The FM step trains the same student network at
s = t (its s branch adds one small embedding MLP to a teacher's cost). Figures are medians of --repeats timed calls after
3 warm-up calls; the two training steps are called in turn, and EMD/FM time is the median of the
ratios of neighbouring calls (robust to a machine whose speed drifts); compare rows measured in the
same run.

--precision bf16 runs every step under bfloat16 autocast (what Lightning's `precision: bf16-mixed`
does) with the student's JVP in float32, as the distillation objectives do by default (jvp_float32);
bf16-jvp runs the JVP under autocast too (jvp_float32: false). Their rows also give the relative
error of the EMD tangent g against float32 on the same inputs, ||g_bf16 - g_fp32|| / ||g_fp32||,
since the tangent is where low precision costs accuracy.

--tangents times the EMD step with each way of computing the tangent (the exact JVP, or a central
or forward finite difference of step --difference_step, which runs on SDPA's default kernels, the
fused ones included); a difference's row gives the tangent's relative error against the float32
JVP on the same inputs.

--compile adds, for each precision, a row whose two training steps run their loss computation
through torch.compile (what `compile: true` on an objective does); compilation happens in the
warm-up calls and is not timed. Its sampling columns are left empty.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
from types import SimpleNamespace

import torch
from cost import SIZES, emd_loss, fm_loss, measure, measure_pair, step

from ayf.math.path import interpolate
from ayf.math.samplers import sample_flow_map
from ayf.math.tangents import emd_tangent
from ayf.math.times import TimePairSampler, time_grid
from ayf.nn import Cond, FlowMap, UNet

# the networks of configs/digits and configs/fashion_mnist
BATCH = {("digits", "cpu"): 128, ("fashion_mnist", "cpu"): 32, ("digits", "cuda"): 1024, ("fashion_mnist", "cuda"): 256}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=None, help="override the per-size default batch")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "bf16-jvp"],
                   help="one row per size and precision; bf16 = bfloat16 autocast with a float32 JVP, "
                   "bf16-jvp = the JVP under autocast too")
    p.add_argument("--compile", action="store_true", help="also time the training steps under torch.compile")
    p.add_argument("--tangents", nargs="+", default=["jvp"], choices=["jvp", "central", "forward"],
                   help="one row per way of computing the EMD tangent")
    p.add_argument("--difference_step", type=float, default=None, help="the step of a finite-difference tangent (default: the objectives', central 3e-4, forward 1e-4)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}")
    print("| network | params | batch | precision | tangent | FM train img/s | EMD train img/s | EMD/FM time | "
          "sample 1-step img/s | sample 4-step img/s | EMD tangent rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for precision in args.precision:
            for compiled in (False, True) if args.compile else (False,):
                for method in args.tangents:
                    print(bench_size(size, device, args.batch or BATCH[(size, device.type)], args.repeats, precision,
                                     compiled, method, args.difference_step), flush=True)


def autocast(device, precision: str):
    """bfloat16 autocast for ``"bf16"``, nothing for ``"fp32"``."""
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def in_precision(fn, device, precision):
    def wrapped():
        with autocast(device, precision):
            return fn()
    return wrapped


def bench_size(size: str, device, batch: int, repeats: int, precision: str = "fp32", compiled: bool = False,
               method: str = "jvp", step_size=None) -> str:
    """One table row: training and sampling images/s of one network size in one precision, with
    the EMD tangent computed by ``method``."""
    cfg = SIZES[size]
    teacher = FlowMap(UNet(**cfg), s_embedding="none", num_classes=10).to(device).requires_grad_(False).eval()
    student = FlowMap(UNet(**cfg), num_classes=10).to(device)
    student.init_from_teacher(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    shape = (batch, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"])
    x0, eps = torch.randn(shape, device=device), torch.randn(shape, device=device)
    t, s = TimePairSampler()(batch, device=device)
    label = torch.randint(0, 10, (batch,), device=device)
    r = torch.tensor(0.5, device=device)

    cond = Cond(label=label)

    def F_s(x, tt, ss, _=None):
        return student(x, tt, ss, cond)

    T_s = SimpleNamespace(velocity=lambda x, tt: teacher(x, tt, None, cond))
    error = None if (precision, method) == ("fp32", "jvp") else tangent_error(
        teacher, student, label, x0, t, s, eps, r, device, precision, method, step_size)
    torch._dynamo.reset()  # a fresh cache per row: shapes carried over from a row before would compile dynamic ones
    fm, emd = (torch.compile(fn, dynamic=False) if compiled else fn for fn in (fm_loss, emd_loss))
    jvp32 = precision == "bf16"
    t_fm, t_emd, ratio, _ = measure_pair(in_precision(lambda: step(opt, fm, F_s, x0, t, eps), device, precision),
                                         in_precision(lambda: step(opt, emd, F_s, T_s, x0, t, s, eps, r, jvp32,
                                                                   method, step_size),
                                                      device, precision), repeats, device)
    student.eval()
    rate = {1: "-", 4: "-"}  # sampling is timed on the plain eager JVP rows only
    with torch.no_grad():
        for k in () if compiled or method != "jvp" else (1, 4):
            grid = time_grid(k).to(device)
            took = measure(in_precision(lambda g=grid: sample_flow_map(F_s, eps, g), device, precision), repeats,
                           device)
            rate[k] = f"{batch / took:.0f}"
    params = sum(q.numel() for q in student.parameters()) / 1e6
    mode = precision + (" compiled" if compiled else "")
    return (f"| {size} | {params:.2f}M | {batch} | {mode} | {method} | {batch / t_fm:.0f} | {batch / t_emd:.0f} | "
            f"{ratio:.2f} | {rate[1]} | {rate[4]} | "
            f"{'-' if error is None else f'{error:.2e}'} |")


def tangent_error(teacher, student, label, x0, t, s, eps, r, device, precision: str, method: str = "jvp",
                  step_size=None) -> float:
    """||g - g_fp32|| / ||g_fp32|| of the EMD tangent g computed by ``method`` under ``precision``
    autocast, against the float32 JVP's.

    A fresh U-Net outputs zeros (its output and embedding gains start at 0, as in EDM2), so g would
    be 0 too: the error is measured on copies whose gains are set to 1, which output O(1) values.
    """
    teacher, student = (copy.deepcopy(n) for n in (teacher, student))
    with torch.no_grad():
        for net in (teacher, student):
            for name, q in net.named_parameters():
                if name.endswith("gain"):
                    q.fill_(1.0)
    x_t = interpolate(x0, eps, t)

    def tangent(how):
        with torch.no_grad():
            v = teacher(x_t, t, None, Cond(label=label))
        return emd_tangent(student, x_t, t, s, v, r=r, cond=Cond(label=label), jvp_float32=precision == "bf16",
                           method=how, step=step_size)[1].float()

    g32 = tangent("jvp")
    with autocast(device, precision):
        g_low = tangent(method)
    return ((g_low - g32).norm() / g32.norm()).item()

if __name__ == "__main__":
    main()
