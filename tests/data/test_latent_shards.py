"""Latent shards: pixels encoded by a tiny random AutoencoderKL, written, read back and resumed."""
import json
import shutil

import numpy as np
import pytest
import torch

from ayf.data.images import ImageShards, ShardSource, sample_pipeline
from ayf.data.shards import MANIFEST, PARTIAL, Source, encoder_of, write_dataset
from ayf.encoders import IdentityEncoder, VAEEncoder
from ayf.errors import ConfigError
from tests.test_encoders import tiny_vae

pytest.importorskip("diffusers")

PIXEL_KEYS = ["format", "count", "shape", "num_classes", "class_names", "mean", "std", "shards", "source"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


def _images(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3, 16, 16), dtype=np.uint8), rng.integers(0, 5, size=n)


def _stored(folder):
    """Every stored moments array of a shard set, in order, as written."""
    return torch.stack([s["x"] for s in sample_pipeline(ShardSource(str(folder)), raw=True)])


def _encode_like_the_writer(enc, x, batch_size):
    return torch.cat([enc.encode(torch.from_numpy(x[i: i + batch_size])) for i in range(0, len(x), batch_size)])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_shard_moments_are_the_encoders_output(tmp_path, vae_dir, dtype):
    x, y = _images()
    enc = VAEEncoder(vae_dir)
    ms = write_dataset(Source(x, y), tmp_path / "lat", encoder=enc, latent_dtype=dtype, batch_size=4, max_bytes=4096)
    m = ms["all"]
    assert len(m["shards"]) > 2 and m["count"] == 10 and m["num_classes"] == 5
    assert m["space"] == "latent" and m["shape"] == m["latent_shape"] == [4, 8, 8] and m["moments_shape"] == [8, 8, 8]
    assert m["pixel_shape"] == [3, 16, 16] and m["moments_dtype"] == dtype and m["encoder"] == enc.to_manifest()
    assert not (tmp_path / "lat" / PARTIAL).exists()
    got = _stored(tmp_path / "lat")
    want = _encode_like_the_writer(enc, x, 4)
    assert got.dtype == getattr(torch, dtype) and torch.equal(got, want.to(got.dtype))  # bit for bit (float16: rounded)
    if dtype == "float16":
        assert not torch.equal(got.float(), want)  # (float16 does round these)
    labels = [int(s["label"]) for s in sample_pipeline(ShardSource(str(tmp_path / "lat")))]
    assert labels == y.tolist()


def test_latent_statistics_in_the_manifest(tmp_path, vae_dir):
    x, _ = _images(6)
    for stored in ("mean", "posterior"):
        enc = VAEEncoder(vae_dir, stored=stored)
        m = write_dataset(Source(x), tmp_path / stored, encoder=enc, batch_size=4)["all"]
        moments = enc.encode(torch.from_numpy(x)).double()
        z = enc.mode(moments).double()
        sq = z**2 if stored == "mean" else z**2 + (moments[:, 4:] * 0.5 / torch.tensor([4.17, 4.62, 3.71, 3.28],
                                                                                  dtype=torch.float64).view(4, 1, 1)) ** 2
        mean = z.mean((0, 2, 3))
        np.testing.assert_allclose(m["mean"], mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m["std"], (sq.mean((0, 2, 3)) - mean**2).sqrt().numpy(), rtol=1e-5)


