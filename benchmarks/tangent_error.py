"""How far the EMD tangent by a finite difference lies from the exact one, per backbone, step and
precision: ||g - g64|| / ||g64||, where g64 is the float64 JVP's tangent on the same inputs.

    python benchmarks/tangent_error.py                       # random MLP, U-Net, EDM2Net (seconds)
    python benchmarks/tangent_error.py --student runs/digits/distill_emd/latest/checkpoints/last.ckpt

Random networks have every weight moved away from its start (EDM2-style gains start at zero, where
F and g would be 0); a trained flow map (--student) is taken as it is. The float32 rows show the
trade-off of the step: truncation error falls with h (h^2 central, h forward) while rounding grows
as eps/h. The bf16 rows run under autocast: with the tangent in float32 (``jvp_float32: true``,
the default of the objectives) and without it.
"""
from __future__ import annotations

import argparse
import copy

import torch

from ayf.math import TimePairSampler, emd_tangent
from ayf.math.path import interpolate
from ayf.nn import MLP, Cond, FlowMap, UNet
from ayf.nn.edm2 import EDM2Net

STEPS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


def random_net(kind: str):
    """A student with every weight away from its start (its data shape, its number of classes)."""
    torch.manual_seed(0)
    if kind == "mlp":  # the toy recipe's size
        net, shape = FlowMap(MLP(data_dim=2, width=256, depth=4), num_classes=0), (2,)
    elif kind == "unet":  # the digits recipe's size
        net = FlowMap(UNet(img_channels=1, img_resolution=8, channels=32, channel_mult=[1, 2], num_blocks=2,
                           channels_per_head=32), num_classes=10)
        shape = (1, 8, 8)
    else:
        net = FlowMap(EDM2Net(img_resolution=8, img_channels=2, label_dim=10, model_channels=32, channel_mult=(1, 2),
                              num_blocks=1, attn_resolutions=(4,), channels_per_head=32, logvar_channels=0,
                              time_input="t"), num_classes=10)
        shape = (2, 8, 8)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_((0.5 if name.endswith("gain") or "_emb" in name.split(".")[0] else 0.05) * torch.randn_like(p))
    return net.eval(), shape


def inputs(shape, classes, n=64):
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(n, *shape, generator=gen), torch.randn(n, *shape, generator=gen)
    torch.manual_seed(2)
    t, s = TimePairSampler(p_diagonal=0.0)(n)
    v = torch.randn(n, *shape, generator=gen)  # the teacher's velocity: any fixed field serves
    label = torch.randint(0, classes, (n,), generator=gen) if classes else None
    return interpolate(x0, eps, t), t, s, v, Cond(label=label)


def rows(name, net, shape):
    x, t, s, v, cond = inputs(shape, net.num_classes)
    net64 = copy.deepcopy(net).double()
    g64 = emd_tangent(net64, x.double(), t.double(), s.double(), v.double(), r=1.0, cond=cond)[1]

    def err(method, h, bf16=False, f32=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            g = emd_tangent(net, x, t, s, v, r=1.0, cond=cond, method=method, step=h, jvp_float32=f32)[1]
        return float((g.double() - g64).norm() / g64.norm())

    out = [f"| {name} | fp32 | jvp | - | {err('jvp', 0):.2e} |"]
    for method in ("central", "forward"):
        for h in STEPS:
            out.append(f"| {name} | fp32 | {method} | {h:g} | {err(method, h):.2e} |")
    out.append(f"| {name} | bf16, tangent in fp32 | central | 1e-3 | {err('central', 1e-3, True):.2e} |")
    out.append(f"| {name} | bf16 | jvp | - | {err('jvp', 0, True, False):.2e} |")
    for h in (1e-2, 1e-3):
        out.append(f"| {name} | bf16 | central | {h:g} | {err('central', h, True, False):.2e} |")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="mlp,unet,edm2", help="comma-separated random backbones: mlp, unet, edm2")
    p.add_argument("--student", action="append", default=[], help="a flow-map checkpoint to measure as trained "
                   "(repeatable)")
    args = p.parse_args()
    nets = [(kind, *random_net(kind)) for kind in args.backbones.split(",") if kind]
    for path in args.student:
        from ayf.checkpoints import load_network

        net, record = load_network(path)
        nets.append((f"trained {path}", net, tuple(record["data_shape"])))
    lines = ["| network | precision | method | h | rel. error against the float64 JVP |", "|---|---|---|---|---|"]
    for name, net, shape in nets:
        lines += rows(name, net, shape)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
