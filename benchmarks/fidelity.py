"""Fidelity benchmark on the toy mixture with the analytic teacher.

Trains each objective with `ayf fit` on configs/toy/distill_*.yaml (CPU), then, from the same
noise, compares N-step samples (N = 1, 2, 4, 8, 16) with the exact PF-ODE solution: median and
RMS distance, mean true log-density, and MMD to fresh data; teacher Euler and Heun at the same
number of velocity calls (NFE) sit beside them. Prints markdown tables and writes
<out>/fidelity.md, <out>/fidelity.json and <out>/fidelity.png.

    python benchmarks/fidelity.py                 # all runs, 4000 steps each
    python benchmarks/fidelity.py --runs emd --max_steps 1000
    python benchmarks/fidelity.py --eval_only     # re-evaluate existing checkpoints
    python benchmarks/fidelity.py --runs emd,emd_ddp2 --max_steps 1500   # one process against two (DDP)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import torch

from ayf.checkpoints import load_network, sampling_defaults
from ayf.cli import main as ayf_main
from ayf.math.samplers import sample_euler, sample_heun
from ayf.math.times import time_grid
from ayf.metrics.toy import data_row, exact_endpoints, fidelity_row, format_table, load_mixture
from ayf.sampling import generate

RUNS = {  # name -> (config, extra CLI overrides)
    "emd": ("distill_emd", []),
    "emd_fspace": ("distill_emd", ["--model.objective.init_args.weighting", "f_space"]),
    "emd_adaptive": ("distill_emd", ["--model.objective.init_args.weighting", "adaptive"]),
    "lmd": ("distill_lmd", []),
    "consistency": ("distill_consistency", []),
    # the tangent by a finite difference instead of the JVP (docs/maths.md §3)
    "emd_central": ("distill_emd", ["--model.objective.init_args.tangent_method", "central"]),
    "emd_forward": ("distill_emd", ["--model.objective.init_args.tangent_method", "forward"]),
    # the same global batch (1024) as `emd`, split over two CPU processes by DDP
    "emd_ddp2": ("distill_emd", ["--trainer.strategy", "ddp", "--trainer.devices", "2",
                                 "--data.init_args.global_batch_size", "1024"]),
}
STEPS = (1, 2, 4, 8, 16)
#: what runs without --runs (the tangent variants are asked for by name)
DEFAULT_RUNS = ("emd", "emd_fspace", "emd_adaptive", "lmd", "consistency", "emd_ddp2")


def train(name, out, max_steps, seed=0):
    cfg, extra = RUNS[name]
    root = os.path.join(out, "runs")
    args = ["fit", "--config", f"configs/toy/{cfg}.yaml", "--trainer.max_steps", str(max_steps),
            "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root,
            "--trainer.logger.init_args.name", name, "--trainer.enable_progress_bar", "false",
            "--seed_everything", str(seed), *extra]
    start = time.time()
    if "--trainer.strategy" in extra:  # several processes: Lightning relaunches the command, so run `ayf` itself
        env = dict(os.environ, OMP_NUM_THREADS="1")
        code = subprocess.run([sys.executable, "-m", "ayf", *args], env=env).returncode
    else:
        code = ayf_main(args)
    if code != 0:
        raise SystemExit(f"training {name} failed")
    return time.time() - start


def last_ckpt(out, name):
    paths = sorted(glob.glob(os.path.join(out, "runs", name, "version_*", "checkpoints", "last.ckpt")), key=os.path.getmtime)
    if not paths:
        raise SystemExit(f"no checkpoint for {name} under {out}/runs; run without --eval_only first")
    return paths[-1]


@torch.no_grad()
def evaluate(out, names, n=4000, seed=123):
    oracle = load_mixture("configs/toy/data.yaml")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, oracle.dim, generator=gen)
    exact = exact_endpoints(oracle, noise)
    reference = oracle.sample(4000, generator=gen)
    rows = [dict(model="data", N="-", **data_row(oracle, n, exact, reference, gen))]
    v_fn = lambda x, t, cond=None: oracle.velocity(x.double(), t.double()).float()  # noqa: E731
    for N in STEPS:
        rows.append(dict(model="teacher Euler", N=N, **fidelity_row(oracle, sample_euler(v_fn, noise, time_grid(N).float()), exact, reference)))
        if N >= 2:
            rows.append(dict(model="teacher Heun", N=N, **fidelity_row(oracle, sample_heun(v_fn, noise, time_grid(N // 2).float()), exact, reference)))
    for name in names:
        net, record = load_network(last_ckpt(out, name), kinds=("FlowMapDistillation",))
        gamma = sampling_defaults(record)["gamma"]  # 1 for the consistency model
        for N in STEPS:
            x = generate(net, noise, N, gamma=gamma, generator=torch.Generator().manual_seed(seed))
            rows.append(dict(model=name, N=N, **fidelity_row(oracle, x, exact, reference)))
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    data_logp = next(r["mean_logp"] for r in rows if r["model"] == "data")
    for model in dict.fromkeys(r["model"] for r in rows if r["model"] != "data"):
        rs = [r for r in rows if r["model"] == model]
        ns = [r["N"] for r in rs]
        style = "--" if model.startswith("teacher") else "-o"
        axes[0].plot(ns, [r["median_dist"] for r in rs], style, label=model)
        axes[1].plot(ns, [r["mean_logp"] for r in rs], style, label=model)
        axes[2].plot(ns, [max(r["mmd"], 1e-6) for r in rs], style, label=model)
    axes[1].axhline(data_logp, color="k", lw=0.8, label="data")
    for ax, title in zip(axes, ["median distance to exact ODE", "mean true log-density", "MMD^2 to data"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (NFE for the teacher)")
        ax.set_title(title, fontsize=10)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated subset of " + ", ".join(RUNS)
                   + f" (default: {', '.join(DEFAULT_RUNS)})")
    p.add_argument("--max_steps", type=int, default=4000)
    p.add_argument("--out", default="bench_out/fidelity")
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="training seed (seed_everything)")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    names = [n for n in args.runs.split(",") if n]
    times = {}
    if not args.eval_only:
        for name in names:
            times[name] = train(name, args.out, args.max_steps, args.seed)
    rows = evaluate(args.out, names)
    cols = ["model", "N", "median_dist", "rms_dist", "mean_logp", "mmd"]
    table = format_table(rows, cols)
    print(table)
    if times:
        print("\ntraining wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fidelity.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.out, "fidelity.json"), "w") as fh:
        json.dump({"rows": rows, "train_seconds": times, "max_steps": args.max_steps}, fh, indent=1)
    plot(rows, os.path.join(args.out, "fidelity.png"))


if __name__ == "__main__":
    main()
