"""Digits in the latent space of a tiny random VAE, end to end through the CLI: latent shards, the
teacher, its distillation, ``ayf test`` (FD on decoded pixels), ``ayf sample`` (latents, decoded
pixels, a grid) and ``ayf export`` (the VAE goes with the flow map, and diffusers samples it as
``ayf sample`` does). The VAE is random: the FD figures say nothing about quality."""
import glob
import json
import os

import numpy as np
import pytest
import torch

from ayf.checkpoints import read_checkpoint
from ayf.cli import main
from ayf.errors import ConfigError
from tests.export_checks import assert_diffusers_samples, ayf_samples
from tests.toy_runs import CONF, blobs, shipped

diffusers = pytest.importorskip("diffusers")
from tests.test_encoders import tiny_vae  # noqa: E402

LATENT_NET = ["--model.init_args.net.init_args.backbone.init_args.img_channels", "4",
              "--model.init_args.net.init_args.backbone.init_args.img_resolution", "8"]


def digits(stage, *overlays):
    layers = ["tiny", *(["tiny_net"] if stage == "teacher" else []), *overlays]
    return ["--config", shipped("digits", stage),
            *[a for n in layers for a in ("--config", os.path.join(CONF, "digits", f"{n}.yaml"))]]


def only(pattern):
    (path,) = glob.glob(pattern)
    return path


def test_digits_in_a_vae_latent_space_from_shards_to_diffusers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import ayf.callbacks.grids as grids

    panels_seen, draw = [], grids.grid_figure
    monkeypatch.setattr(grids, "grid_figure", lambda panels, *a, **k: panels_seen.append(
        {name: tuple(x.shape[1:]) for name, x in panels.items()}) or draw(panels, *a, **k))
    vae = tiny_vae("weights/vae", channels=1)
    images, labels = blobs(64)
    np.savez("blobs.npz", images=images, labels=labels)
    split = ["--val_fraction", "0.25", "--pad", "4"]  # 8x8 -> 16x16 pixels -> (4, 8, 8) latents
    assert main(["shards", "arrays", "--images", "blobs.npz", "--output", "data/pixels", *split]) == 0
    assert main(["shards", "arrays", "--images", "blobs.npz", "--output", "data/digits", *split,
                 "--vae", vae, "--vae_normalisation", "edm2_sd"]) == 0
    from ayf.data import ImageShards

    with pytest.raises(ConfigError, match="holds latents; give pixel shards"):
        ImageShards(train="data/digits/train").reference_source("data/digits/val")
    assert main(["features", "fit", "--train", "data/digits/train", "--output", "f.pt"]) == 2  # latents: refused
    # the classifier features of FD / KID / PR look at pixels: the decoded samples, and the decoded data
    assert main(["features", "fit", "--train", "data/pixels/train", "--output", "data/digits/features.pt",
                 "--epochs", "1", "--width", "4", "--feature_dim", "8"]) == 0

    teacher = [*digits("teacher", "teacher_fidelity"), *LATENT_NET]
    os.rename("weights", "away")  # the VAE is needed to decode: a missing one is said at once, in one line
    capsys.readouterr()
    assert main(["fit", *teacher]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ayf: error:")]
    assert "the VAE of the latent shards data/digits/train: VAE folder not found" in line
    os.rename("away", "weights")
    assert main(["fit", *teacher]) == 0
    assert f"ayf: data: latents of the VAE {os.path.abspath(vae)}" in capsys.readouterr().err
    teacher_ckpt = only("runs/digits/teacher/version_0/checkpoints/last.ckpt")
    assert main(["test", *teacher, "--ckpt_path", teacher_ckpt]) == 0
    student = digits("distill_emd", "distill_emd_fidelity")
    assert main(["fit", *student]) == 0
    student_ckpt = only("runs/digits/distill_emd/version_0/checkpoints/last.ckpt")
    assert main(["test", *student, "--ckpt_path", student_ckpt]) == 0

    # against the pixel images the latents were encoded from, not their decoded posterior means
    with open("pixel_reference.yaml", "w") as fh:
        fh.write(open(os.path.join(CONF, "digits", "distill_emd_fidelity.yaml")).read().replace(
            "teacher_steps: [2, 4]", "teacher_steps: [2, 4]\n      reference: data/pixels/train"))
    assert main(["test", *digits("distill_emd"), "--config", "pixel_reference.yaml", "--ckpt_path", student_ckpt]) == 0
    decoded_ref, pixel_ref = (json.load(open(f"runs/digits/distill_emd/version_{k}/fidelity.json")) for k in (1, 2))
    assert decoded_ref["reference"].endswith("(latents decoded from their posterior means)")
    assert pixel_ref["reference"] == os.path.realpath("data/pixels/train")
    assert pixel_ref["results"]["flow_map_1"]["fd"] != decoded_ref["results"]["flow_map_1"]["fd"]
    # the samples are the same (same noise and labels): only the reference moved
    record = read_checkpoint(student_ckpt)["ayf"]
    assert record["data_shape"] == [4, 8, 8] and record["encoder"]["kind"] == "vae"
    assert record["encoder"]["folder"] == os.path.abspath(vae)
    for run in ("teacher/version_1", "distill_emd/version_1"):
        rows = json.load(open(f"runs/digits/{run}/fidelity.json"))["results"]
        assert rows and all(np.isfinite(r["fd"]) for r in rows.values())
    from PIL import Image

    assert only("runs/digits/distill_emd/version_0/grids/step_0000003.png")
    # the grids show decoded pixels, of the student and of the teacher beside it
    assert len(panels_seen) == 2 and {s for p in panels_seen for s in p.values()} == {(1, 16, 16)}
    assert any(name.startswith("teacher") for name in panels_seen[1])

    # ayf sample: latents by default, pixels with --decode, and a decoded grid
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = ayf_samples(student_ckpt, noise, 4, tmp_path)
    decoded = {}
    for steps in (1, 2, 4):
        assert main(["sample", "--ckpt_path", student_ckpt, "--noise", "noise.npy", "--steps", str(steps),
                     "--label", "all", "--decode", "--output", f"px{steps}.npy"]) == 0
        decoded[steps] = torch.from_numpy(np.load(f"px{steps}.npy"))
    assert latents[1].shape == (8, 4, 8, 8) and decoded[1].shape == (8, 1, 16, 16)
    from ayf.encoders import encoder_from_manifest

    torch.testing.assert_close(decoded[2], encoder_from_manifest(record["encoder"]).decode(latents[2]))
    assert main(["sample", "--ckpt_path", student_ckpt, "--steps", "2", "--num_samples", "8", "--label", "all",
                 "--scale", "1", "--output", "grid.png"]) == 0
    assert Image.open("grid.png").size == (4 * 17 + 1, 2 * 17 + 1)

    # ayf export: the VAE travels with the flow map; latents and decoded pixels equal ayf sample's
    assert main(["export", "--ckpt_path", student_ckpt, "--output", "exported"]) == 0
    os.rename("weights", "moved")  # the exported folder reads nothing of the run
    labels = torch.arange(8) % 4
    pipe = assert_diffusers_samples("exported", noise, latents, labels, output_type="latent")
    for steps, expected in decoded.items():
        got = pipe(num_inference_steps=steps, class_labels=labels, latents=noise, output_type="pt").images
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert os.path.isfile("exported/vae/diffusion_pytorch_model.safetensors")
    assert len(pipe(num_inference_steps=1, class_labels=labels, latents=noise).images) == 8  # PIL images
