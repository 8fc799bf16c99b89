"""Digits FD of EMD students whose tangent is the JVP or a finite difference, several seeds each.

    python benchmarks/tangent_digits.py                                  # jvp and central, seeds 0 and 1
    python benchmarks/tangent_digits.py --tangents jvp,central,forward --seeds 0,1,2 --max_steps 6000

One teacher (configs/digits/teacher.yaml, trained once under --out, like benchmarks/images.py),
then for each tangent and seed an EMD student (configs/digits/distill_emd.yaml with
`tangent_method`, `seed_everything` and the data seed set, `trainer.max_steps` cut to --max_steps)
and its `ayf test` at 1/2/4/8 steps. Each stage is skipped when its output exists. Prints FD per
tangent and seed, the spread of each tangent over its seeds, and writes <out>/tangent.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from images import ROOT, fit_and_test, run, shards  # noqa: E402

STEPS = (1, 2, 4, 8)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tangents", default="jvp,central", help="comma-separated: jvp, central, forward")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (training and data order)")
    p.add_argument("--max_steps", type=int, default=3000, help="distillation steps of each student")
    p.add_argument("--out", default=os.path.join(ROOT, "bench_out", "digits_tangent"))
    args = p.parse_args()
    tangents, seeds = args.tangents.split(","), [int(s) for s in args.seeds.split(",")]
    data, cfg = os.path.join(ROOT, "data", "digits"), os.path.join(ROOT, "configs", "digits")
    shards("digits", data)
    if not os.path.exists(os.path.join(data, "features.pt")):
        run("features", "fit", "--train", f"{data}/train", "--val", f"{data}/val", "--output", f"{data}/features.pt",
            "--epochs", "60")
    teacher_ckpt, teacher = fit_and_test(os.path.join(cfg, "teacher.yaml"), args.out, "teacher")
    best = min(r["fd"] for r in teacher["results"].values())
    fd = {}
    for tangent in tangents:
        for seed in seeds:
            name = f"emd_{tangent}_s{seed}"
            _, student = fit_and_test(os.path.join(cfg, "distill_emd.yaml"), args.out, name, [
                "--model.teacher.init_args.ckpt_path", teacher_ckpt, "--trainer.logger.init_args.name", name,
                "--model.objective.init_args.tangent_method", tangent, "--seed_everything", str(seed),
                "--data.init_args.seed", str(seed), "--trainer.max_steps", str(args.max_steps)])
            fd[tangent, seed] = {n: student["results"][f"flow_map_{n}"]["fd"] for n in STEPS}
    lines = [f"digits, EMD students of {args.max_steps} steps; FD at N steps (teacher best {best:.4g})", "",
             "| tangent | seed | " + " | ".join(f"N = {n}" for n in STEPS) + " |", "|---|---|" + "---|" * len(STEPS)]
    for (tangent, seed), row in fd.items():
        lines.append(f"| {tangent} | {seed} | " + " | ".join(f"{row[n]:.4g}" for n in STEPS) + " |")
    lines += ["", "| tangent | " + " | ".join(f"range N = {n}" for n in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for tangent in tangents:
        spans = [[fd[tangent, s][n] for s in seeds] for n in STEPS]
        lines.append(f"| {tangent} | " + " | ".join(f"{min(v):.4g}-{max(v):.4g}" for v in spans) + " |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "tangent.md"), "w") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