def test_data_module_reads_latents_of_the_latent_shape(tmp_path, vae_dir):
    x, y = _images(12)
    enc = VAEEncoder(vae_dir)
    write_dataset(Source(x, y), tmp_path / "lat", encoder=enc, batch_size=5, val_fraction=0.25)
    dm = ImageShards(train=str(tmp_path / "lat" / "train"), val=str(tmp_path / "lat" / "val"), batch_size=3,
                     epoch_length=9, shuffle_buffer=0)
    assert dm.data_shape == (4, 8, 8) and dm.num_classes == 5
    assert dm.encoder.to_manifest() == enc.to_manifest()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].dtype == torch.float32 and batch["x"].shape == (3, 4, 8, 8) and batch["label"].shape == (3,)
    val = torch.cat([b["x"] for b in dm.val_dataloader()])
    assert val.shape == (3, 4, 8, 8)
    workers = ImageShards(train=str(tmp_path / "lat" / "train"), batch_size=3, epoch_length=6, num_workers=2)
    assert [b["x"].shape for b in workers.train_dataloader()] == [(3, 4, 8, 8)] * 2  # the encoder travels to workers
    # each read draws afresh around the normalised posterior mean; the draws repeat with the seed
    src = ShardSource(str(tmp_path / "lat" / "train"))
    moments = _stored(tmp_path / "lat" / "train")
    read = lambda **kw: torch.stack([s["x"] for s in sample_pipeline(src, **kw)])  # noqa: E731
    first, again, other = read(seed=1), read(seed=1), read(seed=1, epoch=1)
    assert torch.equal(first, again) and not torch.allclose(first, other)
    mean, var = enc.latent_mean_var(moments.float())
    assert ((first - mean).abs() <= 6 * var.sqrt() + 1e-6).all() and not torch.allclose(first, mean)
    eps = (first - mean) / var.sqrt()
    assert not torch.allclose(eps[0], eps[1], atol=1e-3)  # a draw per example, not one for all
    pipe = sample_pipeline(src, seed=1)
    passes = [torch.stack([s["x"] for s in pipe]) for _ in range(2)]
    assert torch.equal(passes[0], first) and not torch.allclose(passes[0], passes[1])  # each read draws afresh
    # stored means: the latents are the normalised means themselves
    write_dataset(Source(x, y), tmp_path / "means", encoder=VAEEncoder(vae_dir, stored="mean"))
    means = torch.stack([s["x"] for s in sample_pipeline(ShardSource(str(tmp_path / "means")))])
    assert torch.equal(means, VAEEncoder(vae_dir, stored="mean").mode(_stored(tmp_path / "means").float()))
    # a validation set in another space is refused; the same VAE in another folder is the same space
    with pytest.raises(ConfigError, match="not in the space of the training shards"):
        ImageShards(train=str(tmp_path / "lat" / "train"), val=str(tmp_path / "means"))
    moved = shutil.copytree(vae_dir, tmp_path / "moved_vae")
    write_dataset(Source(x[:2], y[:2]), tmp_path / "moved", encoder=VAEEncoder(moved))
    assert ImageShards(train=str(tmp_path / "lat" / "train"), val=str(tmp_path / "moved")).val_source is not None


