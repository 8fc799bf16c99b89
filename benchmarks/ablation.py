"""Ablation of the distillation choices that the paper leaves open, one at a time, on the toy mixtures.

Every cell distils the same learned teacher with `ayf fit --config configs/toy/distill_emd.yaml` for
the same number of steps, with one choice changed from the base cell, plain AYF-EMD (CLI overrides,
listed in CELLS, after PLAIN). Choices that ayf does not keep are subclasses in ablation_options.py,
injected by class_path. From one fixed noise file it scores the 1/2/4/8-step samples against
the exact PF-ODE map of the mixture: median and RMS distance, and the mean true log-density. Each
cell runs with several seeds; the table gives the mean and the spread (half the range) over seeds.

    python benchmarks/ablation.py                              # every cell, seeds 0 and 1
    python benchmarks/ablation.py --cells base,lr_1e-3 --seeds 0,1,2
    python benchmarks/ablation.py --mixture heldout --cells base,semigroup_longest_0.25
    python benchmarks/ablation.py --list                       # the cells and their overrides

Two runs on one machine may split the cells (one thread each, the same --out); a last run over all
the cells then only reads their results and writes the whole table.

Runs are kept under <out>/<mixture>/: a cell whose result file exists is not trained again (delete
it, or pass --retrain), so an interrupted ablation resumes where it stopped. Writes
<out>/<mixture>/ablation.md and ablation.json.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import statistics
import time

import torch
import yaml

from ayf.checkpoints import load_network
from ayf.cli import main as ayf_main
from ayf.metrics.toy import exact_endpoints, fidelity_row, format_table, load_mixture
from ayf.sampling import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = (1, 2, 4, 8)
OBJECTIVE = "--model.objective.init_args."
SAMPLER = OBJECTIVE + "time_sampler.init_args."
TIME_SAMPLER = "--model.objective.init_args.time_sampler"

# The mixture that the shipped configs and the tests use, and one that nothing was tuned on: eight
# modes on two rings, unequal weights and widths.
MIXTURES = {
    "shipped": os.path.join(ROOT, "configs", "toy", "data.yaml"),
    "heldout": {
        "means": [[2.5, 0.0], [0.0, 2.5], [-2.5, 0.0], [0.0, -2.5], [0.9, 0.9], [-0.9, 0.9], [-0.9, -0.9], [0.9, -0.9]],
        "stds": [0.15, 0.3, 0.2, 0.25, 0.1, 0.2, 0.15, 0.3],
        "weights": [0.2, 0.1, 0.15, 0.05, 0.15, 0.1, 0.15, 0.1],
    },
}

# lr 1e-3 held for 500 steps, then decayed linearly to 0 at step 2500 (the make demo budget)
LR_DECAY = ["--model.optimizer.init_args.lr", "0.001", "--model.lr_scheduler", "ayf.tasks.WarmupStableDecay",
            "--model.lr_scheduler.decay_start", "500", "--model.lr_scheduler.decay_steps", "2000"]

# the (t, s) proposals other than the default, and the two-jump target on random examples (ablation_options.py)
SORTED, INTERVAL, LONG_GAP = ([TIME_SAMPLER, f"ablation_options.{c}"] for c in ("SortedSampler", "IntervalSampler",
                                                                                  "LongGapSampler"))
RANDOM_PICK = ["--model.objective", "ablation_options.RandomPickEMD"]

# name -> (what it varies, overrides of configs/toy/distill_emd.yaml)
CELLS = {
    "base": ("plain AYF-EMD (the shipped config without semigroup)", []),
    # the (t, s) proposal
    "prop_sorted": ("proposal: t, s independent logit-normal, sorted", SORTED),
    "prop_interval": ("proposal: gap logit-normal(0, 1), then its position", INTERVAL),
    "prop_long_gap": ("proposal: 25% of pairs with gap ~ U(1/2, 1)", LONG_GAP),
    # the shares of t = 1, s = 0 and s = t
    "t_one_0.3": ("share of t = 1: 0.3 (base 0.1)", [SAMPLER + "p_t_one", "0.3"]),
    "s_zero_0.3": ("share of s = 0: 0.3 (base 0.1)", [SAMPLER + "p_s_zero", "0.3"]),
    "diag_0": ("share of s = t: 0 (base 0.25)", [SAMPLER + "p_diagonal", "0.0"]),
    "diag_0.5": ("share of s = t: 0.5 (base 0.25)", [SAMPLER + "p_diagonal", "0.5"]),
    # the per-example weighting
    "w_adaptive": ("weighting: adaptive (base none)", [OBJECTIVE + "weighting", "adaptive"]),
    "w_gap": ("weighting: t - s", ["--model.objective", "ablation_options.GapEMD"]),
    "w_inv_gap": ("weighting: 1 / (t - s + 0.05)", ["--model.objective", "ablation_options.InvGapEMD"]),
    # the tangent normalisation g / (||g|| + c)
    "norm_c_1": ("tangent normalisation c = 1 (base 0.1)", [OBJECTIVE + "tangent_norm", "1.0"]),
    "norm_off": ("no tangent normalisation (c = 0)", [OBJECTIVE + "tangent_norm", "0.0"]),
    # optimisation
    "lr_3e-4": ("lr 3e-4 (base 1e-4)", ["--model.optimizer.init_args.lr", "0.0003"]),
    "lr_1e-3": ("lr 1e-3 (base 1e-4)", ["--model.optimizer.init_args.lr", "0.001"]),
    "warmup_250": ("warmup H = 250 (base 1000)", [OBJECTIVE + "warmup", "250"]),
    "warmup_2500": ("warmup H = 2500 (base 1000)", [OBJECTIVE + "warmup", "2500"]),
    "ema_0.99": ("EMA decay 0.99 (base 0.999)", [{"EMA": {"decay": 0.99}}]),
    "ema_0.9999": ("EMA decay 0.9999 (base 0.999)", [{"EMA": {"decay": 0.9999}}]),
    # the network
    "init_random": ("student initialised at random, not from the teacher", ["--model.init_from_teacher", "false"]),
    "width_512": ("MLP width 512 at random init (the teacher is 256 wide)",
                  ["--model.net.init_args.backbone.init_args.width", "512", "--model.init_from_teacher", "false"]),
    # combinations of the choices above that helped one at a time
    "long_gap_0.5": ("long_gap proposal with p_long = 0.5", [*LONG_GAP, SAMPLER + "p_long", "0.5"]),
    "long_gap_lr_3e-4": ("long_gap proposal and lr 3e-4", [*LONG_GAP, "--model.optimizer.init_args.lr", "0.0003"]),
    # a high learning rate that decays: large moves early, small ones at the end
    "lr_1e-3_decay": ("lr 1e-3, linear decay to 0 over steps 500-2500", LR_DECAY),
    "long_gap_lr_1e-3_decay": ("long_gap proposal, lr 1e-3 decaying to 0 over steps 500-2500", [*LONG_GAP, *LR_DECAY]),
    "ema_power_0.05": ("power-function EMA, sigma_rel 0.05 (base: classic EMA 0.999)",
                       [{"EMA": {"decay": None, "sigma_rel": 0.05}}]),
    "long_gap_ema_power_0.05": ("long_gap proposal and the power-function EMA, sigma_rel 0.05",
                                [*LONG_GAP, {"EMA": {"decay": None, "sigma_rel": 0.05}}]),
    # the student's own two-jump map as the target of a share of the batch (docs/maths.md §12)
    "semigroup_0.25": ("a quarter of the batch on the two-jump (semigroup) target",
                       [*RANDOM_PICK, OBJECTIVE + "semigroup", "0.25"]),
    "semigroup_0.5": ("half of the batch on the two-jump (semigroup) target", [*RANDOM_PICK, OBJECTIVE + "semigroup", "0.5"]),
    "long_gap_semigroup_0.25": ("long_gap proposal and a quarter of the batch on the two-jump target",
                                [*RANDOM_PICK, *LONG_GAP, OBJECTIVE + "semigroup", "0.25"]),
    "semigroup_longest_0.25": ("the longest quarter of each batch's jumps on the two-jump target (shipped)",
                               [OBJECTIVE + "semigroup", "0.25"]),
    "semigroup_longest_0.5": ("the longest half of each batch's jumps on the two-jump target",
                              [OBJECTIVE + "semigroup", "0.5"]),
}
DISTIL = os.path.join(ROOT, "configs", "toy", "distill_emd.yaml")
# Every cell starts from plain AYF-EMD: the shipped config without its two-jump share (the shipped
# config itself is the cell semigroup_longest_0.25); a cell's own overrides come after and win.
PLAIN = [OBJECTIVE + "semigroup", "0"]


def cli_overrides(overrides, folder, name):
    """The CLI options of a cell. A dict ``{callback class name: {init arg: value}}`` changes a
    callback of the config (configs/toy/base.yaml's); Lightning's list of callbacks is replaced
    whole, so it is written out (to ``folder/name.callbacks.yaml``) and layered with ``--config``."""
    args, changes = [], {}
    for item in overrides:
        if isinstance(item, dict):
            changes.update(item)
        else:
            args.append(item)
    if changes:
        with open(os.path.join(ROOT, "configs", "toy", "base.yaml")) as fh:
            callbacks = yaml.safe_load(fh)["trainer"]["callbacks"]
        for cb in callbacks:
            cb.setdefault("init_args", {}).update(changes.get(cb["class_path"].rsplit(".", 1)[-1], {}))
        path = os.path.join(folder, f"{name}.callbacks.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump({"trainer.callbacks": callbacks}, fh)
        args = ["--config", path, *args]
    return args


def mixture_config(name, out):
    """Path of a data config for the mixture ``name`` (the shipped file, or one written under out)."""
    spec = MIXTURES[name]
    if isinstance(spec, str):
        return spec
    with open(MIXTURES["shipped"]) as fh:
        cfg = yaml.safe_load(fh)
    cfg["init_args"]["mixture"] = spec
    cfg["init_args"]["classes"] = None  # null, not absent: `--data` merges into the config's data.yaml
    path = os.path.join(out, "data.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return path


def fit(args, log):
    """``ayf fit`` quietly (its output goes to log); raises on failure."""
    with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        code = ayf_main(["fit", *args])
    if code != 0:
        raise SystemExit(f"ayf fit failed; see {log}")


def last_ckpt(root, name):
    paths = sorted(glob.glob(os.path.join(root, name, "version_*", "checkpoints", "last.ckpt")), key=os.path.getmtime)
    return paths[-1] if paths else None


def teacher(out, data, steps):
    """The learned teacher of this mixture (configs/toy/teacher.yaml, trained once and kept)."""
    root = os.path.join(out, "runs")
    path = last_ckpt(root, "teacher")
    if path is None:
        print(f"training the teacher ({steps} steps)", flush=True)
        fit(["--config", os.path.join(ROOT, "configs", "toy", "teacher.yaml"), "--data", data,
             "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
             "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root,
             "--trainer.logger.init_args.name", "teacher", "--trainer.enable_progress_bar", "false"],
            os.path.join(out, "teacher.log"))
        path = last_ckpt(root, "teacher")
    return path


@torch.no_grad()
def score(ckpt, oracle, noise, exact):
    net, _ = load_network(ckpt, kinds=("FlowMapDistillation",))
    return {N: fidelity_row(oracle, generate(net, noise, N), exact, exact) for N in STEPS}


def run_cell(out, data, teacher_ckpt, cell, seed, steps, oracle, noise, exact, retrain=False):
    """One (cell, seed): trains unless its result file exists; returns the stored result."""
    name = f"{cell}_seed{seed}_steps{steps}"
    result = os.path.join(out, "results", f"{name}.json")
    if os.path.exists(result) and not retrain:
        with open(result) as fh:
            return json.load(fh)
    root = os.path.join(out, "runs")
    start = time.time()
    fit(["--config", DISTIL, "--data", data,
         "--seed_everything", str(seed), "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
         "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root,
         "--trainer.logger.init_args.name", name, "--trainer.enable_progress_bar", "false",
         "--model.teacher", "ayf.checkpoints.CheckpointTeacher", "--model.teacher.ckpt_path", teacher_ckpt,
         *PLAIN, *cli_overrides(CELLS[cell][1], os.path.join(out, "logs"), name)], os.path.join(out, "logs", f"{name}.log"))
    seconds = time.time() - start
    rows = score(last_ckpt(root, name), oracle, noise, exact)
    stored = {"cell": cell, "seed": seed, "steps": steps, "seconds": seconds,
              "overrides": CELLS[cell][1], "scores": {str(n): r for n, r in rows.items()}}
    os.makedirs(os.path.dirname(result), exist_ok=True)
    with open(result, "w") as fh:
        json.dump(stored, fh, indent=1)
    return stored


def summarise(results, metric, n):
    vals = [r["scores"][str(n)][metric] for r in results]
    mean = statistics.fmean(vals)
    return mean, (max(vals) - min(vals)) / 2


def table(by_cell, data_logp):
    cols = ["cell", "varies"] + [f"med {n}" for n in STEPS] + ["rms 1", "rms 4", "logp 1", "logp 4", "s/step"]
    rows = []
    for cell, results in by_cell.items():
        row = {"cell": cell, "varies": CELLS[cell][0]}
        for n in STEPS:
            m, d = summarise(results, "median_dist", n)
            row[f"med {n}"] = f"{m:.3f} ± {d:.3f}"
        for n in (1, 4):
            m, d = summarise(results, "rms_dist", n)
            row[f"rms {n}"] = f"{m:.3f} ± {d:.3f}"
            m, d = summarise(results, "mean_logp", n)
            row[f"logp {n}"] = f"{m:.2f} ± {d:.2f}"
        row["s/step"] = f"{statistics.fmean(r['seconds'] / r['steps'] for r in results):.3f}"
        rows.append(row)
    return format_table(rows, cols) + f"\n\nmean log-density of the data: {data_logp:.3f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=",".join(CELLS), help="comma-separated subset of the cells (--list names them)")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (at least 2 for a spread)")
    p.add_argument("--steps", type=int, default=2500, help="distillation steps of every cell (make demo's budget)")
    p.add_argument("--teacher_steps", type=int, default=3000, help="teacher steps (make demo's budget)")
    p.add_argument("--mixture", default="shipped", choices=list(MIXTURES))
    p.add_argument("--samples", type=int, default=4000, help="noise vectors scored per cell")
    p.add_argument("--out", default="bench_out/ablation")
    p.add_argument("--retrain", action="store_true", help="train cells again even when their results exist")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    p.add_argument("--list", action="store_true", help="print the cells and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (what, overrides) in CELLS.items():
            print(f"{name:16s} {what}: {' '.join(map(str, overrides)) or '-'}")
        return 0
    cells = [c for c in args.cells.split(",") if c]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; --list names them")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    out = os.path.join(args.out, args.mixture)
    for sub in ("logs", "results"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    data = mixture_config(args.mixture, out)
    oracle = load_mixture(data)
    gen = torch.Generator().manual_seed(123)
    noise = torch.randn(args.samples, oracle.dim, generator=gen)
    exact = exact_endpoints(oracle, noise)
    data_logp = oracle.log_prob(oracle.sample(args.samples, generator=gen)).mean().item()
    teacher_ckpt = teacher(out, data, args.teacher_steps)
    by_cell = {}
    for cell in cells:
        by_cell[cell] = []
        for seed in seeds:
            r = run_cell(out, data, teacher_ckpt, cell, seed, args.steps, oracle, noise, exact, args.retrain)
            by_cell[cell].append(r)
            print(f"{cell} seed {seed}: 1/2/4/8-step median " + " / ".join(
                f"{r['scores'][str(n)]['median_dist']:.3f}" for n in STEPS) + f" ({r['seconds']:.0f} s)", flush=True)
    text = table(by_cell, data_logp)
    header = (f"mixture {args.mixture}, teacher {args.teacher_steps} steps, distillation {args.steps} steps, "
              f"seeds {args.seeds}, {args.samples} samples; mean ± half-range over seeds\n\n")
    print("\n" + header + text)
    with open(os.path.join(out, "ablation.md"), "w") as fh:
        fh.write(header + text + "\n")
    with open(os.path.join(out, "ablation.json"), "w") as fh:
        json.dump({"args": vars(args), "data_logp": data_logp, "cells": by_cell}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
