import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from ayf.cli import main
from ayf.math.samplers import sample_flow_map
from ayf.math.times import time_grid
from ayf.nn.io import load_network

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
RUN_CONFIGS = [c for c in CONFIGS if "model" in (yaml.safe_load(open(c)) or {})]
# configs that change a few options of a sibling and are layered over it: `--config BASE --config C`
LAYERED_OVER = {"adversarial_multistep.yaml": "adversarial.yaml"}


def tiny(tmp_path, config, steps=3, extra=()):
    return [
        "fit", "--config", config,
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.net.init_args.backbone.init_args.width", "16",
        "--model.net.init_args.backbone.init_args.depth", "1",
        "--data.init_args.batch_size", "32", "--data.init_args.train_samples", "256",
        "--data.init_args.val_samples", "64", *extra,
    ]


def leaves(tree, prefix=""):
    """(dotted key, value) of each non-dict value of a parsed config (keys read as text)."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def last_ckpt(tmp_path, name):
    (path,) = glob.glob(str(tmp_path / name / "version_*" / "checkpoints" / "last.ckpt"))
    return path


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=[os.path.relpath(c, ROOT) for c in RUN_CONFIGS])
def test_every_shipped_config_parses(config, capsys):
    base = LAYERED_OVER.get(os.path.basename(config))
    layers = ["--config", os.path.join(os.path.dirname(config), base)] if base else []
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *layers, "--config", config, "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    if base:  # every option the layer sets wins over its base
        for key, value in leaves(yaml.safe_load(open(config))):
            assert dict(leaves(printed)).get(key) == value, key
    assert printed["model"]["class_path"].startswith("ayf.tasks.")
    data = printed["data"]["init_args"]
    assert data["mixture"]["means"] if "mixture" in data else data["train"].startswith("data/")


def test_parsing_an_image_config_needs_no_data_on_disk(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", os.path.join(ROOT, "configs", "fashion_mnist", "teacher.yaml"), "--print_config",
              "--data.init_args.train", "/nonexistent/shards"])
    assert exit_.value.code == 0


def test_top_level_help_names_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "sample", "shards", "features"):
        assert f"  {sub} " in out
    assert main(["bogus"]) == 2


def test_fit_teacher_then_distil_then_sample_with_noise_file(tmp_path, capsys):
    cfg = os.path.join(ROOT, "configs", "toy")
    assert main(tiny(tmp_path, f"{cfg}/teacher.yaml")) == 0
    teacher = last_ckpt(tmp_path, "teacher")
    assert os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(teacher)), "samples", "step_0000003.png"))
    extra = ["--model.teacher", "ayf.nn.CheckpointTeacher", "--model.teacher.ckpt_path", teacher]
    assert main(tiny(tmp_path, f"{cfg}/distill_emd.yaml", extra=extra)) == 0
    student = last_ckpt(tmp_path, "distill_emd")
    test_args = tiny(tmp_path, f"{cfg}/distill_emd.yaml", extra=[*extra, "--ckpt_path", student])
    assert main(["test", *test_args[1:]]) == 0
    assert "test/loss" in capsys.readouterr().out
    noise = np.random.default_rng(0).standard_normal((37, 2)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    out = tmp_path / "x.npy"
    args = ["sample", "--ckpt_path", student, "--steps", "4", "--noise", str(tmp_path / "noise.npy"), "--output", str(out)]
    assert main(args) == 0
    got = np.load(out)
    net, _ = load_network(student)
    with torch.no_grad():
        want = sample_flow_map(lambda a, t, s: net(a, t, s), torch.from_numpy(noise), time_grid(4).float())
    assert got.shape == (37, 2)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
    # an explicit grid with the same times gives the same array; refusing to overwrite
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    args2 = ["sample", "--ckpt_path", student, "--grid", "1,0.75,0.5,0.25,0", "--noise", str(tmp_path / "noise.npy"), "--output", str(tmp_path / "y.npy")]
    assert main(args2) == 0
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), got, rtol=1e-6, atol=1e-6)
    # the teacher checkpoint samples only with a teacher solver
    assert main(["sample", "--ckpt_path", teacher, "--output", str(tmp_path / "t.npy")]) == 2
    assert "--solver euler or heun" in capsys.readouterr().err
    assert main(["sample", "--ckpt_path", teacher, "--solver", "heun", "--steps", "3", "--num_samples", "5", "--output", str(tmp_path / "t.npy")]) == 0
    assert np.load(tmp_path / "t.npy").shape == (5, 2)


def printed_test_loss(out: str) -> float:
    (value,) = re.findall(r"test/loss\s+(\S+)", out)
    return float(value)


def test_ayf_test_uses_the_teacher_and_time_sampler_the_student_was_distilled_with(tmp_path, capsys):
    # the config's teacher is the analytic mixture; the student was distilled from a trained teacher
    # given on the command line only, with another time sampler
    cfg = os.path.join(ROOT, "configs", "toy")
    assert main(tiny(tmp_path, f"{cfg}/teacher.yaml")) == 0
    typed = ["--model.teacher", "ayf.nn.CheckpointTeacher", "--model.teacher.ckpt_path", last_ckpt(tmp_path, "teacher"),
             "--model.time_sampler.init_args.p_mean", "0.5"]
    assert main(tiny(tmp_path, f"{cfg}/distill_emd.yaml", extra=typed)) == 0
    student = ["--ckpt_path", last_ckpt(tmp_path, "distill_emd")]
    capsys.readouterr()
    assert main(["test", *tiny(tmp_path, f"{cfg}/distill_emd.yaml", extra=student)[1:]]) == 0
    out, err = capsys.readouterr()
    assert "model.init_args.teacher" in err and "model.init_args.time_sampler.init_args.p_mean" in err
    assert main(["test", *tiny(tmp_path, f"{cfg}/distill_emd.yaml", extra=[*typed, *student])[1:]]) == 0
    assert printed_test_loss(out) == printed_test_loss(capsys.readouterr().out)
    # a teacher typed on the command line still wins over the stored one
    assert main(["test", *tiny(tmp_path, f"{cfg}/distill_emd.yaml", extra=[*student, "--model.teacher",
                                                                          "ayf.nn.MixtureTeacher"])[1:]]) == 0
    assert printed_test_loss(capsys.readouterr().out) != printed_test_loss(out)
    # the stored teacher moved away: one line naming it
    teacher = last_ckpt(tmp_path, "teacher")
    os.rename(teacher, teacher + ".moved")
    assert main(["test", *tiny(tmp_path, f"{cfg}/distill_emd.yaml", extra=student)[1:]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ayf: error:")]
    assert len(errors) == 1 and f"teacher checkpoint not found: {teacher}" in errors[0]


def test_resume_keeps_model_options_typed_on_the_command_line(tmp_path, capsys):
    # Lightning's --ckpt_path hands the model the checkpoint's hyperparameters; options typed on the
    # command line must still win, and config-file values that the checkpoint's replace are named.
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "toy", "teacher.yaml")))
    cfg["data"] = os.path.join(ROOT, "configs", "toy", cfg["data"])
    config = tmp_path / "teacher.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(tiny(tmp_path, str(config))) == 0
    cfg["model"]["init_args"]["p_std"] = 2.0  # edited after the run
    config.write_text(yaml.safe_dump(cfg))
    resumed = ["--ckpt_path", last_ckpt(tmp_path, "teacher"), "--model.p_mean=0.7", "--trainer.logger.init_args.name", "resumed"]
    capsys.readouterr()
    assert main(tiny(tmp_path, str(config), steps=6, extra=resumed)) == 0
    assert "replace the config's model.init_args.p_std;" in capsys.readouterr().err
    ckpt = torch.load(last_ckpt(tmp_path, "resumed"), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert (ckpt["hyper_parameters"]["p_mean"], ckpt["hyper_parameters"]["p_std"]) == (0.7, 1.0)


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("student")
    assert main(tiny(tmp, os.path.join(ROOT, "configs", "toy", "distill_lmd.yaml"), steps=2)) == 0
    return last_ckpt(tmp, "distill_lmd")


@pytest.mark.parametrize("args, message", [
    (["--grid", "1,0.2,0.5,0"], "s > t"),
    (["--noise", "missing.npy"], "noise file not found"),
    (["--noise", "{bad}"], "cannot read noise file"),
    (["--noise", "{wrong_shape}"], "expected (N, 2)"),
    (["--steps", "0"], "positive integer"),
    (["--gamma", "1.5"], "gamma"),
])
def test_sample_bad_input_gives_one_line_error(student_ckpt, tmp_path, capsys, args, message):
    (tmp_path / "bad.npy").write_text("not an array")
    np.save(tmp_path / "wrong.npy", np.zeros((4, 3), dtype=np.float32))
    args = [a.format(bad=tmp_path / "bad.npy", wrong_shape=tmp_path / "wrong.npy") for a in args]
    code = main(["sample", "--ckpt_path", student_ckpt, "--output", str(tmp_path / "o.npy"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_sample_rejects_files_that_are_not_ayf_checkpoints(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"\x00junk")
    for name, message in (("other.ckpt", "not an ayf checkpoint"), ("junk.ckpt", "cannot read checkpoint"), ("none.ckpt", "not found")):
        assert main(["sample", "--ckpt_path", str(tmp_path / name), "--output", str(tmp_path / "o.npy")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    cfg = os.path.join(ROOT, "configs", "toy", "distill_emd.yaml")
    assert main(tiny(tmp_path, cfg, extra=["--model.objective", "sid"])) == 2
    assert "unknown objective 'sid'" in capsys.readouterr().err
    three_d = '{"means": [[0, 0, 0]], "stds": [1], "weights": [1]}'
    assert main(tiny(tmp_path, cfg, extra=["--model.teacher.init_args.mixture", three_d])) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ayf: error:")]
    assert "Traceback" not in err and len(errors) == 1
    assert "teacher data shape (3,) and data shape (2,) disagree" in errors[0]


def test_console_run_parses_argv_without_lightning_warning():
    """From the shell, LightningCLI reads sys.argv itself: no warning about args given twice."""
    done = subprocess.run([sys.executable, "-m", "ayf", "fit", "--config", os.path.join(ROOT, "configs", "toy", "teacher.yaml"),
                           "--trainer.max_steps", "7", "--print_config"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["trainer"]["max_steps"] == 7
    assert "args parameter" not in done.stderr, done.stderr
