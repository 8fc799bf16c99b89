"""No code from files: a pickle whose unpickling would write a marker file is handed to every entry
point that reads a file, and never runs; each answers in one line, naming what the file is and the
command that handles it where one does."""
import os
import pickle

import numpy as np
import pytest
import torch

from ayf.cli import main
from ayf.errors import AyfError
from tests.toy_runs import ROOT

TOY = os.path.join(ROOT, "configs", "toy")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


class Planted:
    """Unpickling it calls ``open(marker, "w")``: a file appears if any code in a file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def planted(tmp_path):
    """``{name: path}`` of files that would run code, and the marker that would show it."""
    marker = str(tmp_path / "code_ran")
    files = {"torch": tmp_path / "planted.ckpt", "pickle": tmp_path / "planted.pkl", "npy": tmp_path / "planted.npy"}
    torch.save({"ayf": {"kind": "FlowMatching"}, "state_dict": {}, "payload": Planted(marker)}, files["torch"])
    with open(files["pickle"], "wb") as fh:
        pickle.dump({"ema": Planted(marker)}, fh)  # what an EDM2 network .pkl is: a bare pickle
    np.save(files["npy"], np.array([Planted(marker)], dtype=object), allow_pickle=True)
    yield {k: str(v) for k, v in files.items()}, marker
    assert not os.path.exists(marker), "code in a file ran"


def one_line_error(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ayf: error:")]
    assert code == 2 and len(errors) == 1, errors
    return errors[0]


def fit_args(tmp_path, *extra, sub="fit"):
    return [sub, "--config", os.path.join(TOY, "distill_emd.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_steps", "1", *extra]


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_no_entry_point_runs_code_from_a_file(planted, tmp_path, capsys, kind):
    files, _ = planted
    path = files[kind]
    said = {
        "sample": one_line_error(capsys, ["sample", "--ckpt_path", path, "--output", str(tmp_path / "x.npy")]),
        "fit --ckpt_path": one_line_error(capsys, fit_args(tmp_path, "--ckpt_path", path)),
        "test --ckpt_path": one_line_error(capsys, fit_args(tmp_path, "--ckpt_path", path, sub="test")),
        "teacher": one_line_error(capsys, fit_args(tmp_path, "--model.teacher", "ayf.checkpoints.CheckpointTeacher",
                                                   "--model.teacher.ckpt_path", path)),
        "student": one_line_error(capsys, ["fit", "--config", os.path.join(TOY, "adversarial.yaml"),
                                           "--model.student.init_args.ckpt_path", path,
                                           "--trainer.default_root_dir", str(tmp_path)]),
        "convert": one_line_error(capsys, ["convert", "edm2", path, "--output", str(tmp_path / "t.ckpt")]),
        "upgrade": one_line_error(capsys, ["upgrade", path, str(tmp_path / "new.ckpt")]),
    }
    for where, line in said.items():
        assert path in line, (where, line)
        if where != "convert":  # convert says how to export a network instead
            assert ("Python objects" if kind == "torch" else "Python pickle") in line, (where, line)
    if kind == "pickle":
        assert "ayf convert edm2" in said["sample"]


def test_the_python_entry_points_refuse_it_too(planted):
    from ayf.checkpoints import CheckpointFlowMap, CheckpointTeacher
    from ayf.metrics import ClassifierFeatures, InceptionFeatures
    from ayf.tasks import Realignment

    files, _ = planted
    for path in files["torch"], files["pickle"]:
        for build in (CheckpointTeacher, CheckpointFlowMap, ClassifierFeatures, InceptionFeatures, Realignment):
            with pytest.raises(AyfError, match="never"):
                build(path)


def test_a_pickled_noise_file_is_refused(planted, tmp_path, capsys):
    files, _ = planted
    student = os.path.join(FIXTURES, "format2", "consistency.ckpt")
    line = one_line_error(capsys, ["sample", "--ckpt_path", student, "--noise", files["npy"],
                                   "--output", str(tmp_path / "x.npy")])
    assert "noise file" in line


def test_files_of_another_kind_are_named_with_the_command_that_handles_them(tmp_path, capsys):
    export = os.path.join(FIXTURES, "edm2", "tiny_cond.pt")
    line = one_line_error(capsys, ["sample", "--ckpt_path", export, "--solver", "euler",
                                   "--output", str(tmp_path / "x.npy")])
    assert "EDM2 export" in line and f"ayf convert edm2 {export}" in line
    converted = os.path.join(FIXTURES, "format2", "teacher_cond.ckpt")
    line = one_line_error(capsys, ["convert", "edm2", converted, "--output", str(tmp_path / "t.ckpt")])
    assert "already an ayf FlowMatching checkpoint" in line
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6"}, tmp_path / "other.ckpt")
    line = one_line_error(capsys, ["sample", "--ckpt_path", str(tmp_path / "other.ckpt"),
                                   "--output", str(tmp_path / "x.npy")])
    assert "Lightning checkpoint without ayf's record" in line


# --- every fit says what it read; stable pointers; absolute paths; no empty run folders -------------
def tiny_toy(root, config, *extra):
    return ["fit", "--config", os.path.join(TOY, f"{config}.yaml"), "--config", os.path.join(ROOT, "tests", "conf", "toy",
            "tiny.yaml"), "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
            *extra]


def test_a_fit_names_what_it_read_records_it_absolute_and_points_latest_at_itself(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    os.makedirs("teachers")
    shutil.copy(os.path.join(FIXTURES, "format2", "teacher_cond.ckpt"), "teachers/t.ckpt")
    absolute = os.path.realpath("teachers/t.ckpt")
    teacher = ["--model.teacher.init_args.teacher.init_args.ckpt_path", "teachers/t.ckpt"]  # typed relative
    capsys.readouterr()
    assert main(tiny_toy("runs", "distill_cfg", *teacher)) == 0
    err = capsys.readouterr().err
    assert f"ayf: teacher: {absolute} (FlowMatching, step 2, EMA weights)" in err
    assert "ayf: weak: the teacher's own unconditional velocity" in err
    ckpt = torch.load("runs/distill_cfg/latest/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["teacher"]["init_args"]["teacher"]["init_args"]["ckpt_path"] == absolute
    assert os.readlink("runs/distill_cfg/latest") == "version_0"
    assert main(tiny_toy("runs", "distill_cfg", *teacher)) == 0  # the stage again: latest follows it
    assert os.readlink("runs/distill_cfg/latest") == "version_1"
    # a fit that fails in its set-up leaves no version folder (and latest stays on the last good one)
    capsys.readouterr()
    bad_data = ["--data.init_args.mixture.means", "[[0, 0, 0]]", "--data.init_args.mixture.stds", "[1]",
                "--data.init_args.mixture.weights", "[1]", "--data.init_args.classes", "null"]
    assert main(tiny_toy("runs", "distill_cfg", *teacher, *bad_data)) == 2
    assert sorted(os.listdir("runs/distill_cfg")) == ["latest", "version_0", "version_1"]
    os.makedirs("mine")  # and under a folder of the user's, none of the folders it made
    assert main(tiny_toy("mine/runs", "distill_cfg", *teacher, *bad_data)) == 2
    assert os.listdir("mine") == []
    # a run without a logger's version folder sets no latest (it would land outside the run tree)
    assert main(tiny_toy("mine", "distill_cfg", *teacher, "--trainer.logger", "false")) == 0
    assert "latest" not in os.listdir("mine") and not os.path.lexists("latest")
    # nor one that wrote no checkpoint (the next stage would find nothing there)
    assert main(tiny_toy("bare", "distill_cfg", *teacher, "--trainer.callbacks", "[]",
                         "--trainer.enable_checkpointing", "false")) == 0
    assert os.listdir("bare/distill_cfg") == ["version_0"]
    # the student of a later stage reads it through latest, and says which run that was
    assert main(tiny_toy("runs", "adversarial", "--model.student.init_args.ckpt_path",
                         "runs/distill_cfg/latest/checkpoints/last.ckpt", "--model.teacher", "ayf.nn.GuidedTeacher",
                         "--model.teacher.init_args.teacher", "ayf.checkpoints.CheckpointTeacher", *teacher,
                         "--model.discriminator.init_args.width", "16", "--trainer.max_steps", "2")) == 0
    assert os.path.realpath("runs/distill_cfg/version_1/checkpoints/last.ckpt") in capsys.readouterr().err


def test_only_a_run_that_failed_before_its_first_step_is_removed(tmp_path):
    from types import SimpleNamespace

    from ayf.commands.lightning import first_missing, remove_empty_run

    created = first_missing(str(tmp_path / "runs" / "stage"))
    run = tmp_path / "runs" / "stage" / "version_0"
    for step in (3, 0):
        run.mkdir(parents=True, exist_ok=True)
        (run / "hparams.yaml").write_text("{}")
        (run / "events.out.tfevents.1").write_text("")
        trainer = SimpleNamespace(is_global_zero=True, logger=object(), global_step=step, _ayf_run_dir=str(run))
        remove_empty_run(trainer, created)
        assert run.exists() == (step > 0)  # the logs of a run that trained are kept
    assert os.listdir(tmp_path) == []  # and the folders it made went with it


def test_a_missing_file_names_the_config_key_that_points_at_it(tmp_path, capsys):
    line = one_line_error(capsys, tiny_toy(tmp_path, "distill_autoguidance"))
    assert "teacher checkpoint not found: runs/toy/teacher_cond/latest/checkpoints/last.ckpt" in line
    assert line.endswith("--model.teacher.init_args.teacher.init_args.ckpt_path")


# --- no silent overwrite ---------------------------------------------------------------------------
def test_no_command_overwrites_silently_or_writes_over_its_input(tmp_path, capsys):
    import hashlib
    import shutil

    def digest(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()

    student = str(tmp_path / "student.ckpt")
    shutil.copy(os.path.join(FIXTURES, "format2", "consistency.ckpt"), student)
    before = digest(student)
    # a name that a library would extend (np.save appends .npy) is refused before anything is written
    line = one_line_error(capsys, ["sample", "--ckpt_path", student, "--output", str(tmp_path / "x.jpg")])
    assert "must end in .npy or .png" in line and os.listdir(tmp_path) == ["student.ckpt"]
    line = one_line_error(capsys, ["sample", "--ckpt_path", student, "--output", str(tmp_path / "x.NPY")])
    assert "must end in .npy or .png" in line and os.listdir(tmp_path) == ["student.ckpt"]  # np.save: x.NPY.npy
    noise = str(tmp_path / "n.npy")
    np.save(noise, np.zeros((4, 2), dtype=np.float32))
    for argv in (["sample", "--ckpt_path", student, "--output", student, "--overwrite"],
                 ["sample", "--ckpt_path", student, "--noise", noise, "--output", noise, "--overwrite"],
                 ["upgrade", student, student, "--overwrite"],
                 ["convert", "edm2", student, "--output", student, "--overwrite"]):
        assert "is the input" in one_line_error(capsys, argv)
    assert digest(student) == before and np.load(noise).sum() == 0
    out = str(tmp_path / "x.npy")
    assert main(["sample", "--ckpt_path", student, "--num_samples", "4", "--output", out]) == 0
    assert "exists; pass --overwrite" in one_line_error(capsys, ["sample", "--ckpt_path", student, "--output", out])
    toy = ["toy", "--noise", noise, "--samples", f"x={out}", "--out", str(tmp_path / "scores")]
    assert main(toy) == 0
    assert "exists; pass --overwrite" in one_line_error(capsys, toy)
    assert main([*toy, "--overwrite"]) == 0


# --- one-line config errors ------------------------------------------------------------------------
@pytest.mark.parametrize("typed, said", [
    (["--model.objective.init_args.tangent_nrom", "0.3"], "ayf.objectives.EMD has no option 'tangent_nrom' (did you mean tangent_norm?)"),
    (["--model.objective", "ayf.objectives.EMX"], "ayf.objectives has no class 'EMX' (did you mean EMD?)"),
    (["--trainer.max_stpes", "5"], "unknown option 'trainer.max_stpes' (did you mean trainer.max_steps?)"),
    (["--model.objective.init_args.warmup", "abc"], "warmup of ayf.objectives.EMD: Expected a <class 'int'>"),
    (["--config", "{bad_file}"], "ayf.objectives.EMD has no option 'warmpu' (did you mean warmup?)"),
])
def test_a_config_that_does_not_parse_is_one_line_that_names_the_nearest_key(tmp_path, capsys, typed, said):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"config: {os.path.join(TOY, 'distill_emd.yaml')}\nmodel.init_args.objective.init_args.warmpu: 5\n")
    argv = ["fit", "--config", os.path.join(TOY, "distill_emd.yaml"), *[a.format(bad_file=bad) for a in typed]]
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ayf: error: ") and said in err[0], err
    assert main(["--verbose", *argv]) == 2  # the full report, on demand
    full = capsys.readouterr().err
    assert "--verbose" not in full and full.strip() != err[0]


def test_a_teacher_class_of_the_users_own_distils_into_an_ayf_student(tmp_path, capsys):
    """A config names a teacher module of the user's (a score model that differentiates itself, valid
    up to sigma_max = 5) and a student network that is not the teacher's (docs/own_models.md)."""
    one_mode = '{"means": [[0.0, 0.0]], "stds": [0.5], "weights": [1.0]}'
    capsys.readouterr()
    assert main(tiny_toy(tmp_path, "distill_emd", "--model.teacher", "tests.custom_teacher.GaussianScoreTeacher",
                         "--model.teacher.init_args.sigma_max", "5", "--data.init_args.mixture", one_mode,
                         "--data.init_args.classes", "null", "--config",
                         os.path.join(ROOT, "tests", "conf", "toy", "small_net.yaml"))) == 0
    err = capsys.readouterr().err
    assert "ayf: teacher: an EDM denoiser D(x; sigma), sigma in [0.002, 5]" in err
    assert "outside it data_mean (m = 0); unconditional; model: GaussianScore (autograd on: needs_grad)" in err
    ckpt = torch.load(glob_one(tmp_path / "distill_emd" / "latest" / "checkpoints" / "last.ckpt"), weights_only=True)
    assert ckpt["hyper_parameters"]["init_from_teacher"] is None and ckpt["ayf"]["net"]["init_args"]["backbone"][
        "init_args"]["width"] == 16


def glob_one(path):
    assert os.path.exists(path), path
    return str(path)
