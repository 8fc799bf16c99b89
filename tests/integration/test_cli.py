import contextlib
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from ayf.checkpoints import load_network
from ayf.cli import main
from ayf.math.samplers import sample_flow_map
from ayf.math.times import time_grid
from tests.edm2_runs import imagenet64_layout, imagenet512_layout
from tests.toy_runs import CONF, SMALL_NET, shipped, stage_args, toy_args, write_image_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
# the stage configs: those that name a model (base.yaml and data.yaml are pulled in by them)
RUN_CONFIGS = [c for c in CONFIGS if any(k == "model" or k.startswith("model.") for k in yaml.safe_load(open(c)) or {})]


def tiny(tmp_path, stage, steps=3, extra=()):
    """``ayf fit`` of configs/toy/<stage>.yaml under tests/conf/toy/tiny.yaml and small_net.yaml."""
    return toy_args(tmp_path, stage, steps=steps, extra=[*SMALL_NET, *extra])


def leaves(tree, prefix=""):
    """(dotted key, value) of each non-dict value of a parsed config (keys read as text)."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def layered(path):
    """A config file as its layers give it, before defaults: the file it pulls in with ``config:``
    first, then its dotted keys (``trainer.max_steps: 3``) set single values, its other keys whole."""
    given = dict(yaml.safe_load(open(path)))
    tree = layered(os.path.join(os.path.dirname(path), given.pop("config"))) if "config" in given else {}
    for key, value in given.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def holds(printed, given, where):
    """Every value of ``given`` is in ``printed``: mappings may hold more keys (the defaults; keys
    read as text), lists the same number of items."""
    if isinstance(given, dict):
        assert isinstance(printed, dict), f"{where}: {printed!r} is not a mapping"
        printed = {str(k): v for k, v in printed.items()}
        for key, value in given.items():
            assert str(key) in printed, f"{where}.{key} missing"
            holds(printed[str(key)], value, f"{where}.{key}")
    elif isinstance(given, list):
        assert isinstance(printed, list) and len(printed) == len(given), f"{where}: {printed!r} != {given!r}"
        for n, (p, g) in enumerate(zip(printed, given, strict=True)):
            holds(p, g, f"{where}[{n}]")
    else:
        assert printed == given, f"{where}: {printed!r} != {given!r}"


def last_ckpt(tmp_path, name):
    (path,) = glob.glob(str(tmp_path / name / "version_*" / "checkpoints" / "last.ckpt"))
    return path


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=[os.path.relpath(c, ROOT) for c in RUN_CONFIGS])
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", config, "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    # the layers hold: the dataset's base.yaml (seed, trainer, logger), then the stage's own values
    dataset, stage = os.path.basename(os.path.dirname(config)), os.path.basename(config)[:-5]
    want = layered(config)
    assert printed["seed_everything"] == want["seed_everything"] == 0
    holds(printed["trainer"], want["trainer"], "trainer")
    assert printed["trainer"]["default_root_dir"] == printed["trainer"]["logger"]["init_args"]["save_dir"] == f"runs/{dataset}"
    assert printed["trainer"]["logger"]["init_args"]["name"] == stage  # runs/<dataset>/<stage>/version_N
    for key, value in yaml.safe_load(open(config)).items():
        if key.startswith("model."):  # a dotted override of the model of the config it pulls in
            node = printed
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{key} missing"
                node = node[part]
            holds(node, value, key)
    assert printed["model"]["class_path"].startswith("ayf.tasks.")
    data = printed["data"]["init_args"]
    assert data["mixture"]["means"] if "mixture" in data else data.get("train", data.get("path")).startswith("data/")


def test_the_multistep_recipe_is_adversarial_yaml_with_its_own_values(capsys):
    """configs/digits/adversarial_multistep.yaml pulls in adversarial.yaml and changes three values; the
    README's two-file form (adversarial.yaml, then adversarial_multistep.yaml) gives the same config."""
    def printed(*stages):
        with pytest.raises(SystemExit):
            main(["fit", *[a for n in stages for a in ("--config", shipped("digits", n))], "--print_config"])
        return dict(leaves(yaml.safe_load(capsys.readouterr().out)))

    adversarial, multistep = printed("adversarial"), printed("adversarial_multistep")
    assert printed("adversarial", "adversarial_multistep") == multistep
    changed = {k: (adversarial.get(k), multistep.get(k)) for k in adversarial.keys() | multistep.keys()
               if adversarial.get(k) != multistep.get(k)}
    assert changed == {"trainer.max_steps": (4000, 10000),
                       "trainer.logger.init_args.name": ("adversarial", "adversarial_multistep"),
                       "model.init_args.adversary.init_args.fake_steps_schedule.8000": (None, [1, 2, 4, 8, 8])}


