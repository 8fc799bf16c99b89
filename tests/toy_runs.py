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
