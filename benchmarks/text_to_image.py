"""Text to image on a CPU: a tiny FLUX-shaped pipeline, its transformer trained as a
text-conditional teacher on scikit-learn's digits with captions ("a handwritten seven"), then
distilled into a LoRA flow-map student; FD and prompt accuracy at 1, 2, 4 and 8 steps.

    python benchmarks/text_to_image.py                                   # the defaults below
    python benchmarks/text_to_image.py --teacher_steps 200 --student_steps 100 --samples 50   # a smoke run

Steps (each skipped when its output exists, under --out):
1. pairs/: the 1797 digits as PNGs with captions.jsonl ("a handwritten <digit>", its label);
2. pipe/: a tiny FLUX-shaped pipeline built offline (tests/text_pipeline.py: FluxTransformer2DModel,
   AutoencoderKL, CLIP and T5 text encoders, word-level tokenizers from the captions' words);
3. shards/: `ayf shards captions --pixels` (8x8 pixels, each caption's embeddings), 20% held out;
4. teacher/: `ayf fit` of ayf.tasks.FlowMatching on the pipeline's transformer (fresh weights,
   captions dropped 10% of the time for the empty prompt), then pipe_teacher/: the pipeline with
   the trained transformer, the base model of the student;
5. student/: `ayf fit` of FlowMapDistillation: FluxTeacher(pipe_teacher), a LoRA student
   (FluxBackbone(pipe_teacher, lora_rank)), AYF-EMD;
6. the table: per prompt "a handwritten d" (d = 0..9), --samples samples each from one noise; the
   teacher by Euler at 8/16/32/64 steps, the student at 1/2/4/8; FD in the features of the digits
   classifier (data/digits/features.pt, `ayf features fit`; benchmarks/images.py writes it)
   against the 1797 digits, and prompt accuracy: the share of samples the classifier assigns to
   the prompt's digit. Written to <out>/results.md.
Targets: 4-step prompt accuracy within 2 points of the teacher's best, 4-step FD at most 1.3x the teacher's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import warnings

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TRANSFORMER = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                   axes_dims_rope=(4, 6, 6))


def ayf(*args):
    print("+ ayf " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "ayf", *args], check=True, cwd=ROOT)


def pairs(out):
    from PIL import Image

    from ayf.data.sources import digits_source
    from tests.text_pipeline import caption

    folder = os.path.join(out, "pairs")
    if os.path.isfile(os.path.join(folder, "captions.jsonl")):
        return folder
    os.makedirs(folder, exist_ok=True)
    images, labels, _ = digits_source()
    lines = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img[0]).save(os.path.join(folder, f"{i}.png"))
        lines.append(json.dumps({"image": f"{i}.png", "caption": caption(int(label)), "label": int(label)}))
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return folder


def pipeline(out):
    folder = os.path.join(out, "pipe")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        from tests.text_pipeline import flux_pipeline

        flux_pipeline(folder, latent_channels=1, transformer=TRANSFORMER)
    return folder


def fit(config: dict, name: str, out: str, extra=()) -> str:
    ckpt = os.path.join(out, name, "last.ckpt")
    if not os.path.isfile(ckpt):
        path = os.path.join(out, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        ayf("fit", "--config", path, *extra)
    return ckpt


def trainer(out, name, steps):
    return {"accelerator": "cpu", "devices": 1, "max_steps": steps, "logger": False, "default_root_dir": os.path.join(out, name),
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_model_summary": False,
            "callbacks": [{"class_path": "ayf.callbacks.EMA", "init_args": {"decay": 0.999}},
                          {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": os.path.join(out, name), "save_last": True}}]}


def data(shards, batch):
    return {"class_path": "ayf.data.ImageShards", "init_args": {"train": f"{shards}/train", "batch_size": batch,
                                                                "epoch_length": 100 * batch}}


def teacher_pipeline(out, pipe, teacher_ckpt):
    """A copy of the pipeline whose transformer holds the teacher's EMA weights."""
    folder = os.path.join(out, "pipe_teacher")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    from ayf.checkpoints import load_network

    net, _ = load_network(teacher_ckpt)
    shutil.copytree(pipe, folder + ".tmp", dirs_exist_ok=True)
    net.backbone.model.save_pretrained(os.path.join(folder + ".tmp", "transformer"))
    os.replace(folder + ".tmp", folder)
    return folder