def test_parsing_an_image_config_needs_no_data_on_disk(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", os.path.join(ROOT, "configs", "fashion_mnist", "teacher.yaml"), "--print_config",
              "--data.init_args.train", "/nonexistent/shards"])
    assert exit_.value.code == 0


def test_top_level_help_names_every_subcommand_that_exists(capsys):
    from ayf import commands

    modules = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "ayf", "commands"))
                     if f.endswith(".py") and not f.startswith("_") and f[:-3] not in commands.NOT_COMMANDS)
    assert commands.names() == modules and {"sample", "convert", "shards", "points", "features", "upgrade"} <= set(modules)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", *modules):
        assert re.search(rf"^  {sub} +\S", out, re.M), f"{sub} missing from ayf --help"
        if sub in modules:  # and each one's own --help explains it
            with pytest.raises(SystemExit) as exit_:
                main([sub, "--help"])
            assert exit_.value.code == 0 and f"usage: ayf {sub}" in capsys.readouterr().out
    assert main(["bogus"]) == 2


def test_fit_teacher_then_distil_then_sample_with_noise_file(tmp_path, capsys):
    assert main(tiny(tmp_path, "teacher")) == 0
    teacher = last_ckpt(tmp_path, "teacher")
    assert os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(teacher)), "samples", "step_0000003.png"))
    extra = ["--model.teacher", "ayf.checkpoints.CheckpointTeacher", "--model.teacher.ckpt_path", teacher]
    assert main(tiny(tmp_path, "distill_emd", extra=extra)) == 0
    student = last_ckpt(tmp_path, "distill_emd")
    test_args = tiny(tmp_path, "distill_emd", extra=[*extra, "--ckpt_path", student])
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
        want = sample_flow_map(net, torch.from_numpy(noise), time_grid(4).float())
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
    (value,) = re.findall(r"test/loss[\s│┃|]+([-+0-9.eE]+)", out)  # a plain table, or rich's (with rich installed)
    return float(value)


