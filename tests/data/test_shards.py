import gzip
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch

from ayf.data.images import ImageShards, ShardSource, SkipCounter, sample_pipeline
from ayf.data.shards import MANIFEST, Source, read_idx, write_dataset
from ayf.errors import ConfigError


def read_all(spec, raw=True):
    """Every sample of a shard set, in order."""
    return list(sample_pipeline(ShardSource(spec), raw=raw))


def _images(n=40, shape=(3, 6, 5), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), rng.integers(0, 7, size=n)


@pytest.mark.parametrize("gz", [False, True])
def test_shards_round_trip_bit_exact_with_labels(tmp_path, gz):
    x, y = _images()
    # a 2 KB cap forces several shards
    manifests = write_dataset(Source(x, y), tmp_path / "out", max_bytes=2048, gzip=gz)
    m = manifests["all"]
    assert m["count"] == 40 and m["shape"] == [3, 6, 5] and m["num_classes"] == 7
    assert len(m["shards"]) > 3 and sum(s["count"] for s in m["shards"]) == 40
    assert all(s["file"].endswith(".tar.gz" if gz else ".tar") for s in m["shards"])
    samples = read_all(str(tmp_path / "out"))
    got = torch.stack([s["x"] for s in samples]).numpy()
    assert got.dtype == np.uint8 and np.array_equal(got, x)
    assert [int(s["label"]) for s in samples] == y.tolist()
    # decoded model units are u / 127.5 - 1, and the manifest's stats match them
    dec = torch.stack([s["x"] for s in read_all(str(tmp_path / "out"), raw=False)])
    assert torch.equal(dec, torch.from_numpy(x).float() / 127.5 - 1)
    units = x.astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(m["mean"], units.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(m["std"], units.std(axis=(0, 2, 3)), rtol=1e-9)


def test_unlabelled_and_val_split(tmp_path):
    x, _ = _images(25, (1, 4, 4))
    ms = write_dataset(Source(x), tmp_path / "d", val_fraction=0.2, seed=3)
    assert ms["train"]["count"] == 20 and ms["val"]["count"] == 5 and ms["val"]["num_classes"] == 0
    back = np.concatenate([torch.stack([s["x"] for s in read_all(str(tmp_path / "d" / k))]).numpy()
                           for k in ("train", "val")])
    assert sorted(map(bytes, back)) == sorted(map(bytes, x))
    assert "label" not in read_all(str(tmp_path / "d" / "val"))[0]


def test_existing_output_refused_without_overwrite(tmp_path):
    x, y = _images(5)
    write_dataset(Source(x, y), tmp_path / "o")
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty; pass --overwrite"):
        write_dataset(Source(x, y), tmp_path / "o")
    write_dataset(Source(x[:2], y[:2]), tmp_path / "o", overwrite=True)
    assert json.loads((tmp_path / "o" / MANIFEST).read_text())["count"] == 2
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"  # the user's file survives


def test_interrupted_write_leaves_no_complete_looking_shard(tmp_path):
    x, y = _images(30)

    class Broken(Source):
        def __getitem__(self, i):
            if i == 17:
                raise KeyboardInterrupt
            return super().__getitem__(i)

    with pytest.raises(KeyboardInterrupt):
        write_dataset(Broken(x, y), tmp_path / "o", max_bytes=2048)
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert MANIFEST not in names and not any(n.endswith(".tmp") for n in names)
    for name in names:  # every file with a shard name is a complete tar
        with tarfile.open(tmp_path / "o" / name) as tf:
            assert len(tf.getmembers()) % 2 == 0
    with pytest.raises(ConfigError, match="write was interrupted"):
        ShardSource(str(tmp_path / "o"))


def _shard_set(tmp_path, n=53, per_shard_bytes=1500):
    x, y = _images(n, (1, 8, 8))
    write_dataset(Source(x, y), tmp_path / "s", max_bytes=per_shard_bytes)
    return x, ShardSource(str(tmp_path / "s"))


@pytest.mark.parametrize("world_size,workers", [(1, 2), (2, 2), (3, 1)])
def test_split_over_ranks_and_workers_yields_each_sample_once(tmp_path, world_size, workers):
    x, src = _shard_set(tmp_path)
    assert len(src.urls) >= world_size * workers
    seen = []
    for rank in range(world_size):
        pipe = sample_pipeline(src, rank=rank, world_size=world_size, raw=True)
        loader = torch.utils.data.DataLoader(pipe, batch_size=4, num_workers=workers)
        for batch in loader:
            seen += [bytes(img.numpy()) for img in batch["x"]]
    assert len(seen) == len(x)
    assert sorted(seen) == sorted(bytes(img) for img in x)


@pytest.mark.parametrize("world_size,workers", [(2, 1), (3, 2)])
def test_sample_split_gives_every_rank_a_balanced_share_even_from_one_shard(tmp_path, world_size, workers):
    """The evaluation split: fewer shards than ranks, yet every rank and worker gets data, the
    shares differ by at most one sample, and together they hold each sample once."""
    x, y = _images(11, (1, 8, 8))
    write_dataset(Source(x, y), tmp_path / "one")
    src = ShardSource(str(tmp_path / "one"))
    assert len(src.urls) == 1
    seen, sizes = [], []
    for rank in range(world_size):
        pipe = sample_pipeline(src, rank=rank, world_size=world_size, raw=True, split="samples")
        mine = [bytes(img.numpy()) for batch in torch.utils.data.DataLoader(pipe, batch_size=2, num_workers=workers)
                for img in batch["x"]]
        seen += mine
        sizes.append(len(mine))
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sorted(seen) == sorted(bytes(img) for img in x)


def test_resampled_epoch_has_fixed_length(tmp_path):
    _, src = _shard_set(tmp_path)
    pipe = sample_pipeline(src, resampled=True, shuffle_buffer=16, epoch_samples=37)
    assert sum(1 for _ in pipe) == 37


def _order(samples):
    return [bytes(np.asarray(s["x"])) for s in samples]


def test_seeded_training_order_repeats_and_changes_with_epoch_and_seed(tmp_path):
    _, src = _shard_set(tmp_path)

    def epoch(seed, e):
        return _order(sample_pipeline(src, resampled=True, shuffle_buffer=16, epoch_samples=40, seed=seed,
                                      epoch=e, raw=True))

    assert epoch(3, 0) == epoch(3, 0) and epoch(3, 1) == epoch(3, 1)
    assert epoch(3, 0) != epoch(3, 1) and epoch(3, 0) != epoch(4, 0)
    assert epoch(None, 0) != epoch(None, 0)  # seed None: a fresh order every time
    # the single-pass (not resampled) reader shuffles reproducibly too, and still yields each sample once
    once = [_order(sample_pipeline(src, shuffle_buffer=16, seed=3, epoch=e, raw=True)) for e in (0, 0, 1)]
    assert once[0] == once[1] != once[2] and sorted(once[0]) == sorted(once[2]) and len(once[0]) == 53


def _passes(dm, n, position=None):
    loader = dm.train_dataloader()
    if position is not None:
        loader.load_state_dict(position)
    return [[bytes(img.numpy()) for b in loader for img in b["x"]] for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_datamodule_training_order_follows_seed_and_saved_position(tmp_path, workers):
    _shard_set(tmp_path)
    make = lambda seed: ImageShards(train=str(tmp_path / "s"), batch_size=8, epoch_length=32,  # noqa: E731
                                    num_workers=workers, seed=seed)
    first = _passes(make(0), 3)
    assert first == _passes(make(0), 3)  # a second run repeats the first
    assert first[0] != first[1] != first[2] and first[0] != _passes(make(1), 1)[0]

    # a resumed run: the checkpoint's position says pass 2, one batch (8 images) served
    assert _passes(make(0), 1, {"epoch": 2, "batches": 0})[0] == first[2]
    resumed = _passes(make(0), 2, {"epoch": 2, "batches": 1})
    assert resumed[0] == first[2][8:] and len(resumed[1]) == 32 and resumed[1] != first[2]


def _rewrite_member(path, bad_key, payload):
    """Copy a tar, replacing the .npy member of one sample by ``payload``."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for m, data in members:
            if m.name == f"{bad_key}.npy":
                data = payload
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def test_corrupt_member_is_skipped_and_counted(tmp_path, caplog):
    x, src = _shard_set(tmp_path)
    _rewrite_member(src.urls[1], f"{src.manifest['shards'][0]['count']:08d}", b"not an array")
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="ayf.data"):
        got = list(sample_pipeline(src, raw=True, counter=counter))
    assert len(got) == len(x) - 1 and counter.count == 1
    assert "skipped corrupt sample (1 so far)" in caplog.text


def test_datamodule_batches_and_bad_paths(tmp_path):
    _, src = _shard_set(tmp_path)
    dm = ImageShards(train=str(tmp_path / "s"), val=str(tmp_path / "s"), batch_size=8, epoch_length=40)
    assert dm.data_shape == (1, 8, 8) and dm.num_classes == 7
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader()) == 5 and batches[0]["x"].shape == (8, 1, 8, 8) and batches[0]["x"].dtype == torch.float32
    assert float(batches[0]["x"].min()) >= -1 and float(batches[0]["x"].max()) <= 1
    assert sum(len(b["x"]) for b in dm.val_dataloader()) == 53
    # a URL pattern with the manifest beside the shards
    pattern = str(tmp_path / "s" / f"shard-{{000000..{len(src.urls) - 1:06d}}}.tar")
    assert len(read_all(pattern)) == 53
    with pytest.raises(ConfigError, match="does not exist"):
        ImageShards(train=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="empty shard path"):
        ImageShards(train="")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no manifest.json"):
        ImageShards(train=str(tmp_path / "empty"))


def test_idx_reader(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in imgs.shape)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + imgs.tobytes())
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), imgs)
    (tmp_path / "bad").write_bytes(header + imgs.tobytes()[:-1])
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(tmp_path / "bad")


def test_folder_source_classes_from_subfolders(tmp_path):
    from PIL import Image

    from ayf.cli import main

    rng = np.random.default_rng(1)
    expected = {}
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
            expected[(cls, i)] = arr.transpose(2, 0, 1)
    assert main(["shards", "folder", "--root", str(tmp_path / "imgs"), "--output", str(tmp_path / "s")]) == 0
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert m["class_names"] == ["cat", "dog"] and m["shape"] == [3, 5, 4] and m["count"] == 6
    samples = read_all(str(tmp_path / "s"))
    for j, s in enumerate(samples):  # sorted class folders, sorted files: PNG is lossless
        cls, i = ("cat", "dog")[j // 3], j % 3
        assert int(s["label"]) == j // 3 and np.array_equal(s["x"].numpy(), expected[(cls, i)])


def test_folder_source_crops_images_of_any_size_to_the_resolution(tmp_path):
    """--resolution: the short side scaled to N, the centre square kept (a wide image loses its
    sides, a tall one its top and bottom); images of several sizes make one data set."""
    from PIL import Image

    from ayf.cli import main

    (tmp_path / "imgs").mkdir()
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, 32:64] = 255  # the centre third white: all that is kept
    tall = np.zeros((70, 20, 3), dtype=np.uint8)
    tall[30:40] = 200  # a band across the middle (the middle half of the kept square)
    Image.fromarray(wide).save(tmp_path / "imgs" / "a.png")
    Image.fromarray(tall).save(tmp_path / "imgs" / "b.png")
    assert main(["shards", "folder", "--root", str(tmp_path / "imgs"), "--resolution", "8",
                 "--output", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / MANIFEST).read_text())["shape"] == [3, 8, 8]
    a, b = (s["x"].numpy() for s in read_all(str(tmp_path / "s")))
    assert (a == 255).all()
    assert b[:, 0].max() < 40 and b[:, -1].max() < 40 and (b[:, 3:5] > 150).all()  # the band, centred
    assert main(["shards", "folder", "--root", str(tmp_path / "imgs"), "--resolution", "0",
                 "--output", str(tmp_path / "t")]) == 2


def test_a_subset_is_a_seeded_random_share_of_every_class(tmp_path):
    """--subset N: N images drawn at random (not the first N, which would be the first classes),
    the whole source's class count kept, the same N for the same seed."""
    from ayf.cli import main

    images = np.repeat(np.arange(100, dtype=np.uint8), 16).reshape(100, 4, 4)
    labels = np.arange(100) // 10  # sorted by class, as a folder of class sub-folders is
    labels[-1] = 10  # a class of one image, which the seed-0 subset leaves out
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    for name, seed in (("s", "0"), ("t", "0"), ("u", "1")):
        assert main(["shards", "arrays", "--images", str(tmp_path / "a.npz"), "--subset", "30", "--seed", seed,
                     "--output", str(tmp_path / name)]) == 0
    kept = {n: [int(x["x"][0, 0, 0]) for x in read_all(str(tmp_path / n))] for n in "stu"}
    assert len(kept["s"]) == 30 and kept["s"] == kept["t"] != kept["u"] and kept["s"] == sorted(kept["s"])
    assert len({k // 10 for k in kept["s"]}) >= 8 and max(kept["s"]) > 50
    assert 99 not in kept["s"] and json.loads((tmp_path / "s" / MANIFEST).read_text())["num_classes"] == 11
    assert main(["shards", "arrays", "--images", str(tmp_path / "a.npz"), "--subset", "101",
                 "--output", str(tmp_path / "v")]) == 2


def test_digits_source_scales_to_full_range(tmp_path):
    from ayf.cli import main

    assert main(["shards", "digits", "--limit", "50", "--output", str(tmp_path / "d"), "--gzip"]) == 0
    m = json.loads((tmp_path / "d" / MANIFEST).read_text())
    assert m["count"] == 50 and m["shape"] == [1, 8, 8] and m["num_classes"] == 10
    x = torch.stack([s["x"] for s in read_all(str(tmp_path / "d"))])
    assert int(x.max()) == 255 and int(x.min()) == 0  # digits' 0..16 mapped onto 0..255
