"""ayf.encoders: the identity and a tiny random diffusers AutoencoderKL built from a config."""
import json
import shutil
import sys

import pytest
import torch

from ayf.encoders import NORMALISATIONS, IdentityEncoder, VAEEncoder, encoder_from_manifest
from ayf.errors import ConfigError

diffusers = pytest.importorskip("diffusers")

EDM2_MEAN, EDM2_STD = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]


def tiny_vae(folder, latent_channels=4, seed=0, channels=3):
    """A random AutoencoderKL small enough for the CPU (downsampling by 2), saved in ``folder``."""
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


@pytest.fixture
def pixels():
    return torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def reference_vae(folder):
    return diffusers.AutoencoderKL.from_pretrained(folder, local_files_only=True).eval()


def test_edm2_preset_constants_are_applied_and_inverted(vae_dir):
    enc = VAEEncoder(vae_dir)
    norm = enc.to_manifest()["normalisation"]
    assert norm == {"preset": "edm2_sd", "mean": EDM2_MEAN, "std": EDM2_STD, "final_mean": [0.0] * 4,
                    "final_std": [0.5] * 4}
    raw = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 4 + 2
    z = enc.normalise(raw)
    m, s = torch.tensor(EDM2_MEAN).view(4, 1, 1), torch.tensor(EDM2_STD).view(4, 1, 1)
    assert torch.equal(z, (raw - m) / s * 0.5)  # the formula, channel by channel, in float32
    expected = (raw.double() - m.double()) / s.double() * 0.5
    torch.testing.assert_close(z.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(enc.denormalise(z), raw, rtol=1e-6, atol=1e-5)
    # the raw mean maps to the final mean, one raw std above it to the final std
    assert torch.allclose(enc.normalise(m.expand(4, 2, 2)), torch.zeros(4, 2, 2), atol=1e-7)
    assert torch.allclose(enc.normalise((m + s).expand(4, 2, 2)), torch.full((4, 2, 2), 0.5), atol=1e-6)


def test_custom_normalisation_and_wrong_channel_count(vae_dir):
    enc = VAEEncoder(vae_dir, normalisation={"mean": [1, 2, 3, 4], "std": [2, 2, 2, 2], "final_mean": [0, 0, 1, 0]})
    raw = torch.ones(4, 1, 1) * 3
    assert enc.normalise(raw).flatten().tolist() == [0.5, 0.25, 1.0, -0.25]  # final_std defaults to 0.5
    with pytest.raises(ConfigError) as err:
        VAEEncoder(vae_dir, normalisation={"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]})
    assert "mean has 3 channels" in one_line(err) and "4 latent channels" in str(err.value)
    eight = tiny_vae(str(vae_dir) + "-8ch", latent_channels=8)
    with pytest.raises(ConfigError) as err:
        VAEEncoder(eight)  # the SD preset's 4 channels for an 8-channel VAE
    assert "has 4 channels" in one_line(err) and eight in str(err.value)
    for bad, what in (("sdxl", "unknown normalisation"), ({"mean": [0] * 4}, "needs"),
                      ({"mean": [0] * 4, "std": [1, 1, 0, 1]}, "positive"), ({"mean": [0] * 4, "std": [1] * 4, "scale": 2}, "unknown")):
        with pytest.raises(ConfigError, match=what) as err:
            VAEEncoder(vae_dir, normalisation=bad)
        one_line(err)


def test_a_folder_that_is_not_a_vae_is_one_line(tmp_path, vae_dir, pixels):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(vae_dir, no_weights)
    (no_weights / "diffusion_pytorch_model.safetensors").unlink()
    cases = {"missing": "VAE folder not found", "empty": "no config.json", "unet": "not an AutoencoderKL folder",
             "broken": "cannot read config.json", "no_weights": "no weights"}
    for name, what in cases.items():
        with pytest.raises(ConfigError) as err:
            VAEEncoder(tmp_path / name)
        assert what in one_line(err) and str(tmp_path / name) in str(err.value), name
    corrupt = tmp_path / "corrupt"
    shutil.copytree(vae_dir, corrupt)
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError) as err:
        VAEEncoder(corrupt).encode(pixels)  # the weights are read when first needed
    assert f"cannot load the AutoencoderKL in {corrupt}" in one_line(err)


@pytest.mark.parametrize("pixel_range", ["[0,1]", "[-1,1]"])
def test_encode_is_the_posterior_and_decode_is_the_vaes_own_path(vae_dir, pixels, pixel_range):
    vae = reference_vae(vae_dir)
    x = pixels.float() / 255 if pixel_range == "[0,1]" else pixels.float() / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        out = vae.decode(dist.mean).sample
    ref = (out * 2 - 1 if pixel_range == "[0,1]" else out).clamp(-1, 1)
    mean_enc = VAEEncoder(vae_dir, pixel_range=pixel_range, stored="mean")
    post_enc = VAEEncoder(vae_dir, pixel_range=pixel_range, stored="posterior")
    moments = post_enc.encode(pixels)
    assert moments.shape == (3, 8, 8, 8) and post_enc.moments_shape((3, 16, 16)) == (8, 8, 8)
    assert torch.equal(moments, torch.cat([dist.mean, dist.std], 1))  # the posterior's mean and std, no draw
    assert torch.equal(moments, post_enc.encode(pixels))  # deterministic
    assert torch.equal(mean_enc.encode(pixels), dist.mean)
    with torch.no_grad():
        for enc, latents in ((mean_enc, mean_enc.sample(mean_enc.encode(pixels))), (post_enc, post_enc.mode(moments))):
            assert latents.shape == (3, *enc.latent_shape((3, 16, 16))) == (3, 4, 8, 8)
            torch.testing.assert_close(enc.decode(latents), ref, rtol=0, atol=1e-5)


def test_posterior_sample_is_mean_plus_std_times_eps(vae_dir, pixels):
    enc = VAEEncoder(vae_dir)
    moments = enc.encode(pixels)
    mean, std = moments.chunk(2, dim=1)
    z = enc.sample(moments, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z, enc.normalise(mean + std * eps))
    gen = torch.Generator().manual_seed(4)
    first, second = enc.sample(moments, gen), enc.sample(moments, gen)
    assert not torch.allclose(first, second)  # a fresh draw each time
    one = moments[0]  # an unbatched example (C, h, w), as the data module reads it
    draws = torch.stack([enc.sample(one, gen) for _ in range(3000)])
    expected_mean, expected_var = enc.latent_mean_var(one)
    torch.testing.assert_close(expected_mean, enc.mode(one))
    assert (draws.mean(0) - expected_mean).abs().max() < 5 * expected_var.sqrt().max() / 3000**0.5
    assert torch.allclose(draws.var(0), expected_var, rtol=0.2)
    assert torch.equal(VAEEncoder(vae_dir, stored="mean").sample(mean, gen), enc.mode(moments))


def test_manifest_round_trip_needs_the_folder_only_for_the_vae(tmp_path, vae_dir, pixels):
    folder = shutil.copytree(vae_dir, tmp_path / "vae")
    enc = VAEEncoder(folder, pixel_range="[-1,1]", stored="mean")
    record = json.loads(json.dumps(enc.to_manifest()))
    assert record["kind"] == "vae" and record["folder"] == str(folder) and record["stored"] == "mean"
    assert record["pixel_range"] == "[-1,1]" and record["latent_channels"] == 4 and record["downsample"] == 2
    again = encoder_from_manifest(record)
    assert again.to_manifest() == record and again.describe() == enc.describe()
    moments = enc.encode(pixels)
    shutil.rmtree(folder)
    assert torch.equal(again.sample(moments), enc.sample(moments))  # no VAE needed to draw latents
    with pytest.raises(ConfigError) as err:
        again.decode(again.sample(moments))
    assert f"VAE folder not found: {folder}" in one_line(err)
    assert isinstance(encoder_from_manifest({"kind": "identity"}), IdentityEncoder)
    with pytest.raises(ConfigError, match="unknown encoder kind 'vq'"):
        encoder_from_manifest({"kind": "vq"})
    assert enc.state_dict() == {} and list(enc.parameters()) == []  # the VAE stays out of checkpoints


def test_identity_encoder_is_model_units(pixels):
    enc = IdentityEncoder()
    x = enc.encode(pixels)
    assert torch.equal(x, pixels.float() / 127.5 - 1)
    assert enc.sample(x) is x and enc.decode(x) is x and enc.latent_shape((3, 16, 16)) == (3, 16, 16)
    assert encoder_from_manifest(json.loads(json.dumps(enc.to_manifest()))).to_manifest() == enc.to_manifest()


def test_bad_inputs_are_one_line(vae_dir, pixels, monkeypatch):
    enc = VAEEncoder(vae_dir)
    for call, what in ((lambda: enc.latent_shape((3, 15, 16)), "downsamples by 2"),
                       (lambda: enc.latent_shape((1, 16, 16)), "3-channel pixels"),
                       (lambda: enc.encode(pixels.float()), "uint8 pixels"),
                       (lambda: enc.sample(torch.zeros(4, 8, 8)), "8 channels"),
                       (lambda: VAEEncoder(vae_dir, pixel_range="[0,255]"), "pixel_range"),
                       (lambda: VAEEncoder(vae_dir, stored="sample"), "stored")):
        with pytest.raises(ConfigError, match=what) as err:
            call()
        one_line(err)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'ayf\[diffusers\]'"):
        VAEEncoder(vae_dir).encode(pixels)
    assert NORMALISATIONS["edm2_sd"]["final_std"] == 0.5
