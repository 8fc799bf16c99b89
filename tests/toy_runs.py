"""Tiny runs through the real CLI, shared by the task and integration tests: a shipped config
(configs/) layered with the small test configs of tests/conf/, which shrink it."""
import glob
import os

import numpy as np

from ayf.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "tests", "conf")
# options that layer a tests/conf file over the config given before them
TINY_TOY = ["--config", os.path.join(CONF, "toy", "tiny.yaml")]  # 3 steps on 256 points, no progress bar
SMALL_NET = ["--config", os.path.join(CONF, "toy", "small_net.yaml")]  # an MLP of width 16, one block


def shipped(dataset, stage):
    """Path of the shipped config configs/<dataset>/<stage>.yaml."""
    return os.path.join(ROOT, "configs", dataset, f"{stage}.yaml")


def toy_args(tmp, config, name=None, steps=3, extra=()):
    """``ayf fit`` arguments of configs/toy/<config>.yaml under tests/conf/toy/tiny.yaml for ``steps``
    steps, with its runs (named ``name``, else as the config names them) under ``tmp``."""
    args = ["fit", "--config", shipped("toy", config), *TINY_TOY,
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp)]
    if name is not None:
        args += ["--trainer.logger.init_args.name", name]
    return [*args, *extra]


def fit_toy(tmp, config, name, steps, extra=()):
    """``ayf fit`` of configs/toy/<config>.yaml for a few steps on 256 points; returns last.ckpt."""
    assert main(toy_args(tmp, config, name, steps, extra)) == 0
    (path,) = glob.glob(os.path.join(str(tmp), name, "version_*", "checkpoints", "last.ckpt"))
    return path


def blobs(n=96, seed=0):
    """Labelled 8x8 images: a bright square whose corner encodes the class (0..3)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, size=(n, 8, 8)).astype(np.uint8)
    y = np.arange(n) % 4
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 4 * r: 4 * r + 4, 4 * q: 4 * q + 4] = 220
    return x, y


# teachers the image configs name that no tiny run writes (teacher_cfg, a 1000-step checkpoint, a smaller
# weak teacher): the tiny teacher's last checkpoint stands in; it is trained with label dropout, for CFG
STAND_IN = {"distill_cfg": "--model.teacher.init_args.teacher.init_args.ckpt_path",
            "distill_autoguidance": "--model.teacher.init_args.weak.init_args.ckpt_path",
            "adversarial_autoguidance": "--model.teacher.init_args.weak.init_args.ckpt_path"}


#: the stages whose configs write their own net (the others build it on their teacher, or read it
#: from the distilled checkpoint), which the small-net overlays shrink
WRITE_NET = {"toy": ("teacher", "teacher_cond", "teacher_weak", "distill_emd", "distill_lmd", "distill_consistency"),
             "points": ("teacher",), "digits": ("teacher",), "fashion_mnist": ("teacher",)}


def stage_args(dataset, stage):
    """``ayf fit`` of a shipped stage under its tests/conf/<dataset> overlays."""
    if stage.startswith("adversarial"):
        overlays = ["tiny", "tiny_adversarial"]
    elif stage in ("realign", "teacher_edm2"):
        overlays = ["tiny", {"teacher_edm2": "tiny_edm2_net", "realign": "tiny_realign"}[stage]]
    elif stage in WRITE_NET.get(dataset, ()):
        overlays = ["tiny", "small_net" if dataset in ("toy", "points") else "tiny_net"]
    else:
        overlays = ["tiny"]
    args = ["fit", "--config", shipped(dataset, stage), *[a for n in overlays for a in
                                                         ("--config", os.path.join(CONF, dataset, f"{n}.yaml"))]]
    if dataset not in ("toy", "points") and stage == "teacher":
        args += ["--model.label_dropout", "0.1"]
    if dataset in ("digits", "fashion_mnist") and stage in STAND_IN:
        args += [STAND_IN[stage], f"runs/{dataset}/teacher/version_0/checkpoints/last.ckpt"]
    return args


def write_image_data(dataset):
    """Tiny shards in data/<dataset>/{train,val} and a feature extractor in data/<dataset>/features.pt."""
    images, labels = blobs(64)
    np.savez(f"{dataset}.npz", images=images, labels=labels)
    assert main(["shards", "arrays", "--images", f"{dataset}.npz", "--output", f"data/{dataset}", "--val_fraction", "0.25"]) == 0
    assert main(["features", "fit", "--train", f"data/{dataset}/train", "--val", f"data/{dataset}/val", "--output",
                 f"data/{dataset}/features.pt", "--epochs", "1", "--width", "4", "--feature_dim", "8"]) == 0
