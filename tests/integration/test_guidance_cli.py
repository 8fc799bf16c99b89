"""Guidance distillation and adversarial finetuning through the real CLI on tiny toy runs."""
import glob
import json

import numpy as np
import pytest
import torch

from ayf.checkpoints import load_network, sampling_defaults
from ayf.cli import main
from ayf.nn import Cond
from tests.toy_runs import SMALL_NET, fit_toy


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teachers")
    strong = fit_toy(tmp, "teacher_cond", "teacher_cond", 3, SMALL_NET)
    weak = fit_toy(tmp, "teacher_weak", "teacher_weak", 2, SMALL_NET)
    return tmp, strong, weak


@pytest.mark.parametrize("kind", ["autoguidance", "cfg"])
def test_guided_student_fits_tests_and_samples_at_any_lam(teachers, kind, tmp_path, capsys):
    _, strong, weak = teachers
    extra = ["--model.teacher.init_args.teacher.init_args.ckpt_path", strong]  # the student is built on it
    if kind == "autoguidance":
        extra += ["--model.teacher.init_args.weak.init_args.ckpt_path", weak]
    student = fit_toy(tmp_path, f"distill_{kind}", kind, 3, extra)
    net, meta = load_network(student)
    assert net.guidance_input and sampling_defaults(meta)["guidance"] == 2.0  # the middle of [1, 3]
    assert net.backbone.blocks[0].fc1.weight.shape[0] == 16  # the small teacher's width
    # ayf test with --guidance: validation loss at the chosen scale
    assert main(["test", "--config", f"configs/toy/distill_{kind}.yaml", "--ckpt_path", student,
                 "--guidance", "2.5", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                 "--data.init_args.val_samples", "64", *extra]) == 0
    noise = np.random.default_rng(0).standard_normal((64, 2)).astype("float32")
    np.save(tmp_path / "noise.npy", noise)
    outs = {}
    for lam in ("1", "3"):
        out = tmp_path / f"lam{lam}.npy"
        assert main(["sample", "--ckpt_path", student, "--steps", "2", "--noise", str(tmp_path / "noise.npy"),
                     "--label", "all", "--guidance", lam, "--output", str(out)]) == 0
        outs[lam] = np.load(out)
    # the same noise and labels, by hand, at lam = 3
    x, label = torch.from_numpy(noise), torch.arange(64) % 2
    for t, s in ((1.0, 0.5), (0.5, 0.0)):
        tt, ss = torch.full((64,), t), torch.full((64,), s)
        x = x + (s - t) * net(x, tt, ss, Cond(label=label, lam=torch.full((64,), 3.0))).detach()
    np.testing.assert_allclose(outs["3"], x.numpy(), rtol=1e-5, atol=1e-6)
    capsys.readouterr()


def test_guidance_given_to_an_unguided_model_is_a_one_line_error(teachers, capsys):
    tmp, strong, _ = teachers
    assert main(["sample", "--ckpt_path", strong, "--solver", "euler", "--steps", "2", "--num_samples", "4",
                 "--label", "0", "--guidance", "2", "--output", str(tmp / "cfg_teacher.npy")]) == 0  # label dropout: CFG
    student = fit_toy(tmp, "distill_emd", "plain", 2, SMALL_NET)
    assert main(["sample", "--ckpt_path", student, "--guidance", "2", "--output", str(tmp / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "ayf: error:" in err and "not distilled with guidance" in err and "Traceback" not in err
    assert main(["test", "--config", "configs/toy/distill_emd.yaml", "--ckpt_path", student, "--guidance", "2",
                 "--trainer.default_root_dir", str(tmp), *SMALL_NET]) == 2
    err = capsys.readouterr().err
    assert "ayf: error:" in err and "not distilled with guidance" in err and "Traceback" not in err


def test_adversarial_stage_through_the_cli(tmp_path, capsys):
    distilled = fit_toy(tmp_path, "distill_emd", "distill_emd", 3, SMALL_NET)
    # 4 optimiser steps = 2 iterations; validation (with its sample plot) after each iteration
    adv = fit_toy(tmp_path, "adversarial", "adversarial", 4, ["--model.student.init_args.ckpt_path", distilled,
                                                               "--model.discriminator.init_args.width", "16",
                                                               "--trainer.val_check_interval", "1"])
    assert len(glob.glob(str(tmp_path / "adversarial" / "version_0" / "samples" / "step_*.png"))) == 2
    net, meta = load_network(adv)
    assert meta["kind"] == "AdversarialFinetuning" and net.is_flow_map
    assert main(["sample", "--ckpt_path", adv, "--steps", "1", "--num_samples", "8", "--output", str(tmp_path / "a.npy")]) == 0
    assert np.load(tmp_path / "a.npy").shape == (8, 2)
    # a teacher checkpoint is not a distilled flow map
    teacher = fit_toy(tmp_path, "teacher", "teacher", 2, SMALL_NET)
    assert main(["fit", "--config", "configs/toy/adversarial.yaml", "--model.student.init_args.ckpt_path", teacher,
                 "--trainer.default_root_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ayf: error:" in err and "FlowMatching checkpoint" in err and "Traceback" not in err
    json.dumps(meta)  # the checkpoint's metadata is plain data
