"""Distil NVlabs/edm2's toy autoguidance example with ayf, from a checkout of edm2 at ``$EDM2_DIR``
(its code stays there; this folder holds ayf's side: teacher.py, distill.yaml and this script).

    export EDM2_DIR=/path/to/edm2 PYTHONPATH=benchmarks/edm2_toy
    python benchmarks/edm2_toy/run.py prepare            # train edm2's main model and guide, write the data
    ayf fit --config benchmarks/edm2_toy/distill.yaml    # the student (see docs/results/trust.md for variants)
    python benchmarks/edm2_toy/run.py measure runs/edm2_toy/distill_autoguidance/latest/checkpoints/last.ckpt

``prepare`` runs edm2's own training loop (``do_train``, its defaults: 4096 iterations of batch
4096 for the 64-wide main model, 512 for the 32-wide guide) on the CPU (about 25 min on 2 cores)
and keeps the EMA weights as state dicts; the data are 131072 points of edm2's class-A
distribution. ``measure`` prints, from one fixed noise, how far ayf's Heun sampler of the guided
teacher lands from edm2's own sampler (started at sigma_max * noise) under each out_of_range rule,
and how far each student's 1/2/4/8-step samples land from the teacher's Heun-256 samples.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from teacher import EDM2ToyAutoguidance, toy_example  # noqa: E402

from ayf.checkpoints import load_network  # noqa: E402
from ayf.nn.cond import Cond  # noqa: E402
from ayf.sampling import generate  # noqa: E402

WEIGHTS = os.path.join(HERE, "weights")


def prepare(device: str) -> None:
    te = toy_example()
    os.makedirs(WEIGHTS, exist_ok=True)
    for name, dim, iters in (("main", 64, 4096), ("guide", 32, 512)):
        pattern = os.path.join(WEIGHTS, name + "-%04d.pkl")
        te.do_train(classes="A", hidden_dim=dim, total_iter=iters, pkl_pattern=pattern, pkl_iter=iters,
                    viz_iter=None, device=torch.device(device))
        with open(pattern % iters, "rb") as fh:  # edm2's own snapshot, written by the run just above
            net = pickle.load(fh)
        torch.save(net.state_dict(), os.path.join(WEIGHTS, f"{name}.pt"))
    x = te.gt("A", torch.device("cpu")).sample(131072, 0, generator=torch.Generator().manual_seed(0))
    np.savez(os.path.join(WEIGHTS, "data.npz"), x=x.numpy().astype(np.float32))
    print(f"wrote {WEIGHTS}/main.pt, guide.pt, data.npz (data mean {x.mean(0).tolist()})")


def distance(a, b) -> str:
    d = (a - b).norm(dim=1)
    return f"{d.mean():.4f} | {d.max():.4f}"


def measure(checkpoints, lams=(2.0, 3.0), n=4096) -> None:
    te = toy_example()
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(123))
    rules = {"data_mean (m = 0)": EDM2ToyAutoguidance(), "data_mean (m = 0.367)": EDM2ToyAutoguidance(data_mean=0.367),
             "clamp": EDM2ToyAutoguidance(out_of_range="clamp")}
    teacher = rules["data_mean (m = 0)"]
    main, guide = teacher.teacher.model.net, teacher.weak.model.net
    print("| lam | ayf teacher sampler | edm2's sampler from 5 * noise | mean | max distance |\n|---|---|---|---|---|")
    reference = {}
    for lam in lams:
        cond = Cond.build(n, lam=lam)
        edm = {k: te.do_sample(main, 5.0 * noise, guidance=lam, gnet=guide, num_steps=k)[-1].detach() for k in (32, 128)}
        for name, model in rules.items():
            heun = generate(model, noise, 128, cond, solver="heun")
            for k, x in edm.items():
                print(f"| {lam:g} | Heun 128, {name} | Heun {k} | {distance(heun, x)} |")
        reference[lam] = generate(teacher, noise, 256, cond, solver="heun")
        print(f"| {lam:g} | Heun 128, data_mean (m = 0) | ayf Heun 256 | {distance(generate(teacher, noise, 128, cond, solver='heun'), reference[lam])} |")
    if not checkpoints:
        return
    print("\n| student | lam | 1 step | 2 steps | 4 steps | 8 steps |\n|---|---|---|---|---|---|")
    for path in checkpoints:
        net, _ = load_network(path)
        for lam in lams:
            cond = Cond.build(n, lam=lam)
            errors = [(generate(net, noise, k, cond) - reference[lam]).norm(dim=1).mean().item() for k in (1, 2, 4, 8)]
            print(f"| {path} | {lam:g} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")
    print("\n(student: mean distance to the teacher's Heun-256 samples from the same noise)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("--device", default="cpu")
    sub.add_parser("measure").add_argument("checkpoints", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.command == "prepare":
        prepare(args.device)
    else:
        measure(args.checkpoints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
