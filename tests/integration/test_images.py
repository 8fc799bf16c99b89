"""Image pipeline through the real CLI: shards -> features -> teacher -> EMD student -> ayf test.

Each test runs in a scratch directory laid out like the repository's (shards in data/digits/{train,val},
the extractor in data/digits/features.pt, runs under runs/digits), so that the shipped digits configs
run as they are, shrunk by the small configs of tests/conf/digits layered over them."""
import glob
import json
import os

import numpy as np
import pytest
import torch
import yaml

from ayf.cli import main
from tests.export_checks import assert_diffusers_samples, ayf_samples
from tests.toy_runs import CONF, blobs, shipped


def digits(stage, *overlays, steps=None):
    """``--config`` options of configs/digits/<stage>.yaml under tests/conf/digits/tiny.yaml (and
    tiny_net.yaml for the teacher; the students are built on it) and the named ``overlays``;
    ``steps`` replaces tiny.yaml's 3 steps."""
    layers = ["tiny", *(["tiny_net"] if stage == "teacher" else []), *overlays]
    args = ["--config", shipped("digits", stage), *[a for n in layers for a in ("--config", os.path.join(CONF, "digits", f"{n}.yaml"))]]
    if steps is not None:
        args += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    return args


def write_shards(npz, images, labels, output="data/digits", **options):
    np.savez(npz, images=images, labels=labels)
    flags = [a for k, v in options.items() for a in (f"--{k}", str(v))]
    assert main(["shards", "arrays", "--images", npz, "--output", output, *flags]) == 0


def fit_features(train="data/digits/train", val=None, epochs=1):
    """The classifier feature extractor at data/digits/features.pt, where the shipped configs read it."""
    assert main(["features", "fit", "--train", train, *(["--val", val] if val else []), "--output",
                 "data/digits/features.pt", "--epochs", str(epochs), "--width", "4", "--feature_dim", "8"]) == 0


def only(pattern):
    (path,) = glob.glob(pattern)
    return path


def test_image_fit_then_ayf_test_writes_fidelity_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shards("blobs.npz", *blobs(), val_fraction=0.25)
    fit_features(val="data/digits/val", epochs=2)

    teacher_cfg = digits("teacher", "teacher_fidelity")
    assert main(["fit", *teacher_cfg]) == 0
    # where configs/digits/distill_emd.yaml reads its teacher
    teacher_ckpt = only("runs/digits/teacher/version_0/checkpoints/last.ckpt")
    assert glob.glob("runs/digits/teacher/version_0/grids/step_*.png")
    assert main(["test", *teacher_cfg, "--ckpt_path", teacher_ckpt]) == 0
    record = json.loads(open(only("runs/digits/teacher/version_1/fidelity.json")).read())
    assert set(record["results"]) == {"euler_2", "euler_4", "heun_2", "heun_4"}
    assert record["step"] == 3  # the checkpoint's trained step, not the test trainer's 0
    assert record["teacher"] == []

    student_cfg = digits("distill_emd", "distill_emd_fidelity")
    assert main(["fit", *student_cfg]) == 0
    student_ckpt = only("runs/digits/distill_emd/version_0/checkpoints/last.ckpt")
    periodic = [json.loads(line) for line in open("runs/digits/distill_emd/version_0/fidelity.jsonl")]
    assert [r["step"] for r in periodic] == [3] and set(periodic[0]["results"]) == {f"flow_map_{k}" for k in (1, 2, 4, 8)}
    grid = only("runs/digits/distill_emd/version_0/grids/step_0000003.png")
    assert os.path.getsize(grid) > 1000
    assert main(["test", *student_cfg, "--ckpt_path", student_ckpt]) == 0
    # a PNG grid from the student: 8 samples, one class per column (4 classes -> 2 rows of 4), unzoomed
    assert main(["sample", "--ckpt_path", student_ckpt, "--steps", "2", "--num_samples", "8", "--label", "all",
                 "--scale", "1", "--output", "grid.png"]) == 0
    from PIL import Image

    assert Image.open("grid.png").size == (4 * 9 + 1, 2 * 9 + 1)
    # exported to diffusers, it samples there as `ayf sample` samples it
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = ayf_samples(student_ckpt, noise, 4, tmp_path)
    assert main(["export", "--ckpt_path", student_ckpt, "--output", "exported"]) == 0
    assert_diffusers_samples("exported", noise, ours, torch.arange(8) % 4)
    teacher_record = record
    record = json.loads(open(only("runs/digits/distill_emd/version_1/fidelity.json")).read())
    assert record["num_samples"] == 40 and record["reference_count"] == 72
    assert record["checkpoint"] == student_ckpt and record["teacher"] == [os.path.realpath(teacher_ckpt)]
    assert set(record["results"]) == {"flow_map_1", "flow_map_2", "flow_map_4", "flow_map_8", "teacher_euler_2",
                                      "teacher_euler_4", "teacher_heun_2", "teacher_heun_4"}
    # the teacher rows beside the student are the teacher's own `ayf test` (same noise, labels, weights)
    for key, res in teacher_record["results"].items():
        assert res["fd"] == pytest.approx(record["results"]["teacher_" + key]["fd"], rel=1e-4)
    for res in record["results"].values():
        assert set(res) == {"fd", "kid", "kid_std", "precision", "recall"}
        assert np.isfinite(res["fd"]) and res["fd"] > 0 and 0 <= res["precision"] <= 1
    # reference features were cached beside the training shards
    assert glob.glob("data/digits/train/reference-classifier-*-72.pt")


