"""Digits in the latent space of a small random VAE, from shards to diffusers, on the CPU.

    python benchmarks/latent.py --out /tmp/latent            # about 10 minutes on 2 cores
    python benchmarks/latent.py --out /tmp/latent --teacher_steps 4000 --student_steps 2000

What it does, through the CLI a user runs (each step skipped when its output exists):
1. a random AutoencoderKL (1 -> 4 channels, downsampling by 2; nothing is downloaded) saved in
   <out>/weights/vae; scikit-learn's digits padded to 16x16 as pixel shards (<out>/data/pixels) and
   as latent shards through the VAE (<out>/data/digits, (4, 8, 8) latents), normalised per
   channel with the raw latents' own mean and std (measured on the training images first);
2. the classifier feature extractor on the pixel shards;
3. configs/digits/teacher.yaml and configs/digits/distill_emd.yaml on the latents (the teacher's
   U-Net resized to the latent shape);
4. ``ayf test`` of the teacher (8/16/32 Euler steps) and of the student (1/2/4/8 steps), against
   the pixel images and against the decoded posterior means of the latents;
5. ``ayf export`` of the student and, from one noise, the largest difference between diffusers'
   FlowMapEulerDiscreteScheduler loop and ``ayf sample``, in latents and in decoded pixels.

The VAE is random: its reconstructions are not digits, so the FD figures measure how well the
student follows its teacher in this space, not image quality. Tables go to stdout and
<out>/results.md.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ayf.cli import main  # noqa: E402

LATENT_NET = ["--model.init_args.net.init_args.backbone.init_args.img_channels", "4",
              "--model.init_args.net.init_args.backbone.init_args.img_resolution", "8"]


def run(*argv):
    print("$ ayf " + " ".join(argv), flush=True)
    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"ayf {argv[0]} failed ({code})")


def only(pattern):
    found = sorted(glob.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"expected one file for {pattern}, found {found}")
    return found[0]


def make_vae(folder):
    import diffusers

    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                            latent_channels=4, norm_num_groups=16, sample_size=16).save_pretrained(folder)


def normalisation_of(vae_folder, images):
    """``{"mean", "std"}`` per channel of the raw posterior means of ``images`` (uint8 (N, 1, H, W))."""
    from ayf.encoders import VAEEncoder

    enc = VAEEncoder(vae_folder, normalisation={"mean": [0.0] * 4, "std": [1.0] * 4}, pixel_range="[-1,1]",
                     stored="mean")
    raw = torch.cat([enc.encode(torch.from_numpy(images[i: i + 256])) for i in range(0, len(images), 256)])
    return {"mean": raw.mean((0, 2, 3)).tolist(), "std": raw.std((0, 2, 3)).tolist()}


def digits_pixels():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return np.pad(x, ((0, 0), (4, 4), (4, 4)))[:, None], d.target.astype(np.int64)


def fidelity_overlay(path, steps, solvers, output, reference=None, num_samples=1000):
    lines = ["trainer.callbacks:", "  - class_path: ayf.callbacks.EMA", "    init_args: {decay: 0.999}",
             "  - class_path: ayf.callbacks.FidelityMetrics", "    init_args:",
             "      extractor: {class_path: ayf.metrics.ClassifierFeatures, init_args: {path: data/digits/features.pt}}",
             f"      steps: {steps}", f"      solvers: {solvers}", f"      num_samples: {num_samples}",
             f"      output: {output}"]
    if reference:
        lines.append(f"      reference: {reference}")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def main_(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    with contextlib.chdir(args.out):
        cfg = lambda stage: os.path.join(ROOT, "configs", "digits", f"{stage}.yaml")  # noqa: E731
        if not os.path.isdir("weights/vae"):
            make_vae("weights/vae")
        images, labels = digits_pixels()
        if not os.path.isdir("data/pixels"):
            np.savez("digits16.npz", images=images[:, 0], labels=labels)
            run("shards", "arrays", "--images", "digits16.npz", "--output", "data/pixels", "--val_fraction", "0.2")
        if not os.path.isdir("data/digits"):
            norm = normalisation_of("weights/vae", images)
            print("normalisation (raw posterior means of the images):", json.dumps(norm))
            run("shards", "arrays", "--images", "digits16.npz", "--output", "data/digits", "--val_fraction", "0.2",
                "--vae", "weights/vae", "--vae_pixel_range", "[-1,1]", "--vae_normalisation", json.dumps(norm))
        if not os.path.isfile("data/digits/features.pt"):
            run("features", "fit", "--train", "data/pixels/train", "--val", "data/pixels/val",
                "--output", "data/digits/features.pt", "--epochs", "60")
        common = ["--trainer.enable_progress_bar", "false"]
        if not glob.glob("runs/digits/teacher/version_0/checkpoints/last.ckpt"):
            run("fit", "--config", cfg("teacher"), *LATENT_NET, *common, "--trainer.max_steps", str(args.teacher_steps))
        teacher = only("runs/digits/teacher/version_0/checkpoints/last.ckpt")
        if not glob.glob("runs/digits/distill_emd/version_0/checkpoints/last.ckpt"):
            run("fit", "--config", cfg("distill_emd"), *common, "--trainer.max_steps", str(args.student_steps),
                "--model.objective.init_args.warmup", str(args.student_steps // 2))
        student = only("runs/digits/distill_emd/version_0/checkpoints/last.ckpt")

        rows = {}
        for ref_name, ref in (("pixel images", "data/pixels/train"), ("decoded latents", None)):
            tag = "pixels" if ref else "decoded"
            for who, stage, ckpt, steps, solvers in (("teacher", "teacher", teacher, "[8, 16, 32]", "[euler]"),
                                                      ("student", "distill_emd", student, "[1, 2, 4, 8]", "[euler]")):
                out = f"fid_{who}_{tag}.json"
                if not os.path.isfile(out):
                    overlay = fidelity_overlay(f"fid_{who}_{tag}.yaml", steps, solvers, out, ref)
                    extra = LATENT_NET if who == "teacher" else []
                    run("test", "--config", cfg(stage), *extra, "--config", overlay, "--ckpt_path", ckpt, *common)
                for name, res in json.load(open(out))["results"].items():
                    rows.setdefault((who, name), {})[ref_name] = res["fd"]

        # export, and the same noise sampled both ways
        if not os.path.isdir("exported"):
            run("export", "--ckpt_path", student, "--output", "exported")
        noise = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        np.save("noise.npy", noise.numpy())
        from diffusers import FlowMapEulerDiscreteScheduler

        from ayf.export import FlowMapModel, FlowMapPipeline

        model = FlowMapModel.from_pretrained("exported/flow_map")
        scheduler = FlowMapEulerDiscreteScheduler.from_pretrained("exported/scheduler")
        pipe = FlowMapPipeline.from_pretrained("exported")
        label = torch.arange(64) % 10
        parity = []
        for k in (1, 2, 4):
            for decode in (False, True):
                path = f"ayf_{k}_{'px' if decode else 'lat'}.npy"
                run("sample", "--ckpt_path", student, "--noise", "noise.npy", "--steps", str(k), "--label", "all",
                    "--output", path, "--overwrite", *(["--decode"] if decode else []))
                ours = torch.from_numpy(np.load(path))
                if decode:
                    theirs = pipe(num_inference_steps=k, class_labels=label, latents=noise, output_type="pt").images
                else:
                    scheduler.set_timesteps(k)
                    x = noise
                    with torch.no_grad():
                        for i, t in enumerate(scheduler.timesteps):
                            r = scheduler.sigmas[i + 1] * scheduler.config.num_train_timesteps
                            x = scheduler.step(model(x, t, r, class_labels=label).sample, t, x, r_timestep=r).prev_sample
                    theirs = x
                parity.append((k, "decoded pixels (pipeline)" if decode else "latents (scheduler loop)",
                               float((theirs - ours).abs().max()), float(ours.abs().max())))

    lines = ["| model | setting | FD vs pixel images | FD vs decoded latents |", "|---|---|---|---|"]
    for (who, name), r in rows.items():
        lines.append(f"| {who} | {name} | {r.get('pixel images', float('nan')):.3f} | "
                     f"{r.get('decoded latents', float('nan')):.3f} |")
    lines += ["", "| steps | compared | max abs difference, diffusers vs ayf sample | max abs value |", "|---|---|---|---|"]
    lines += [f"| {k} | {what} | {d:.2e} | {m:.3f} |" for k, what, d, m in parity]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(table + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_latent", help="working folder (data, weights, runs, tables)")
    p.add_argument("--teacher_steps", type=int, default=3000)
    p.add_argument("--student_steps", type=int, default=2000)
    main_(p.parse_args())