def test_encoder_of_a_manifest(tmp_path, vae_dir):
    x, y = _images(4)
    write_dataset(Source(x, y), tmp_path / "px")
    pixel_manifest = json.loads((tmp_path / "px" / MANIFEST).read_text())
    assert list(pixel_manifest) == PIXEL_KEYS  # the pixel path writes what it always wrote
    assert isinstance(encoder_of(pixel_manifest), IdentityEncoder)
    enc = VAEEncoder(vae_dir, stored="mean")
    write_dataset(Source(x, y), tmp_path / "lat", encoder=enc)
    got = encoder_of(json.loads((tmp_path / "lat" / MANIFEST).read_text()))
    assert got.to_manifest() == enc.to_manifest()
    with torch.no_grad():
        pixels = got.decode(torch.stack([s["x"] for s in sample_pipeline(ShardSource(str(tmp_path / "lat")))]))
    assert pixels.shape == (4, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1


class Broken(Source):
    """A source whose read of one image raises, as a kill would stop the write."""

    def __init__(self, *args, at=None, **kw):
        super().__init__(*args, **kw)
        self.at = at

    def __getitem__(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return super().__getitem__(i)


class Counting(VAEEncoder):
    """Counts the images it encodes."""

    encoded = 0

    def encode(self, pixels):
        Counting.encoded += len(pixels)
        return super().encode(pixels)


def test_an_interrupted_latent_write_resumes(tmp_path, vae_dir):
    x, y = _images(12)
    kw = dict(encoder=VAEEncoder(vae_dir), batch_size=3, max_bytes=8192)  # 2 images a shard
    whole = write_dataset(Source(x, y), tmp_path / "whole", **kw)["all"]
    with pytest.raises(KeyboardInterrupt):
        write_dataset(Broken(x, y, at=9), tmp_path / "cut", **kw)
    record = json.loads((tmp_path / "cut" / PARTIAL).read_text())
    done = sum(s["count"] for s in record["shards"])
    assert 0 < done < 9 and not (tmp_path / "cut" / MANIFEST).exists()
    # other arguments, or another source, are refused (without --overwrite)
    with pytest.raises(ConfigError, match="interrupted write of another job .*latent_dtype.*--overwrite"):
        write_dataset(Source(x, y), tmp_path / "cut", **{**kw, "latent_dtype": "float16"})
    changed = x.copy()
    changed[0, 0, 0, 0] ^= 1
    with pytest.raises(ConfigError, match="encoded from another image 0"):
        write_dataset(Source(changed, y), tmp_path / "cut", **kw)
    kept = {s["file"]: (tmp_path / "cut" / s["file"]).read_bytes() for s in record["shards"]}
    Counting.encoded = 0
    resumed = write_dataset(Source(x, y), tmp_path / "cut", **{**kw, "encoder": Counting(vae_dir)})["all"]
    assert Counting.encoded == 12 - done  # only the images of the incomplete shards were encoded
    assert all((tmp_path / "cut" / f).read_bytes() == data for f, data in kept.items())  # kept as they were
    same = ("count", "shape", "shards", "encoder", "job", "moments_shape", "num_classes")
    assert {k: resumed[k] for k in same} == {k: whole[k] for k in same}
    np.testing.assert_allclose(resumed["mean"], whole["mean"], rtol=1e-5)
    np.testing.assert_allclose(resumed["std"], whole["std"], rtol=1e-5)
    # (the VAE's output may differ in the last bits with the batch an image was encoded in)
    torch.testing.assert_close(_stored(tmp_path / "cut"), _stored(tmp_path / "whole"), rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "cut" / PARTIAL).exists()
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):  # a complete write is not redone
        write_dataset(Source(x, y), tmp_path / "cut", **kw)


def test_an_interrupted_split_write_resumes_its_unfinished_split(tmp_path, vae_dir):
    x, y = _images(12)
    kw = dict(encoder=VAEEncoder(vae_dir), batch_size=3, max_bytes=8192, val_fraction=0.25, seed=1)
    whole = write_dataset(Source(x, y), tmp_path / "whole", **kw)
    val_first = int(np.sort(np.random.default_rng(1).permutation(12)[:3])[1])
    with pytest.raises(KeyboardInterrupt):
        write_dataset(Broken(x, y, at=val_first), tmp_path / "cut", **kw)
    assert (tmp_path / "cut" / "train" / MANIFEST).exists() and (tmp_path / "cut" / "val" / PARTIAL).exists()
    with pytest.raises(ConfigError, match="interrupted write with a train/val split: pass --overwrite"):
        write_dataset(Source(x, y), tmp_path / "cut", **{**kw, "val_fraction": 0.0})
    Counting.encoded = 0
    resumed = write_dataset(Source(x, y), tmp_path / "cut", **{**kw, "encoder": Counting(vae_dir)})
    assert Counting.encoded <= 3  # the training split was complete and is kept
    for split in ("train", "val"):
        assert resumed[split]["count"] == whole[split]["count"]
        torch.testing.assert_close(_stored(tmp_path / "cut" / split), _stored(tmp_path / "whole" / split),
                                   rtol=1e-5, atol=1e-5)


def test_cli_writes_latent_shards(tmp_path, vae_dir):
    from ayf.cli import main

    x, y = _images(5)
    np.savez(tmp_path / "x.npz", images=x, labels=y)
    out = tmp_path / "lat"
    assert main(["shards", "arrays", "--images", str(tmp_path / "x.npz"), "--output", str(out), "--vae", vae_dir,
                 "--vae_normalisation", '{"mean": [0, 0, 0, 0], "std": [2, 2, 2, 2]}', "--vae_pixel_range", "[-1,1]",
                 "--latent_dtype", "float16", "--stored", "mean", "--batch_size", "2"]) == 0
    m = json.loads((out / MANIFEST).read_text())
    assert m["moments_dtype"] == "float16" and m["moments_shape"] == [4, 8, 8] and m["encoder"]["stored"] == "mean"
    assert m["encoder"]["normalisation"]["std"] == [2.0] * 4 and m["encoder"]["pixel_range"] == "[-1,1]"
    enc = VAEEncoder(vae_dir, pixel_range="[-1,1]", stored="mean")
    assert torch.equal(_stored(out), _encode_like_the_writer(enc, x, 2).half())
    assert main(["shards", "arrays", "--images", str(tmp_path / "x.npz"), "--output", str(tmp_path / "o"),
                 "--stored", "mean"]) == 2  # latent options without --vae
    assert main(["shards", "arrays", "--images", str(tmp_path / "x.npz"), "--output", str(tmp_path / "o"),
                 "--vae", str(tmp_path)]) == 2  # not a VAE folder
    assert not (tmp_path / "o").exists()