def test_bad_image_inputs_give_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_shards("b.npz", *blobs(20), output="shards")
    assert main(["shards", "arrays", "--images", "b.npz", "--output", "shards"]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["shards", "arrays", "--images", "b.npz", "--output", "shards", "--overwrite"]) == 0

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    assert main(["shards", "folder", "--root", "imgs", "--output", "o"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err

    fit_features(train="shards")  # the teacher config's FidelityMetrics loads it
    (tmp_path / "shards" / "val").mkdir()
    cfg = digits("teacher")
    for bad, message in [("", "empty shard path"), (str(tmp_path / "nowhere"), "does not exist")]:
        assert main(["fit", *cfg, "--data.init_args.train", bad, "--data.init_args.val", "null"]) == 2
        err = capsys.readouterr().err
        assert "ayf: error: " in err and message in err and "Traceback" not in err
    # shards whose image shape disagrees with the model
    assert main(["fit", *cfg, "--data.init_args.train", "shards", "--data.init_args.val", "null",
                 "--model.net.init_args.backbone.init_args.img_resolution", "16"]) == 2
    err = capsys.readouterr().err
    assert "ayf: error:" in err and "(1, 16, 16)" in err and "(1, 8, 8)" in err


def test_two_image_runs_with_the_same_seeds_train_identical_weights(tmp_path, monkeypatch):
    """seed_everything and the data seed fix the whole run: data order, times, noise, weights."""
    import torch

    monkeypatch.chdir(tmp_path)
    write_shards("b.npz", *blobs(64), val_fraction=0.25, max_size_mb=0.004)
    fit_features()
    cfg = digits("teacher", steps=6)  # 3 batches per epoch: 2 epochs

    def run(name, *extra):
        assert main(["fit", *cfg, "--trainer.logger.init_args.name", name, *extra]) == 0
        ckpt = torch.load(only(f"runs/digits/{name}/version_0/checkpoints/last.ckpt"), weights_only=False)
        return ckpt["state_dict"]

    a, b, c = run("a"), run("b"), run("c", "--data.init_args.seed", "1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another training order, other weights


@pytest.mark.parametrize("overlay, stage", [("teacher_fidelity", "teacher"), ("distill_emd_fidelity", "distill_emd")])
def test_fidelity_overlays_change_only_the_shipped_fidelity_metrics(overlay, stage):
    """tests/conf/digits/*_fidelity.yaml restate their stage's callback list (a list replaces the list
    it layers over): all but FidelityMetrics must stay the shipped ones."""
    def callbacks(path):
        config = yaml.safe_load(open(path))
        if "trainer.callbacks" in config:
            return config["trainer.callbacks"]
        if "callbacks" in config.get("trainer", {}):
            return config["trainer"]["callbacks"]
        return callbacks(os.path.join(os.path.dirname(path), config["config"]))  # the stage's are those of what it pulls in

    test, ours = callbacks(os.path.join(CONF, "digits", f"{overlay}.yaml")), callbacks(shipped("digits", stage))
    assert [c["class_path"] for c in test] == [c["class_path"] for c in ours]
    fidelity = "ayf.callbacks.FidelityMetrics"
    assert [c for c in test if c["class_path"] != fidelity] == [c for c in ours if c["class_path"] != fidelity]
    (mine,), (theirs,) = ([c["init_args"] for c in cbs if c["class_path"] == fidelity] for cbs in (test, ours))
    assert mine["extractor"] == theirs["extractor"]
