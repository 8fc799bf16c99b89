"""Guidance benchmark on the toy mixture, whose true density is known (docs/maths.md §6).

Trains a class-conditional teacher with label dropout (configs/toy/teacher_cond.yaml), a weak
teacher of the same task (teacher_weak.yaml), and two guided AYF-EMD students
(distill_autoguidance.yaml, distill_cfg.yaml). Then, from the same noise and class labels,
draws 4-step student samples at lam = 1 (no guidance), 2 and 3, with the guided teacher's
Euler-64 ODE beside them, and reports:
  - the mean true log-density log p(x) and the class-conditional log p(x | c) (precision);
  - the share of each mode's mass recovered (recall; ayf.metrics.toy.mode_recall).
Prints a markdown table and writes <out>/guidance.md, guidance.json and guidance.png.

    python benchmarks/guidance.py                    # train everything, then evaluate
    python benchmarks/guidance.py --eval_only        # re-evaluate existing checkpoints
    python benchmarks/guidance.py --eval_only --weak_ckpts \
      "bench_out/guidance/runs/teacher_cond/version_0/checkpoints/epoch=3-step=500.ckpt"
                                                     # + the autoguided teacher with other weak models
"""
from __future__ import annotations

import argparse
import glob
import os
import time

import torch

from ayf.checkpoints import load_network
from ayf.cli import main as ayf_main
from ayf.metrics.toy import class_oracles, load_classes, load_mixture, mode_recall, write_report
from ayf.nn import Cond, GuidedTeacher, NetTeacher
from ayf.sampling import generate

DATA = "configs/toy/data.yaml"


def fit(config, out, name, max_steps, extra=()):
    root = os.path.join(out, "runs")
    args = ["fit", "--config", f"configs/toy/{config}.yaml", "--trainer.default_root_dir", root,
            "--trainer.logger.init_args.save_dir", root, "--trainer.logger.init_args.name", name,
            "--trainer.enable_progress_bar", "false", *extra]
    if max_steps:
        args += ["--trainer.max_steps", str(max_steps)]
    start = time.time()
    if ayf_main(args) != 0:
        raise SystemExit(f"training {name} failed")
    print(f"{name}: {time.time() - start:.0f} s")


def last_ckpt(out, name):
    paths = sorted(glob.glob(os.path.join(out, "runs", name, "version_*", "checkpoints", "last.ckpt")), key=os.path.getmtime)
    if not paths:
        raise SystemExit(f"no checkpoint for {name} under {out}/runs; run without --eval_only first")
    return paths[-1]


def train(out, steps):
    fit("teacher_cond", out, "teacher_cond", steps["teacher"])
    fit("teacher_weak", out, "teacher_weak", steps["weak"])
    strong, weak = last_ckpt(out, "teacher_cond"), last_ckpt(out, "teacher_weak")
    fit("distill_autoguidance", out, "distill_autoguidance", steps["student"],
        ["--model.teacher.init_args.teacher.init_args.ckpt_path", strong,
         "--model.teacher.init_args.weak.init_args.ckpt_path", weak])
    fit("distill_cfg", out, "distill_cfg", steps["student"],
        ["--model.teacher.init_args.teacher.init_args.ckpt_path", strong])


def score(oracle, per_class, samples, label) -> dict:
    x = samples.double()
    cond = torch.empty(len(x), dtype=torch.float64)
    for c, sub in enumerate(per_class):
        mask = label == c
        cond[mask] = sub.log_prob(x[mask])
    recall = mode_recall(oracle, x)
    return {"log_p": oracle.log_prob(x).mean().item(), "log_p_class": cond.mean().item(),
            "recall_min": recall.min().item(), "recall_mean": recall.mean().item(),
            "recall_per_mode": " ".join(f"{r:.2f}" for r in recall.tolist())}


@torch.no_grad()
def evaluate(out, n=8000, seed=7, lams=(1.0, 2.0, 3.0), weak_ckpts=()):
    oracle = load_mixture(DATA)
    classes = torch.as_tensor(load_classes(DATA))
    per_class = class_oracles(oracle, classes)
    gen = torch.Generator().manual_seed(seed)
    data, comp = oracle.sample(n, generator=gen, return_labels=True)
    label = classes[comp]  # class labels drawn with the data's class prior
    noise = torch.randn(n, 2, generator=gen)
    rows = [dict(samples="data", lam="", **score(oracle, per_class, data, label))]
    panels = {"data": data}
    strong, meta = load_network(last_ckpt(out, "teacher_cond"))
    strong = NetTeacher(strong, unconditional=bool(meta.get("label_dropout")))
    weak = NetTeacher(load_network(last_ckpt(out, "teacher_weak"))[0])
    teachers = {"autoguidance": GuidedTeacher(strong, weak), "cfg": GuidedTeacher(strong)}
    for kind in ("autoguidance", "cfg"):
        student, _ = load_network(last_ckpt(out, f"distill_{kind}"))
        for lam in lams:
            cond = Cond.build(n, label=label, lam=lam)
            teacher_x = generate(teachers[kind], noise, 64, cond, solver="euler")
            rows.append(dict(samples=f"{kind} teacher, Euler 64", lam=lam, **score(oracle, per_class, teacher_x, label)))
            x4 = generate(student, noise, 4, cond)
            rows.append(dict(samples=f"{kind} student, 4 steps", lam=lam, **score(oracle, per_class, x4, label)))
            if lam != 1.0:
                panels[f"{kind}, 4 steps, lam {lam:g}"] = x4
            else:
                panels.setdefault("no guidance (lam 1), 4 steps", x4)
    for path in weak_ckpts:  # the autoguided teacher with other weak models
        other = GuidedTeacher(strong, NetTeacher(load_network(path)[0]))
        for lam in lams[1:]:
            x = generate(other, noise, 64, Cond.build(n, label=label, lam=lam), solver="euler")
            rows.append(dict(samples=f"teacher autoguided by {os.path.basename(path)}, Euler 64", lam=lam,
                             **score(oracle, per_class, x, label)))
    return rows, panels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/guidance")
    p.add_argument("--teacher_steps", type=int, default=4000)
    p.add_argument("--weak_steps", type=int, default=0, help="0: the config's (500)")
    p.add_argument("--student_steps", type=int, default=4000)
    p.add_argument("--num_samples", type=int, default=8000)
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--weak_ckpts", nargs="*", default=(), help="other weak FlowMatching checkpoints to guide the teacher with")
    args = p.parse_args(argv)
    if not args.eval_only:
        train(args.out, {"teacher": args.teacher_steps, "weak": args.weak_steps, "student": args.student_steps})
    rows, panels = evaluate(args.out, args.num_samples, weak_ckpts=args.weak_ckpts)
    write_report(args.out, "guidance", rows, ["samples", "lam", "log_p", "log_p_class", "recall_min", "recall_mean",
                                              "recall_per_mode"], panels, "toy mixture: 4-step guided flow maps",
                 floatfmt="{:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
