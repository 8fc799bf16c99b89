"""Image quality benchmark: teacher ODE sampling vs the distilled AYF-EMD flow map, in the
classifier-feature space of `ayf features fit` (FD, KID, precision, recall against the training set).

    python benchmarks/images.py --dataset digits                 # CPU, about an hour
    python benchmarks/images.py --dataset fashion_mnist          # needs a GPU
    python benchmarks/images.py --dataset fashion_mnist --teacher_args "--trainer.max_time 00:00:05:00" \
        --student_args "--trainer.max_time 00:00:06:00 --model.objective.init_args.warmup 500"
                                                                 # the same, cut to a time budget
    python benchmarks/images.py --dataset digits --eval_only     # re-evaluate existing checkpoints
    python benchmarks/images.py --dataset digits --adversarial   # + adversarial finetuning
    python benchmarks/images.py --dataset digits --guided 1.5,2  # + an autoguided student at lam 1.5 and 2

Steps (each skipped when its output exists): shards (data/<dataset>), the feature extractor
(data/<dataset>/features.pt), the teacher (configs/<dataset>/teacher.yaml), its evaluation at
8/16/32/64 Euler and Heun steps, the EMD student (configs/<dataset>/distill_emd.yaml) and its
evaluation at 1/2/4/8 steps. Runs go to --out; the table goes to <out>/results.md.
Targets: 4-step FD within 10% of the teacher's best, 1-step within 50%, and no degradation from 4
to 8 steps; with --adversarial they are checked for the finetuned flow map too.

With --adversarial, the student is then finetuned (configs/<dataset>/adversarial.yaml, extra
overrides in --adv_args, run name --adv_name) and evaluated the same way; the before/after table
goes to <out>/<adv_name>.md. Target: 1-step FD at least 25% lower, recall down by less than 0.05.

With --guided, an autoguided student (configs/<dataset>/distill_autoguidance.yaml: lam ~ U[1, 3],
the weak model from the config, under --out) is trained and tested at each lam, with its guided
teacher at 8/16/32/64 Euler and Heun steps from the same noise; the table goes to <out>/guided.md
and the targets are checked against the guided teacher's best at that lam.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"


def run(*args):
    print("+ ayf " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "ayf", *args], check=True, cwd=ROOT)


def newest(pattern):
    paths = glob.glob(pattern)
    return max(paths, key=os.path.getmtime) if paths else None


def shards(dataset, data):
    if os.path.exists(os.path.join(data, "train", "manifest.json")):
        return
    if dataset == "digits":
        run("shards", "digits", "--output", data, "--val_fraction", "0.2")
        return
    for split, prefix in (("train", "train"), ("val", "t10k")):
        run("shards", "idx", "--images", f"{FASHION}/{prefix}-images-idx3-ubyte.gz",
            "--labels", f"{FASHION}/{prefix}-labels-idx1-ubyte.gz", "--pad", "2", "--output", f"{data}/{split}")


def logged_under(out):
    """`ayf` overrides that put a run's logs and checkpoints under ``out``."""
    return ["--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out]


def fit_once(config, out, name, extra=()):
    """``ayf fit`` unless ``<out>/<name>/version_0`` has a last checkpoint; returns its path."""
    ckpt = os.path.join(out, name, "version_0", "checkpoints", "last.ckpt")
    if not os.path.exists(ckpt):
        run("fit", "--config", config, *logged_under(out), *extra)
    return ckpt


def test_once(config, out, name, ckpt, extra=()):
    """``ayf test`` of ``ckpt`` logged under ``<out>/<name>`` unless a fidelity.json is there; returns it."""
    result = newest(os.path.join(out, name, "version_*", "fidelity.json"))
    if result is None:
        run("test", "--config", config, "--ckpt_path", ckpt, *logged_under(out), "--trainer.logger.init_args.name", name,
            *extra)
        result = newest(os.path.join(out, name, "version_*", "fidelity.json"))
    return json.load(open(result))


def stage_callbacks(config):
    """The callback list that a stage config resolves to: its own, or that of the file it pulls in."""
    cfg = yaml.safe_load(open(config))
    callbacks = cfg.get("trainer.callbacks", (cfg.get("trainer") or {}).get("callbacks"))
    if callbacks is None and isinstance(cfg.get("config"), str):
        return stage_callbacks(os.path.join(os.path.dirname(os.path.abspath(config)), cfg["config"]))
    return callbacks or []


def edited_config(config, out, edits):
    """``config`` with its callbacks' init_args edited (``{"FidelityMetrics.num_samples": "5000"}``),
    written to ``<out>/configs/``; ``config`` itself when there are no edits. Its ``config:`` and
    ``data:`` files are kept by absolute path."""
    if not edits:
        return config
    cfg = yaml.safe_load(open(config))
    here = os.path.dirname(os.path.abspath(config))
    callbacks = cfg["trainer.callbacks"] = stage_callbacks(config)
    for key, value in edits.items():
        cls, arg = key.rsplit(".", 1)
        hits = [c for c in callbacks if c["class_path"].split(".")[-1] == cls]
        for c in hits:
            c.setdefault("init_args", {})[arg] = yaml.safe_load(value)
        if not hits:
            print(f"note: {os.path.basename(config)} has no {cls} callback; {key} left out", flush=True)
    for key in ("data", "config"):  # included files, kept by absolute path
        if isinstance(cfg.get(key), str):
            cfg[key] = os.path.join(here, cfg[key])
    path = os.path.join(out, "configs", os.path.basename(config))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    return path


def resolved(config):
    """The config as `ayf fit --print_config` resolves it (its layers and defaults)."""
    done = subprocess.run([sys.executable, "-m", "ayf", "fit", "--config", config, "--print_config"], check=True,
                          cwd=ROOT, capture_output=True, text=True)
    return yaml.safe_load(done.stdout)


def fit_and_test(config, out, name, extra=()):
    ckpt = fit_once(config, out, name, extra)
    return ckpt, test_once(config, out, name, ckpt, extra)


def table(rows, best, ratio="FD / teacher best"):
    """Markdown rows ``{sampler: metrics}`` with FD as a multiple of ``best``."""
    lines = [f"| sampler | FD | KID | precision | recall | {ratio} |", "|---|---|---|---|---|---|"]
    for n, r in rows.items():
        lines.append(f"| {n} | {r['fd']:.4g} | {r['kid']:.3g} | {r['precision']:.3f} | {r['recall']:.3f} | {r['fd'] / best:.2f} |")
    return lines


WEAK_FIT = {  # how each dataset's autoguidance config says to train its weak model (when not a teacher checkpoint)
    "fashion_mnist": ["--trainer.max_steps", "5000", "--model.net.init_args.backbone.init_args.channels", "32",
                      "--trainer.logger.init_args.name", "teacher_weak"],
}


def guided(dataset, configs, out, teacher_ckpt, lams):
    """Train the autoguided student and test it at each lam; returns the Markdown report.
    ``configs(name)`` is the path of the dataset's config ``name``."""
    config = configs("distill_autoguidance.yaml")
    weak = resolved(config)["model"]["init_args"]["teacher"]["init_args"]["weak"]["init_args"]["ckpt_path"]
    weak = os.path.join(out, os.path.relpath(weak, os.path.join("runs", dataset)))
    if not os.path.exists(weak):
        run("fit", "--config", configs("teacher.yaml"), *logged_under(out), *WEAK_FIT[dataset])
    extra = ["--model.teacher.init_args.teacher.init_args.ckpt_path", teacher_ckpt,
             "--model.teacher.init_args.weak.init_args.ckpt_path", weak]
    ckpt = fit_once(config, out, "distill_autoguidance", extra)
    lines = [f"{dataset}: autoguided student ({os.path.relpath(ckpt, out)}), weak model {os.path.relpath(weak, out)}"]
    for lam in lams:
        results = test_once(config, out, f"distill_autoguidance_lam{lam:g}", ckpt,
                            [*extra, "--guidance", f"{lam:g}"])["results"]
        teacher = {k: v for k, v in results.items() if k.startswith("teacher_")}
        student = {k: v for k, v in results.items() if k.startswith("flow_map_")}
        best_name, best = min(((k, v["fd"]) for k, v in teacher.items()), key=lambda a: a[1])
        rows = {k.replace("_", " ") + ("-step" if k in student else ""): r for k, r in {**teacher, **student}.items()}
        lines += ["", f"lam = {lam:g}", ""] + table(rows, best, "FD / guided teacher best")
        lines += ["", f"guided teacher best: {best_name.replace('_', ' ')} (FD {best:.4g})"]
        lines += quality_checks(student, best)
    return "\n".join(lines)


def adversarial_report(dataset, before, after, name):
    lines = [f"{dataset}: adversarial finetuning ({name}); {after['num_samples']} samples vs "
             f"{after['reference_count']} training images; features {after['extractor']}", "",
             "| steps | FD before | FD after | change | recall before | recall after | precision before | precision after |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(after["results"], key=lambda k: int(k.split("_")[-1])):
        b, a = before["results"][key], after["results"][key]
        lines.append(f"| {key.split('_')[-1]} | {b['fd']:.4g} | {a['fd']:.4g} | {a['fd'] / b['fd'] - 1:+.1%} | "
                     f"{b['recall']:.3f} | {a['recall']:.3f} | {b['precision']:.3f} | {a['precision']:.3f} |")
    b1, a1 = before["results"]["flow_map_1"], after["results"]["flow_map_1"]
    ok = a1["fd"] <= 0.75 * b1["fd"] and b1["recall"] - a1["recall"] < 0.05
    lines += ["", f"- {'PASS' if ok else 'MISS'}: 1-step FD -25% or better with recall down < 0.05 "
              f"(FD {a1['fd'] / b1['fd'] - 1:+.1%}, recall {a1['recall'] - b1['recall']:+.3f})"]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["digits", "fashion_mnist"], default="digits")
    p.add_argument("--out", default=None, help="run folder (default bench_out/<dataset>)")
    p.add_argument("--eval_only", action="store_true", help="fail instead of training when a checkpoint is missing")
    p.add_argument("--adversarial", action="store_true", help="also finetune the student adversarially and compare")
    p.add_argument("--adv_name", default="adversarial", help="run name of the adversarial stage")
    p.add_argument("--adv_args", default="", help="extra `ayf fit` overrides of the adversarial stage, one string, split as a shell "
                   "would (e.g. \"--model.adversary.init_args.fake_steps_schedule '{2000: [1, 2, 4, 8, 8]}'\")")
    p.add_argument("--teacher_args", default="", help="extra `ayf fit` overrides of the teacher, one string "
                   "(e.g. '--trainer.max_time 00:00:08:00' for a run that fits a time budget)")
    p.add_argument("--student_args", default="", help="extra `ayf fit` overrides of the EMD student, one string")
    p.add_argument("--callback_args", default="", help="edits of the configs' callbacks, space-separated "
                   "Class.arg=value (e.g. 'FidelityMetrics.num_samples=5000 EMA.decay=0.9995'); the "
                   "edited configs are written to <out>/configs")
    p.add_argument("--guided", default="", help="comma-separated guidance scales: also train the autoguided student "
                   "and test it (with its guided teacher) at each")
    args = p.parse_args()
    out = args.out or os.path.join(ROOT, "bench_out", args.dataset)
    data = os.path.join(ROOT, "data", args.dataset)
    cfg = os.path.join(ROOT, "configs", args.dataset)
    if any("=" not in e or "." not in e.split("=")[0] for e in args.callback_args.split()):
        p.error(f"--callback_args takes Class.arg=value items, got {args.callback_args!r}")
    edits = dict(e.split("=", 1) for e in args.callback_args.split())
    config = lambda name: edited_config(os.path.join(cfg, name), out, edits)  # noqa: E731
    if args.eval_only and not glob.glob(os.path.join(out, "*", "version_0", "checkpoints", "last.ckpt")):
        sys.exit(f"no checkpoints under {out}")
    shards(args.dataset, data)
    if not os.path.exists(os.path.join(data, "features.pt")):
        run("features", "fit", "--train", f"{data}/train", "--val", f"{data}/val", "--output", f"{data}/features.pt",
            "--epochs", "60")
    teacher_ckpt, teacher = fit_and_test(config("teacher.yaml"), out, "teacher", shlex.split(args.teacher_args))
    student_ckpt, student = fit_and_test(config("distill_emd.yaml"), out, "distill_emd",
                                         ["--model.teacher.init_args.ckpt_path", teacher_ckpt, *shlex.split(args.student_args)])
    if args.adversarial:
        _, adv = fit_and_test(config("adversarial.yaml"), out, args.adv_name,
                              ["--model.student.init_args.ckpt_path", student_ckpt,
                               "--model.teacher.init_args.ckpt_path", teacher_ckpt,
                               "--trainer.logger.init_args.name", args.adv_name, *shlex.split(args.adv_args)])
        text = adversarial_report(args.dataset, student, adv, args.adv_name)
        print(text)
        with open(os.path.join(out, f"{args.adv_name}.md"), "w") as fh:
            fh.write(text + "\n")

    if args.guided:
        text = guided(args.dataset, config, out, teacher_ckpt, [float(v) for v in args.guided.split(",")])
        print(text)
        with open(os.path.join(out, "guided.md"), "w") as fh:
            fh.write(text + "\n")

    rows = {f"teacher {k.replace('_', ' ')}": v for k, v in teacher["results"].items()}
    students = {"flow map": student["results"]}
    if args.adversarial:
        students[f"flow map + {args.adv_name}"] = adv["results"]
    for label, results in students.items():
        rows.update({f"{label} {k.split('_')[-1]}-step": v for k, v in results.items()})
    best_name, best = min(((n, r["fd"]) for n, r in rows.items() if n.startswith("teacher")), key=lambda a: a[1])
    lines = [f"{args.dataset}: {student['num_samples']} samples vs {student['reference_count']} training images; "
             f"features {student['extractor']}", ""] + table(rows, best)
    lines += ["", f"teacher best: {best_name} (FD {best:.4g})"]
    for label, results in students.items():
        lines += ["", f"{label}:"] + quality_checks(results, best)
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    json.dump({"teacher": teacher, "student": student, **({"adversarial": adv} if args.adversarial else {})},
              open(os.path.join(out, "results.json"), "w"), indent=1)


def quality_checks(results, best):
    """The quality targets for one flow map's ``results`` against the teacher's best FD."""
    fm = {int(k.split("_")[-1]): v["fd"] for k, v in results.items()}
    checks = [
        ("4-step FD within 10% of the teacher's best", fm[4] <= 1.10 * best, f"{fm[4] / best:.2f}x"),
        ("1-step FD within 50% of the teacher's best", fm[1] <= 1.50 * best, f"{fm[1] / best:.2f}x"),
        ("no degradation from 4 to 8 steps", fm[8] <= fm[4], f"{fm[4]:.4g} -> {fm[8]:.4g}"),
    ]
    return [f"- {'PASS' if ok else 'MISS'}: {what} ({detail})" for what, ok, detail in checks]


if __name__ == "__main__":
    main()
