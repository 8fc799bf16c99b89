"""Checkpoints of the older layouts (tests/fixtures/format1 and format2, written by older ayf
versions) load, sample what the old code sampled, are refused by `ayf fit/test --ckpt_path` with a
one-line error naming `ayf upgrade`, and upgrade; the record is the one place of the sampling
settings; a student's net defaults to its teacher's."""
import os

import numpy as np
import pytest
import torch

from ayf.checkpoints import (
    FORMAT,
    CheckpointFlowMap,
    CheckpointTeacher,
    load_network,
    make_record,
    read_checkpoint,
    sampling_defaults,
)
from ayf.cli import main
from ayf.errors import ConfigError
from ayf.nn import Cond, GuidedTeacher
from ayf.tasks import FlowMapDistillation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = os.path.join(ROOT, "tests", "fixtures", "format1")
TEACHER, STUDENT = os.path.join(OLD, "teacher_cond.ckpt"), os.path.join(OLD, "student_cfg.ckpt")
V2 = os.path.join(ROOT, "tests", "fixtures", "format2")
CONFIG = os.path.join(ROOT, "configs", "toy", "distill_cfg.yaml")


def v2(name):
    return os.path.join(V2, name)


def test_old_checkpoints_load_as_networks_and_teachers():
    for student in (STUDENT, v2("student_cfg.ckpt"), v2("adversarial.ckpt")):
        net, record = load_network(student)
        assert net.guidance_input and net.is_flow_map and record["format"] == FORMAT
        assert sampling_defaults(record) == {"solver": "flow_map", "gamma": 0.0, "guidance": 2.0}
    for teacher_path in (TEACHER, v2("teacher_cond.ckpt")):
        teacher = CheckpointTeacher(teacher_path)
        assert teacher.unconditional and teacher.num_classes == 2
    # the consistency student keeps the gamma = 1 sampler its objective implied
    assert sampling_defaults(load_network(v2("consistency.ckpt"))[1])["gamma"] == 1.0


@pytest.mark.parametrize("name, args", [
    ("student_cfg", ["--steps", "2", "--label", "all"]),
    ("adversarial", ["--steps", "2", "--label", "all"]),
    ("consistency", ["--steps", "2"]),
    ("teacher_cond", ["--solver", "euler", "--steps", "4", "--guidance", "2", "--label", "all"]),
])
def test_format_2_checkpoints_sample_exactly_what_the_old_code_sampled(tmp_path, name, args):
    out = tmp_path / "x.npy"
    assert main(["sample", "--ckpt_path", v2(f"{name}.ckpt"), "--num_samples", "8", "--output", str(out), *args]) == 0
    np.testing.assert_array_equal(np.load(out), np.load(v2(f"{name}.samples.npy")))