@torch.no_grad()
def evaluate(args, pipe_teacher, student_ckpt, shards):
    from ayf.checkpoints import CheckpointFlowMap
    from ayf.data.sources import digits_source
    from ayf.figures import to_uint8
    from ayf.metrics.features import ClassifierFeatures
    from ayf.metrics.fidelity import frechet_from_features
    from ayf.nn import Cond, FlowMap
    from ayf.nn.flux import FluxBackbone
    from ayf.sampling import generate_batched
    from ayf.text import PromptEncoder
    from tests.text_pipeline import caption

    classifier = ClassifierFeatures(args.features)
    real = classifier.extract(torch.from_numpy(digits_source()[0]))
    teacher = FlowMap(FluxBackbone(pipe_teacher, latent_size=8), s_embedding="none").eval()
    student = CheckpointFlowMap(student_ckpt).eval()
    n = args.samples
    digits = torch.arange(10).repeat_interleave(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prompts = PromptEncoder(pipe_teacher)([caption(int(d)) for d in digits])
    cond = Cond(text=prompts.text, text_mask=prompts.text_mask, pooled=prompts.pooled)
    noise = torch.randn(len(digits), *teacher.data_shape, generator=torch.Generator().manual_seed(0))
    rows = {}
    settings = [("teacher Euler", teacher, "euler", k) for k in (8, 16, 32, 64)]
    settings += [("student", student, "flow_map", k) for k in (1, 2, 4, 8)]
    for label, model, solver, k in settings:
        x = generate_batched(model, noise, k, cond, solver=solver, batch_size=500, progress=f"{label} {k}")
        u8 = to_uint8(x)
        accuracy = float((classifier.net(u8).argmax(1) == digits).float().mean())
        rows[f"{label} {k}"] = (frechet_from_features(classifier.extract(u8), real), accuracy)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "bench_out", "text_to_image"))
    p.add_argument("--teacher_steps", type=int, default=4000)
    p.add_argument("--student_steps", type=int, default=2000)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--samples", type=int, default=200, help="samples per prompt (10 prompts)")
    p.add_argument("--features", default=os.path.join(ROOT, "data", "digits", "features.pt"),
                   help="the digits classifier of `ayf features fit` (benchmarks/images.py writes it)")
    args = p.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    pipe = pipeline(out)
    shards = os.path.join(out, "shards")
    if not os.path.isfile(os.path.join(shards, "train", "manifest.json")):
        ayf("shards", "captions", "--input", pairs(out), "--pipeline", pipe, "--pixels", "--output", shards,
            "--val_fraction", "0.2")
    null = f"{shards}/train/null_prompt.pt"
    backbone = {"class_path": "ayf.nn.flux.FluxBackbone", "init_args": {"model": pipe, "latent_size": 8,
                                                                         "null_prompt": null}}
    teacher_ckpt = fit({"seed_everything": 0, "trainer": trainer(out, "teacher", args.teacher_steps),
                        "model": {"class_path": "ayf.tasks.FlowMatching", "init_args": {
                            "net": {"class_path": "ayf.nn.FlowMap", "init_args": {"backbone": backbone,
                                                                                   "s_embedding": "none"}},
                            "label_dropout": 0.1,
                            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}}},
                        "data": data(shards, 128)}, "teacher", out)
    pipe_teacher = teacher_pipeline(out, pipe, teacher_ckpt)
    student_ckpt = fit({"seed_everything": 0, "trainer": trainer(out, "student", args.student_steps),
                        "model": {"class_path": "ayf.tasks.FlowMapDistillation", "init_args": {
                            "teacher": {"class_path": "ayf.nn.flux.FluxTeacher",
                                        "init_args": {"model": pipe_teacher, "latent_size": 8, "null_prompt": null}},
                            "net": {"class_path": "ayf.nn.FlowMap", "init_args": {"backbone": {
                                "class_path": "ayf.nn.flux.FluxBackbone",
                                "init_args": {"model": pipe_teacher, "latent_size": 8, "lora_rank": args.lora_rank}}}},
                            "objective": {"class_path": "ayf.objectives.EMD", "init_args": {"warmup": args.student_steps // 4}},
                            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}}},
                        "data": data(shards, 128)}, "student", out)
    rows = evaluate(args, pipe_teacher, student_ckpt, shards)
    best_fd = min(fd for name, (fd, _) in rows.items() if name.startswith("teacher"))
    best_acc = max(acc for name, (_, acc) in rows.items() if name.startswith("teacher"))
    lines = [f"digits with captions, {args.samples} samples per prompt; teacher {args.teacher_steps} steps, LoRA "
             f"(rank {args.lora_rank}) student {args.student_steps} steps", "",
             "| sampler | steps | FD | FD / teacher best | prompt accuracy |", "|---|---|---|---|---|"]
    for name, (fd, acc) in rows.items():
        label, k = name.rsplit(" ", 1)
        lines.append(f"| {label} | {k} | {fd:.4g} | {fd / best_fd:.2f} | {acc:.3f} |")
    fd4, acc4 = rows["student 4"]
    lines += ["", f"- 4-step prompt accuracy {acc4:.3f} against the teacher's best {best_acc:.3f}: "
              f"{'PASS' if acc4 >= best_acc - 0.02 else 'MISS'} (target: within 2 points)",
              f"- 4-step FD {fd4 / best_fd:.2f}x the teacher's best: {'PASS' if fd4 <= 1.3 * best_fd else 'MISS'} "
              "(target: at most 1.3x)"]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
