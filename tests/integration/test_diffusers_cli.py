"""The diffusers path of the guide, end to end: a tiny UNet2DModel saved as a pipeline's unet/ and
scheduler/ folders, distilled through ``ayf fit --config configs/diffusers/distill_emd.yaml`` and
sampled through ``ayf sample`` (nothing is downloaded)."""
import contextlib
import glob
import json
import os

import numpy as np
import pytest
import torch

from ayf.cli import main
from tests.export_checks import assert_diffusers_samples, ayf_samples, tiny_unet2d
from tests.toy_runs import CONF, blobs, shipped

diffusers = pytest.importorskip("diffusers")


def test_tiny_diffusers_teacher_distils_and_samples(tmp_path):
    model = tiny_unet2d()
    with contextlib.chdir(tmp_path):
        model.save_pretrained("weights/diffusers/unet")
        diffusers.DDPMScheduler(prediction_type="v_prediction").save_pretrained("weights/diffusers/scheduler")
        images, labels = blobs(48)
        np.savez("blobs.npz", images=images, labels=labels)
        assert main(["shards", "arrays", "--images", "blobs.npz", "--output", "data/diffusers", "--val_fraction", "0.25"]) == 0
        assert main(["fit", "--config", shipped("diffusers", "distill_emd"),
                     "--config", os.path.join(CONF, "diffusers", "tiny.yaml")]) == 0
        run = tmp_path / "runs" / "diffusers" / "distill_emd" / "version_0"
        assert (run / "grids" / "step_0000003.png").is_file()
        ckpt = str(run / "checkpoints" / "last.ckpt")
        for steps in ("1", "2"):
            assert main(["sample", "--ckpt_path", ckpt, "--steps", steps, "--num_samples", "4", "--label", "all",
                         "--output", f"x{steps}.npy"]) == 0
        x1, x2 = np.load("x1.npy"), np.load("x2.npy")
        # exported to diffusers, it samples there as `ayf sample` samples it
        noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        ours = ayf_samples(ckpt, noise, 4, tmp_path)
        assert main(["export", "--ckpt_path", ckpt, "--output", "exported"]) == 0
        assert_diffusers_samples("exported", noise, ours, torch.arange(4) % 4)
        # the teacher itself, from its folder
        assert main(["sample", "--diffusers", "weights/diffusers/unet", "--solver", "heun", "--steps", "4",
                     "--num_samples", "4", "--label", "all", "--output", "teacher.npy"]) == 0
        # FD / KID / PR of the student and its teacher through the documented overlay
        assert main(["features", "fit", "--train", "data/diffusers/train", "--val", "data/diffusers/val", "--output",
                     "data/diffusers/features.pt", "--epochs", "1", "--width", "4", "--feature_dim", "8"]) == 0
        assert main(["test", "--config", shipped("diffusers", "distill_emd"), "--config", shipped("diffusers", "fid"),
                     "--config", os.path.join(CONF, "diffusers", "tiny.yaml"), "--ckpt_path", ckpt,
                     "--trainer.callbacks.init_args.num_samples", "16"]) == 0
        (result,) = glob.glob("runs/diffusers/distill_emd/version_1/fidelity.json")
        rows = json.load(open(result))["results"]
    assert x1.shape == (4, 1, 8, 8) and np.isfinite(x1).all() and np.abs(x1 - x2).max() > 1e-4
    assert np.load(tmp_path / "teacher.npy").shape == (4, 1, 8, 8)
    # the checkpoint records the folder absolute: it samples from elsewhere, and follows a moved folder when told
    os.rename(tmp_path / "weights", tmp_path / "moved")
    out = str(tmp_path / "again.npy")
    assert main(["sample", "--ckpt_path", ckpt, "--steps", "1", "--num_samples", "4", "--label", "all",
                 "--output", out]) == 2
    assert main(["sample", "--ckpt_path", ckpt, "--steps", "1", "--num_samples", "4", "--label", "all",
                 "--model_folder", str(tmp_path / "moved" / "diffusers" / "unet"), "--output", out]) == 0
    np.testing.assert_allclose(np.load(out), x1, rtol=1e-5, atol=1e-6)
    moved = str(tmp_path / "moved" / "diffusers" / "unet")
    for misplaced in (["--ckpt_path", ckpt, "--scheduler", "s"], ["--diffusers", moved, "--model_folder", "m"]):
        assert main(["sample", *misplaced, "--output", str(tmp_path / "n.npy")]) == 2  # an option that would be ignored
    assert {"flow_map_1", "flow_map_8", "teacher_heun_64"} <= set(rows)


def test_a_missing_model_folder_names_its_config_key(tmp_path, capsys):
    with contextlib.chdir(tmp_path):
        capsys.readouterr()
        assert main(["fit", "--config", shipped("diffusers", "distill_emd"),
                     "--model.teacher.init_args.model", "nowhere/unet"]) == 2  # typed relative, recorded absolute
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ayf: error:")]
    assert line.endswith(f"folder not found: {tmp_path / 'nowhere' / 'unet'}; the config names it in "
                         "--model.teacher.init_args.model"), line