@pytest.mark.parametrize("old", [STUDENT, v2("student_cfg.ckpt")], ids=["format1", "format2"])
def test_old_checkpoint_samples_and_is_refused_by_test_with_the_conversion_command(tmp_path, capsys, old):
    out = tmp_path / "x.npy"
    assert main(["sample", "--ckpt_path", old, "--label", "all", "--num_samples", "8", "--output", str(out)]) == 0
    args = ["--config", CONFIG, "--ckpt_path", old,
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    capsys.readouterr()
    assert main(["test", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ayf: error:") and "ayf upgrade" in err and "older ayf" in err


@pytest.mark.parametrize("old, teacher", [(STUDENT, TEACHER), (v2("student_cfg.ckpt"), v2("teacher_cond.ckpt"))],
                         ids=["format1", "format2"])
def test_ayf_upgrade_writes_a_current_checkpoint_that_ayf_test_resumes(tmp_path, capsys, old, teacher):
    new = str(tmp_path / "student_v3.ckpt")
    assert main(["upgrade", old, new]) == 0
    ckpt = torch.load(new, weights_only=True)
    assert ckpt["ayf"]["format"] == FORMAT and ckpt["ayf"]["net"]["init_args"]["guidance_input"] is True
    assert ckpt["ayf"]["sampling"] == {"solver": "flow_map", "gamma": 0.0, "guidance": 2.0}
    assert any(k.startswith("objective.adaptive.") for k in ckpt["state_dict"])
    hp = ckpt["hyper_parameters"]
    assert hp["teacher"]["init_args"]["teacher"]["class_path"] == "ayf.checkpoints.CheckpointTeacher"
    assert hp["objective"]["class_path"] == "ayf.objectives.EMD"
    assert hp["objective"]["init_args"]["weighting"] == "adaptive" and hp["objective"]["init_args"]["warmup"] == 0
    assert hp["skip_nonfinite"] == 0 and "nonfinite" not in hp and "tangent_norm" not in hp
    assert main(["test", "--config", CONFIG, "--ckpt_path", new,
                 "--model.teacher.init_args.teacher.init_args.ckpt_path", teacher,
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                 "--trainer.enable_progress_bar", "false", "--data.init_args.val_samples", "32"]) == 0
    before = load_network(old, use_ema=False)[0].state_dict()
    after = load_network(new, use_ema=False)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    capsys.readouterr()
    assert main(["upgrade", old, new]) == 2  # an existing output is never replaced without --overwrite
    assert main(["upgrade", new, str(tmp_path / "again.ckpt")]) == 0  # a current file: nothing to do
    assert not (tmp_path / "again.ckpt").exists()


def test_an_upgraded_adversarial_checkpoint_names_its_student_objective_and_adversary():
    hp = read_checkpoint(v2("adversarial.ckpt"))["hyper_parameters"]
    assert hp["student"] == {"class_path": "ayf.checkpoints.CheckpointFlowMap",
                             "init_args": {"ckpt_path": "/tmp/fx2/student/version_0/checkpoints/last.ckpt",
                                           "weights": "ema"}}
    assert hp["adversary"] == {"class_path": "ayf.objectives.RpGAN",
                               "init_args": {"lambda_adv": 0.1, "r1_gamma": 1.0, "fake_steps": [1],
                                             "fake_steps_schedule": None}}
    assert hp["objective"]["init_args"]["warmup"] == 0 and "semigroup" not in hp["objective"]["init_args"]
    assert not {"distilled_ckpt", "init_weights", "net", "lambda_adv"} & set(hp)


def test_checkpoint_flow_map_rebuilds_the_distilled_student_with_its_ema():
    for weights, use_ema in (("ema", True), ("raw", False)):
        net = CheckpointFlowMap(v2("student_cfg.ckpt"), weights=weights)
        ref, _ = load_network(v2("student_cfg.ckpt"), use_ema=use_ema)
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values(), strict=True))
        assert net.net_config == ref_config() and net.initial_ema is not None
    with pytest.raises(ConfigError, match="choose ema or raw"):
        CheckpointFlowMap(v2("student_cfg.ckpt"), weights="best")
    with pytest.raises(Exception, match="FlowMapDistillation or AdversarialFinetuning"):
        CheckpointFlowMap(v2("teacher_cond.ckpt"))


def ref_config():
    return read_checkpoint(v2("student_cfg.ckpt"))["ayf"]["net"]


def test_sampling_defaults_take_the_record_and_what_the_user_gives():
    record = make_record("FlowMapDistillation", None, (2,), "flow_map", gamma=1.0, guidance=2.0)
    assert sampling_defaults(record) == {"solver": "flow_map", "gamma": 1.0, "guidance": 2.0}
    assert sampling_defaults(record, solver="euler", gamma=0.5, guidance=1.5) == {
        "solver": "euler", "gamma": 0.5, "guidance": 1.5}
    with pytest.raises(ConfigError, match="gamma"):
        sampling_defaults(record, gamma=1.5)


def test_student_net_defaults_to_the_teachers_architecture_with_s_and_lam_branches():
    guided = GuidedTeacher(CheckpointTeacher(TEACHER))
    task = FlowMapDistillation(teacher=guided)
    teacher_net = guided.teacher.net
    assert task.net.is_flow_map and task.net.guidance_input and task.net.num_classes == teacher_net.num_classes
    assert task.net.backbone.blocks[0].fc1.weight.shape == teacher_net.backbone.blocks[0].fc1.weight.shape
    assert task.net_config()["init_args"]["s_embedding"] == "t_minus_s"
    x, t = torch.randn(4, 2), torch.rand(4)
    velocity = guided.teacher.net.velocity  # copied weights: F(x, t, s) = v(x, t) for every s at init
    c = Cond.build(4, label=torch.tensor([0, 1, 0, 1]), lam=2.0)
    torch.testing.assert_close(task.net(x, t, torch.zeros(4), c), velocity(x, t, c.with_(lam=None)))


def test_atomic_write_keeps_the_old_file_whole_when_the_writer_fails(tmp_path):
    from ayf.io import atomic_write

    path = tmp_path / "last.ckpt"
    atomic_write(str(path), lambda fh: fh.write(b"old"))
    (tmp_path / ".last.ckpt.tmp999").write_bytes(b"half")  # left by a writer killed before its rename

    def fails(fh):
        fh.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(str(path), fails)
    assert path.read_bytes() == b"old"
    atomic_write(str(path), lambda fh: fh.write(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no temporary file stays behind


def test_an_upgraded_adversarial_checkpoint_is_tested_by_the_adversarial_task(tmp_path):
    new = str(tmp_path / "adversarial_v3.ckpt")
    assert main(["upgrade", v2("adversarial.ckpt"), new]) == 0
    assert main(["test", "--config", os.path.join(ROOT, "configs", "toy", "adversarial.yaml"), "--ckpt_path", new,
                 "--model.student.init_args.ckpt_path", v2("student_cfg.ckpt"), "--model.teacher", "ayf.nn.GuidedTeacher",
                 "--model.teacher.init_args.teacher", "ayf.checkpoints.CheckpointTeacher",
                 "--model.teacher.init_args.teacher.init_args.ckpt_path", v2("teacher_cond.ckpt"),
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                 "--trainer.enable_progress_bar", "false", "--data.init_args.val_samples", "32"]) == 0


def test_a_distilled_checkpoint_continues_as_the_student_of_a_new_distillation():
    """CheckpointFlowMap as the `net` of FlowMapDistillation keeps its distilled weights (the
    teacher's are not copied over them) unless init_from_teacher asks for it."""
    from ayf.objectives import EMD

    teacher = GuidedTeacher(CheckpointTeacher(v2("teacher_cond.ckpt")))
    distilled = CheckpointFlowMap(v2("student_cfg.ckpt"))
    kept = {k: v.clone() for k, v in distilled.state_dict().items()}
    task = FlowMapDistillation(distilled, teacher, EMD())
    assert all(torch.equal(v, kept[k]) for k, v in task.net.state_dict().items())
    again = FlowMapDistillation(CheckpointFlowMap(v2("student_cfg.ckpt")), teacher, EMD(), init_from_teacher=True)
    assert not all(torch.equal(v, kept[k]) for k, v in again.net.state_dict().items())
    assert task.net_config() == read_checkpoint(v2("student_cfg.ckpt"))["ayf"]["net"]