def test_ayf_test_uses_the_teacher_and_time_sampler_the_student_was_distilled_with(tmp_path, capsys):
    # the config's teacher is the analytic mixture; the student was distilled from a trained teacher
    # given on the command line only, with another time sampler
    assert main(tiny(tmp_path, "teacher")) == 0
    typed = ["--model.teacher", "ayf.checkpoints.CheckpointTeacher", "--model.teacher.ckpt_path", last_ckpt(tmp_path, "teacher"),
             "--model.objective.init_args.time_sampler.init_args.p_mean", "0.5"]
    assert main(tiny(tmp_path, "distill_emd", extra=typed)) == 0
    student = ["--ckpt_path", last_ckpt(tmp_path, "distill_emd")]
    capsys.readouterr()
    assert main(["test", *tiny(tmp_path, "distill_emd", extra=student)[1:]]) == 0
    out, err = capsys.readouterr()
    assert "model.init_args.teacher" in err and "model.init_args.objective.init_args.time_sampler.init_args.p_mean" in err
    assert main(["test", *tiny(tmp_path, "distill_emd", extra=[*typed, *student])[1:]]) == 0
    assert printed_test_loss(out) == printed_test_loss(capsys.readouterr().out)
    # a teacher typed on the command line still wins over the stored one
    assert main(["test", *tiny(tmp_path, "distill_emd", extra=[*student, "--model.teacher",
                                                                          "ayf.nn.MixtureTeacher"])[1:]]) == 0
    assert printed_test_loss(capsys.readouterr().out) != printed_test_loss(out)
    # the stored teacher moved away: one line naming it
    teacher = last_ckpt(tmp_path, "teacher")
    os.rename(teacher, teacher + ".moved")
    assert main(["test", *tiny(tmp_path, "distill_emd", extra=student)[1:]]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ayf: error:")]
    assert len(errors) == 1 and f"teacher checkpoint not found: {teacher}" in errors[0]


def test_resume_keeps_model_options_typed_on_the_command_line(tmp_path, capsys):
    # Lightning's --ckpt_path hands the model the checkpoint's hyperparameters; options typed on the
    # command line must still win, and config-file values that the checkpoint's replace are named.
    assert main(tiny(tmp_path, "teacher")) == 0
    edited = ["--config", os.path.join(CONF, "toy", "teacher_p_std.yaml")]  # the config, edited after the run
    resumed = [*edited, "--ckpt_path", last_ckpt(tmp_path, "teacher"), "--model.p_mean=0.7", "--trainer.logger.init_args.name", "resumed"]
    capsys.readouterr()
    assert main(tiny(tmp_path, "teacher", steps=6, extra=resumed)) == 0
    assert "replace the config's model.init_args.p_std;" in capsys.readouterr().err
    ckpt = torch.load(last_ckpt(tmp_path, "resumed"), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert (ckpt["hyper_parameters"]["p_mean"], ckpt["hyper_parameters"]["p_std"]) == (0.7, 1.0)


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("student")
    assert main(tiny(tmp, "distill_lmd", steps=2)) == 0
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
    assert main(tiny(tmp_path, "distill_emd", extra=["--model.objective.init_args.weighting", "gap"])) == 2
    assert "unknown weighting 'gap'" in capsys.readouterr().err
    three_d = '{"means": [[0, 0, 0]], "stds": [1], "weights": [1]}'
    assert main(tiny(tmp_path, "distill_emd", extra=["--model.teacher.init_args.mixture", three_d])) == 2
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


# Every shipped stage config gets a tiny fit: these stages in other tests, the rest below.
FIT_ELSEWHERE = {
    "toy/teacher": "test_cli.py::test_fit_teacher_then_distil_then_sample_with_noise_file",
    "toy/distill_emd": "test_cli.py::test_fit_teacher_then_distil_then_sample_with_noise_file",
    "toy/distill_lmd": "test_cli.py::student_ckpt",
    "toy/teacher_cond": "test_guidance_cli.py::teachers",
    "toy/teacher_weak": "test_guidance_cli.py::teachers",
    "toy/distill_cfg": "test_guidance_cli.py::test_guided_student_fits_tests_and_samples_at_any_lam",
    "toy/distill_autoguidance": "test_guidance_cli.py::test_guided_student_fits_tests_and_samples_at_any_lam",
    "toy/adversarial": "test_guidance_cli.py::test_adversarial_stage_through_the_cli",
    "digits/teacher": "test_images.py::test_image_fit_then_ayf_test_writes_fidelity_json",
    "digits/distill_emd": "test_images.py::test_image_fit_then_ayf_test_writes_fidelity_json",
    "diffusers/distill_emd": "test_diffusers_cli.py::test_tiny_diffusers_teacher_distils_and_samples",
    "flux/distill_lora": "test_text_to_image.py::test_the_flux_recipe_distils_a_tiny_pipeline",
}
STAGES = [os.path.relpath(c, os.path.join(ROOT, "configs"))[:-5] for c in RUN_CONFIGS]
FIT_HERE = [stage for stage in STAGES if stage not in FIT_ELSEWHERE]
# image stages read the checkpoints of these stages, at the shipped runs/<dataset>/<stage>/version_0/...
READS = {"distill_emd": ["teacher"], "distill_cfg": ["teacher"], "distill_autoguidance": ["teacher"],
         "adversarial": ["teacher", "distill_emd"], "adversarial_multistep": ["teacher", "distill_emd"],
         "adversarial_autoguidance": ["teacher", "distill_autoguidance"], "realign": ["teacher_edm2"]}
# the imagenet64 and imagenet512 recipes read converted EDM2 networks (tests/edm2_runs.py) and these stages
READS_IMAGENET64 = {"distill_autoguidance": ["realign"], "adversarial": ["realign", "distill_autoguidance"]}
@pytest.fixture(scope="module")
def fit_stage(tmp_path_factory):
    """Fits a shipped stage once in a scratch directory laid out like the repository's (data/<dataset>/,
    runs/<dataset>/), after the stages whose checkpoints it reads; returns its run directory."""
    root = tmp_path_factory.mktemp("repo")
    done = {}

    def fit(dataset, stage):
        if (dataset, stage) not in done:
            reads = {"toy": {}, "imagenet64": READS_IMAGENET64, "imagenet512": READS_IMAGENET64}.get(dataset, READS)
            for earlier in reads.get(stage, []):
                fit(dataset, earlier)
            with contextlib.chdir(root):
                if dataset == "imagenet64" and not os.path.isdir("data/imagenet64"):
                    imagenet64_layout(".")
                elif dataset == "imagenet512" and not os.path.isdir("data/imagenet512"):
                    imagenet512_layout(".")
                elif dataset == "points" and not os.path.isdir("data/points"):
                    assert main(["points", "moons", "--output", "data/points/moons.npz", "--n", "400"]) == 0
                elif dataset not in ("toy", "points") and not os.path.isdir(f"data/{dataset}"):
                    write_image_data(dataset)
                assert main(stage_args(dataset, stage)) == 0
            done[dataset, stage] = root / "runs" / dataset / stage / "version_0"
        return done[dataset, stage]

    return fit


@pytest.mark.parametrize("stage", FIT_HERE)
def test_tiny_fit_of_a_shipped_stage(fit_stage, stage):
    dataset, name = stage.split("/")
    run = fit_stage(dataset, name)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    steps = 4 if name.startswith("adversarial") else 3
    assert ckpt["global_step"] == steps
    # validation ran after the last step, with the stage's sample plot (toy) or image grid
    assert os.path.isfile(run / ("samples" if dataset in ("toy", "points") else "grids") / f"step_{steps:07d}.png")


@pytest.mark.parametrize("dataset", ["imagenet64", "imagenet512"])
def test_imagenet_fid_overlay_parses_over_the_recipe(capsys, dataset):
    """configs/<dataset>/fid.yaml (the `ayf test` overlay) layers over the distillation recipe."""
    with pytest.raises(SystemExit) as exit_:
        main(["test", "--config", shipped(dataset, "distill_autoguidance"),
              "--config", shipped(dataset, "fid"), "--print_config"])
    assert exit_.value.code == 0
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    metrics = [c for c in callbacks if c["class_path"] == "ayf.callbacks.FidelityMetrics"]
    assert len(metrics) == 1 and metrics[0]["init_args"]["steps"] == [1, 2, 4, 8]
    assert metrics[0]["init_args"]["extractor"]["class_path"] == "ayf.metrics.InceptionFeatures"
    # latent data: FID against the pixel images the latents came from
    assert metrics[0]["init_args"].get("reference") == ("data/imagenet512_pixels" if dataset == "imagenet512" else None)


def test_every_config_that_keeps_checkpoints_keeps_the_best_one():
    """Beside last.ckpt and the periodic ones, each stage keeps best.ckpt by a metric it logs."""
    for config in RUN_CONFIGS:
        callbacks = layered(config).get("trainer", {}).get("callbacks") or []
        kept = [c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
        if kept:
            best = [a for a in kept if a.get("monitor")]
            want = "val/velocity_rel_error" if "realign" in config else "val/loss"
            assert [(a["monitor"], a["mode"], a["save_top_k"], a["filename"]) for a in best] == [(want, "min", 1, "best")], config


def test_best_ckpt_holds_the_step_of_the_lowest_validation_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(tiny(tmp_path, "teacher", steps=8, extra=["--trainer.val_check_interval", "2",
                                                         "--model.optimizer.init_args.lr", "0.03"])) == 0
    (folder,) = glob.glob(str(tmp_path / "teacher" / "version_*"))
    events = EventAccumulator(folder)
    events.Reload()
    val = {e.step: e.value for e in events.Scalars("val/loss")}
    assert len(val) == 4 and len(set(val.values())) == 4, val
    best = torch.load(os.path.join(folder, "checkpoints", "best.ckpt"), map_location="cpu", weights_only=False)
    # Lightning records the global step after the step; the logger the step of the validation
    assert best["global_step"] == min(val, key=val.get) + 1, (best["global_step"], val)
    assert os.path.exists(os.path.join(folder, "checkpoints", "last.ckpt"))


def test_ayf_toy_scores_sample_files_against_the_exact_mixture(tmp_path, capsys):
    from ayf.metrics.toy import exact_endpoints, load_mixture

    oracle = load_mixture(os.path.join(ROOT, "configs", "toy", "data.yaml"))
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "noise.npy", noise.numpy())
    np.save(tmp_path / "exact.npy", exact_endpoints(oracle, noise.double()).float().numpy())
    np.save(tmp_path / "noise_as_samples.npy", noise.numpy())
    assert main(["toy", "--noise", str(tmp_path / "noise.npy"), "--out", str(tmp_path / "out"), "--samples",
                 f"exact={tmp_path / 'exact.npy'}", f"noise={tmp_path / 'noise_as_samples.npy'}"]) == 0
    rows = {r["samples"]: r for r in json.load(open(tmp_path / "out" / "metrics.json"))}
    assert rows["exact"]["median_dist"] < 1e-5 < rows["noise"]["median_dist"]
    assert rows["exact"]["mean_logp"] > rows["noise"]["mean_logp"]
    assert (tmp_path / "out" / "samples.png").exists() and "| exact |" in capsys.readouterr().out
