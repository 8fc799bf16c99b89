"""The EDM2 path of the guide, end to end on the fixtures: converted teachers distilled through
``ayf fit`` (plain, and autoguided by a second converted network), the students and the teacher
sampled through ``ayf sample``, and realignment's before/after report."""
import contextlib
import json
import os

import numpy as np
import pytest
import yaml

from ayf.cli import main
from tests.edm2_runs import imagenet64_layout
from tests.toy_runs import CONF, shipped

TINY = ["--config", os.path.join(CONF, "imagenet64", "tiny.yaml")]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("edm2")
    with contextlib.chdir(root):
        imagenet64_layout(".")
    return root


def distil(root, name, *teacher_args):
    """``ayf fit`` of configs/imagenet64/distill_autoguidance.yaml with its teacher replaced; returns
    the student's last checkpoint."""
    with contextlib.chdir(root):
        assert main(["fit", "--config", shipped("imagenet64", "distill_autoguidance"), *TINY,
                     "--trainer.logger.init_args.name", name, *teacher_args]) == 0
        return str(root / "runs" / "imagenet64" / name / "version_0" / "checkpoints" / "last.ckpt")


def sample(root, ckpt, out, *extra):
    with contextlib.chdir(root):
        assert main(["sample", "--ckpt_path", ckpt, "--num_samples", "6", "--label", "all",
                     "--output", str(out), *extra]) == 0
    x = np.load(out)
    assert x.shape == (6, 2, 8, 8) and np.isfinite(x).all()
    return x


def test_converted_teacher_distils_plain_and_autoguided_and_samples(layout):
    plain = distil(layout, "plain", "--model.teacher", "ayf.checkpoints.CheckpointTeacher",
                   "--model.teacher.init_args.ckpt_path", "weights/edm2-img64-s.ckpt", "--model.sample_guidance", "null")
    guided = distil(layout, "guided", "--model.teacher.init_args.teacher.init_args.ckpt_path", "weights/edm2-img64-s.ckpt")
    one = sample(layout, plain, layout / "plain1.npy", "--steps", "1")
    two = sample(layout, plain, layout / "plain2.npy", "--steps", "2")
    assert np.abs(one - two).max() > 1e-4
    g1 = sample(layout, guided, layout / "guided1.npy", "--steps", "1", "--guidance", "1")
    g3 = sample(layout, guided, layout / "guided3.npy", "--steps", "1", "--guidance", "3")
    assert np.abs(g1 - g3).max() > 0  # the guidance input is read
    with contextlib.chdir(layout):  # a plain student takes no guidance scale: one line
        assert main(["sample", "--ckpt_path", plain, "--guidance", "2", "--output", "x.npy"]) == 2
    sample(layout, "weights/edm2-img64-s.ckpt", layout / "teacher.npy", "--solver", "heun", "--steps", "4")
    sample(layout, "weights/edm2-img64-s.ckpt", layout / "teacher_grid.npy", "--solver", "euler", "--grid", "1,0.6,0.3,0")


def test_realignment_reports_the_error_before_and_after(layout):
    """Embedding fit then fine-tuning on the converted fixture: realignment.json holds the velocity
    error against the original before and after, and the fit lowered it."""
    with contextlib.chdir(layout):
        assert main(["fit", "--config", shipped("imagenet64", "realign"), *TINY,
                     "--config", os.path.join(CONF, "imagenet64", "tiny_realign.yaml"),
                     "--trainer.logger.init_args.name", "realign_report", "--trainer.max_steps", "40",
                     "--trainer.val_check_interval", "40", "--model.init_args.embedding_steps", "40",
                     "--model.init_args.embedding_lr", "0.01"]) == 0
    report = json.load(open(layout / "runs" / "imagenet64" / "realign_report" / "version_0" / "realignment.json"))
    before, after = report["before"]["velocity_rel_error"], report["after"]["velocity_rel_error"]
    assert 0 < after < before
    assert report["after"]["t_range"][1] <= 0.9877 + 1e-4  # evaluated on the converted network's valid range
    assert yaml.safe_load(json.dumps(report))["history"]
