"""Image pipeline through the real CLI: shards -> features -> teacher -> EMD student -> ayf test."""
import glob
import json
import os

import numpy as np
import pytest
import yaml

from ayf.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_UNET = {"img_channels": 1, "img_resolution": 8, "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
             "attn_resolutions": [4], "channels_per_head": 8, "emb_dim": 16}


def blobs(n=96, seed=0):
    """Labelled 8x8 images: a bright square whose corner encodes the class (0..3)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, size=(n, 8, 8)).astype(np.uint8)
    y = np.arange(n) % 4
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 4 * r: 4 * r + 4, 4 * q: 4 * q + 4] = 220
    return x, y


def tiny_config(tmp_path, name, steps=3, teacher=None, fidelity_steps=None, fidelity=True, every_n_steps=0,
                teacher_steps=None):
    cfg = yaml.safe_load(open(os.path.join(ROOT, "configs", "digits", name)))
    cfg["data"] = {"class_path": "ayf.data.ImageShards",
                   "init_args": {"train": str(tmp_path / "shards" / "train"), "val": str(tmp_path / "shards" / "val"),
                                 "batch_size": 16, "epoch_length": 48, "shuffle_buffer": 32}}
    tr = cfg["trainer"]
    tr.update(max_steps=steps, val_check_interval=steps, default_root_dir=str(tmp_path),
              enable_progress_bar=False, enable_model_summary=False)
    tr["logger"]["init_args"]["save_dir"] = str(tmp_path)
    if not fidelity:
        tr["callbacks"] = [cb for cb in tr["callbacks"] if not cb["class_path"].endswith("FidelityMetrics")]
    for cb in tr["callbacks"]:
        if cb["class_path"].endswith("FidelityMetrics"):
            cb["init_args"]["extractor"]["init_args"]["path"] = str(tmp_path / "features.pt")
            cb["init_args"].update(num_samples=40, batch_size=20, kid_subset_size=20, every_n_steps=every_n_steps)
            if fidelity_steps:
                cb["init_args"]["steps"] = fidelity_steps
            if teacher_steps:
                cb["init_args"].update(teacher_steps=teacher_steps, solvers=["euler", "heun"])
    model = cfg["model"]["init_args"]
    model["net"]["init_args"]["num_classes"] = 4
    model["net"]["init_args"]["backbone"]["init_args"] = dict(TINY_UNET)
    if teacher:
        model["teacher"]["init_args"]["ckpt_path"] = teacher
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def only(pattern):
    (path,) = glob.glob(pattern)
    return path


def test_image_fit_then_ayf_test_writes_fidelity_json(tmp_path):
    x, y = blobs()
    np.savez(tmp_path / "blobs.npz", images=x, labels=y)
    assert main(["shards", "arrays", "--images", str(tmp_path / "blobs.npz"), "--output", str(tmp_path / "shards"),
                 "--val_fraction", "0.25"]) == 0
    assert main(["features", "fit", "--train", str(tmp_path / "shards" / "train"), "--val",
                 str(tmp_path / "shards" / "val"), "--output", str(tmp_path / "features.pt"), "--epochs", "2",
                 "--width", "4", "--feature_dim", "8"]) == 0

    teacher_cfg = tiny_config(tmp_path, "teacher.yaml", fidelity_steps=[2, 4])
    assert main(["fit", "--config", teacher_cfg]) == 0
    teacher_ckpt = only(str(tmp_path / "teacher" / "version_0" / "checkpoints" / "last.ckpt"))
    assert glob.glob(str(tmp_path / "teacher" / "version_0" / "grids" / "step_*.png"))
    assert main(["test", "--config", teacher_cfg, "--ckpt_path", teacher_ckpt]) == 0
    record = json.loads(open(only(str(tmp_path / "teacher" / "version_1" / "fidelity.json"))).read())
    assert set(record["results"]) == {"euler_2", "euler_4", "heun_2", "heun_4"}
    assert record["step"] == 3  # the checkpoint's trained step, not the test trainer's 0
    assert record["teacher"] == []

    student_cfg = tiny_config(tmp_path, "distill_emd.yaml", teacher=teacher_ckpt, every_n_steps=3, teacher_steps=[2, 4])
    assert main(["fit", "--config", student_cfg]) == 0
    student_ckpt = only(str(tmp_path / "distill_emd" / "version_0" / "checkpoints" / "last.ckpt"))
    periodic = [json.loads(line) for line in open(tmp_path / "distill_emd" / "version_0" / "fidelity.jsonl")]
    assert [r["step"] for r in periodic] == [3] and set(periodic[0]["results"]) == {f"flow_map_{k}" for k in (1, 2, 4, 8)}
    grid = only(str(tmp_path / "distill_emd" / "version_0" / "grids" / "step_0000003.png"))
    assert os.path.getsize(grid) > 1000
    assert main(["test", "--config", student_cfg, "--ckpt_path", student_ckpt]) == 0
    # a PNG grid from the student: 8 samples, one class per column (4 classes -> 2 rows of 4)
    assert main(["sample", "--ckpt_path", student_ckpt, "--steps", "2", "--num_samples", "8", "--label", "all",
                 "--output", str(tmp_path / "grid.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (4 * 9 + 1, 2 * 9 + 1)
    teacher_record = record
    record = json.loads(open(only(str(tmp_path / "distill_emd" / "version_1" / "fidelity.json"))).read())
    assert record["num_samples"] == 40 and record["reference_count"] == 72
    assert record["checkpoint"] == student_ckpt and record["teacher"] == [teacher_ckpt]
    assert set(record["results"]) == {"flow_map_1", "flow_map_2", "flow_map_4", "flow_map_8", "teacher_euler_2",
                                      "teacher_euler_4", "teacher_heun_2", "teacher_heun_4"}
    # the teacher rows beside the student are the teacher's own `ayf test` (same noise, labels, weights)
    for key, res in teacher_record["results"].items():
        assert res["fd"] == pytest.approx(record["results"]["teacher_" + key]["fd"], rel=1e-4)
    for res in record["results"].values():
        assert set(res) == {"fd", "kid", "kid_std", "precision", "recall"}
        assert np.isfinite(res["fd"]) and res["fd"] > 0 and 0 <= res["precision"] <= 1
    # reference features were cached beside the training shards
    assert glob.glob(str(tmp_path / "shards" / "train" / "reference-classifier-*-72.pt"))


def test_bad_image_inputs_give_one_line_errors(tmp_path, capsys):
    x, y = blobs(20)
    np.savez(tmp_path / "b.npz", images=x, labels=y)
    assert main(["shards", "arrays", "--images", str(tmp_path / "b.npz"), "--output", str(tmp_path / "shards")]) == 0
    assert main(["shards", "arrays", "--images", str(tmp_path / "b.npz"), "--output", str(tmp_path / "shards")]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["shards", "arrays", "--images", str(tmp_path / "b.npz"), "--output", str(tmp_path / "shards"),
                 "--overwrite"]) == 0

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    assert main(["shards", "folder", "--root", str(tmp_path / "imgs"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "broken.png" in err

    (tmp_path / "shards" / "val").mkdir()
    cfg = tiny_config(tmp_path, "teacher.yaml", fidelity=False)
    for bad, message in [("", "empty shard path"), (str(tmp_path / "nowhere"), "does not exist")]:
        assert main(["fit", "--config", cfg, "--data.init_args.train", bad, "--data.init_args.val", "null"]) == 2
        err = capsys.readouterr().err
        assert "ayf: error: " in err and message in err and "Traceback" not in err
    # shards whose image shape disagrees with the model
    assert main(["fit", "--config", cfg, "--data.init_args.train", str(tmp_path / "shards"), "--data.init_args.val",
                 "null", "--model.net.init_args.backbone.init_args.img_resolution", "16"]) == 2
    err = capsys.readouterr().err
    assert "ayf: error:" in err and "(1, 16, 16)" in err and "(1, 8, 8)" in err


def test_two_image_runs_with_the_same_seeds_train_identical_weights(tmp_path):
    """seed_everything and the data seed fix the whole run: data order, times, noise, weights."""
    import torch

    x, y = blobs(64)
    np.savez(tmp_path / "b.npz", images=x, labels=y)
    assert main(["shards", "arrays", "--images", str(tmp_path / "b.npz"), "--output", str(tmp_path / "shards"),
                 "--val_fraction", "0.25", "--max_size_mb", "0.004"]) == 0
    cfg = tiny_config(tmp_path, "teacher.yaml", steps=6, fidelity=False)  # 3 batches per epoch: 2 epochs

    def run(name, *extra):
        assert main(["fit", "--config", cfg, "--trainer.logger.init_args.name", name, *extra]) == 0
        ckpt = torch.load(only(str(tmp_path / name / "version_0" / "checkpoints" / "last.ckpt")), weights_only=False)
        return ckpt["state_dict"]

    a, b, c = run("a"), run("b"), run("c", "--data.init_args.seed", "1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another training order, other weights
