"""Checkpoints of the first layout (tests/fixtures/format1, written by an older ayf) load, or are
refused with a one-line error naming `ayf upgrade`; and a student's net defaults to its teacher's."""
import os

import pytest
import torch

from ayf.checkpoints import FORMAT, CheckpointTeacher, load_network
from ayf.cli import main
from ayf.nn import Cond, GuidedTeacher
from ayf.tasks import FlowMapDistillation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = os.path.join(ROOT, "tests", "fixtures", "format1")
TEACHER, STUDENT = os.path.join(OLD, "teacher_cond.ckpt"), os.path.join(OLD, "student_cfg.ckpt")


def test_old_checkpoints_load_as_networks_and_teachers():
    net, meta = load_network(STUDENT)
    assert net.guidance_input and net.is_flow_map and meta["format"] == FORMAT
    teacher = CheckpointTeacher(TEACHER)
    assert teacher.unconditional and teacher.num_classes == 2


def test_old_checkpoint_samples_and_is_refused_by_fit_with_the_conversion_command(tmp_path, capsys):
    out = tmp_path / "x.npy"
    assert main(["sample", "--ckpt_path", STUDENT, "--label", "all", "--num_samples", "8", "--output", str(out)]) == 0
    args = ["--config", os.path.join(ROOT, "configs", "toy", "distill_cfg.yaml"), "--ckpt_path", STUDENT,
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    capsys.readouterr()
    assert main(["test", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ayf: error:") and "ayf upgrade" in err and "older ayf" in err


def test_ayf_upgrade_writes_a_current_checkpoint_that_ayf_test_resumes(tmp_path, capsys):
    new = str(tmp_path / "student_v2.ckpt")
    assert main(["upgrade", STUDENT, new]) == 0
    ckpt = torch.load(new, weights_only=True)
    assert ckpt["ayf"]["format"] == FORMAT and ckpt["ayf"]["net"]["init_args"]["guidance_input"] is True
    assert any(k.startswith("objective.adaptive.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["teacher"]["init_args"]["teacher"]["class_path"] == "ayf.checkpoints.CheckpointTeacher"
    assert main(["test", "--config", os.path.join(ROOT, "configs", "toy", "distill_cfg.yaml"), "--ckpt_path", new,
                 "--model.teacher.init_args.teacher.init_args.ckpt_path", TEACHER,
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                 "--trainer.enable_progress_bar", "false", "--data.init_args.val_samples", "32"]) == 0
    before = load_network(STUDENT, use_ema=False)[0].state_dict()
    after = load_network(new, use_ema=False)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    capsys.readouterr()
    assert main(["upgrade", STUDENT, new]) == 2  # an existing output is never replaced without --overwrite


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
    from ayf.checkpoints import atomic_write

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
