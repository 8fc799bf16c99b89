"""Tiny toy runs through the real CLI, shared by the task and integration tests."""
import glob
import os

from ayf.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_NET = ["--model.net.init_args.backbone.init_args.width", "16", "--model.net.init_args.backbone.init_args.depth", "1"]


def fit_toy(tmp, config, name, steps, extra=()):
    """``ayf fit`` of configs/toy/<config>.yaml for a few steps on 256 points; returns last.ckpt."""
    args = ["fit", "--config", os.path.join(ROOT, "configs", "toy", f"{config}.yaml"),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp),
            "--trainer.logger.init_args.name", name, "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--data.init_args.batch_size", "32",
            "--data.init_args.train_samples", "256", "--data.init_args.val_samples", "64", *extra]
    assert main(args) == 0
    (path,) = glob.glob(os.path.join(str(tmp), name, "version_*", "checkpoints", "last.ckpt"))
    return path
