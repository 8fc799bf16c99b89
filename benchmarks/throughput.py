"""Images per second on the U-Net: training (flow-matching teacher step, AYF-EMD distillation
step) and sampling (flow map at 1 and 4 steps), for the digits and Fashion-MNIST network sizes.

    python benchmarks/throughput.py [--device cpu|cuda] [--sizes digits fashion_mnist] [--repeats 10]

The EMD step counts the teacher call, the no-grad JVP and the student's forward/backward; the
teacher is a velocity U-Net of the same size. The FM step trains the same student network at
s = t (its s branch adds one small embedding MLP to a teacher's cost). Figures are medians of --repeats timed calls after
3 warm-up calls; compare rows measured in the same run.
"""
from __future__ import annotations

import argparse
import os
from types import SimpleNamespace

import torch
from cost import emd_loss, fm_loss, measure, step

from ayf.math.samplers import sample_flow_map
from ayf.math.times import TimePairSampler, time_grid
from ayf.nn import FlowMap, UNet

# the networks of configs/digits and configs/fashion_mnist
SIZES = {
    "digits": dict(img_channels=1, img_resolution=8, channels=32, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[4], channels_per_head=32, emb_dim=128),
    "fashion_mnist": dict(img_channels=1, img_resolution=32, channels=64, channel_mult=[1, 2, 2], num_blocks=2,
                          attn_resolutions=[8], channels_per_head=64, emb_dim=256),
}
BATCH = {("digits", "cpu"): 128, ("fashion_mnist", "cpu"): 32, ("digits", "cuda"): 1024, ("fashion_mnist", "cuda"): 256}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=None, help="override the per-size default batch")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}")
    print("| network | params | batch | FM train img/s | EMD train img/s | EMD/FM time | sample 1-step img/s | sample 4-step img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        print(bench_size(size, device, args.batch or BATCH[(size, device.type)], args.repeats), flush=True)


def bench_size(size: str, device, batch: int, repeats: int) -> str:
    """One table row: training and sampling images/s of one network size."""
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

    def F_s(x, tt, ss):
        return student(x, tt, ss, label=label)

    T_s = SimpleNamespace(velocity=lambda x, tt: teacher(x, tt, None, label=label))
    t_fm, _ = measure(lambda: step(opt, fm_loss, F_s, x0, t, eps), repeats, device, memory=False)
    t_emd, _ = measure(lambda: step(opt, emd_loss, F_s, T_s, x0, t, s, eps, r), repeats, device, memory=False)
    student.eval()
    samp = {}
    with torch.no_grad():
        for k in (1, 4):
            grid = time_grid(k).to(device)
            samp[k], _ = measure(lambda g=grid: sample_flow_map(F_s, eps, g), repeats, device, memory=False)
    params = sum(q.numel() for q in student.parameters()) / 1e6
    return (f"| {size} | {params:.2f}M | {batch} | {batch / t_fm:.0f} | {batch / t_emd:.0f} | {t_emd / t_fm:.2f} | "
            f"{batch / samp[1]:.0f} | {batch / samp[4]:.0f} |")

if __name__ == "__main__":
    main()
