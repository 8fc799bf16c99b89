"""VectorData reads (N, D) arrays from .npy / .npz files; `ayf points` writes 2-D point sets for it."""
import numpy as np
import pytest
import torch

from ayf.cli import main
from ayf.data import VectorData
from ayf.data.points import DATASETS, make_points
from ayf.errors import ConfigError


def rows(n=50, d=3):
    """Rows whose first coordinate is their index, so that a split can be checked against the file."""
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x[:, 0] = np.arange(n)
    return x


def all_rows(dm, split):
    return torch.cat([b["x"] for b in (dm.train_dataloader() if split == "train" else dm.val_dataloader())])


def test_npy_rows_split_into_disjoint_train_and_validation_by_seed(tmp_path):
    np.save(tmp_path / "x.npy", rows())
    dm = VectorData(str(tmp_path / "x.npy"), val_fraction=0.2, batch_size=8, seed=3)
    train, val = dm._sets["train"].x[:, 0].long(), dm._sets["val"].x[:, 0].long()
    assert dm.data_shape == (3,) and dm.num_classes is None
    assert len(val) == 10 and len(train) == 40
    assert sorted(torch.cat([train, val]).tolist()) == list(range(50))
    again = VectorData(str(tmp_path / "x.npy"), val_fraction=0.2, batch_size=8, seed=3)
    assert torch.equal(again._sets["val"].x, dm._sets["val"].x)
    other = VectorData(str(tmp_path / "x.npy"), val_fraction=0.2, batch_size=8, seed=4)
    assert not torch.equal(other._sets["val"].x, dm._sets["val"].x)
    # rows come back whole: the values of the file, not a copy of the first coordinate
    torch.testing.assert_close(all_rows(dm, "val"), torch.from_numpy(rows()[dm._sets["val"].x[:, 0].long().numpy()]))
    assert all_rows(dm, "train").shape == (40, 3)  # 5 full batches of 8, drop_last


def test_labels_from_the_npz_or_a_separate_file_stay_with_their_rows(tmp_path):
    x = rows()
    y = np.arange(50) % 3
    np.savez(tmp_path / "d.npz", x=x, labels=y)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    for dm in (VectorData(str(tmp_path / "d.npz"), batch_size=5),
               VectorData(str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"), batch_size=5)):
        assert dm.num_classes == 3
        for split in ("train", "val"):
            ds = dm._sets[split]
            assert torch.equal(ds.label, ds.x[:, 0].long() % 3)
    unlabelled = VectorData(str(tmp_path / "d.npz"), use_labels=False, batch_size=5)
    assert unlabelled.num_classes is None and (unlabelled._sets["train"].label == 0).all()


def test_a_separate_validation_file(tmp_path):
    np.save(tmp_path / "train.npy", rows(40))
    np.save(tmp_path / "val.npy", rows(7))
    dm = VectorData(str(tmp_path / "train.npy"), val_path=str(tmp_path / "val.npy"), batch_size=4)
    assert len(dm._sets["train"]) == 40 and len(dm._sets["val"]) == 7
    assert dm.reference_batch(100).shape == (7, 3)


@pytest.mark.parametrize("make, kwargs, match", [
    (lambda p: p.write_bytes(b"not an array at all"), {}, "cannot read .* as .npy or .npz"),
    (lambda p: np.save(p, np.zeros((4, 3, 2))), {}, r"shape \(4, 3, 2\); VectorData needs \(N, D\) rows"),
    (lambda p: np.save(p, np.zeros(5)), {}, r"shape \(5,\)"),
    (lambda p: np.save(p, rows()), {"dim": 2}, "3-dimensional rows; the model expects dim = 2"),
    (lambda p: np.save(p, np.full((5, 2), np.nan)), {}, "NaN or infinite"),
    (lambda p: np.save(p, np.array([["a", "b"]] * 5)), {}, "numbers are needed"),
    (lambda p: None, {}, "does not exist"),
])
def test_bad_array_files_give_one_line_errors(tmp_path, make, kwargs, match):
    path = tmp_path / "x.npy"
    make(path)
    with pytest.raises(ConfigError, match=match) as err:
        VectorData(str(path), batch_size=1, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("labels, match", [
    (np.arange(49), r"labels of shape \(49,\) for 50 data items"),
    (np.zeros((50, 2)), r"labels of shape \(50, 2\)"),
    (np.linspace(0, 1, 50), "labels must be integers"),
    (-np.ones(50, dtype=int), "labels must be >= 0"),
])
def test_labels_of_the_wrong_length_or_kind_give_one_line_errors(tmp_path, labels, match):
    np.savez(tmp_path / "d.npz", x=rows(), labels=labels)
    with pytest.raises(ConfigError, match=match) as err:
        VectorData(str(tmp_path / "d.npz"), batch_size=1)
    assert "\n" not in str(err.value)


def test_npz_without_the_named_array_names_its_keys(tmp_path):
    np.savez(tmp_path / "d.npz", points=rows())
    assert VectorData(str(tmp_path / "d.npz"), batch_size=1).data_shape == (3,)
    with pytest.raises(ConfigError, match=r"no data array 'feats' \(keys \['points'\]\); name it with data_key"):
        VectorData(str(tmp_path / "d.npz"), data_key="feats", batch_size=1)


def test_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=rows(20, 2), labels=np.arange(19))
    code = main(["fit", "--config", "configs/points/teacher.yaml", "--data.init_args.path", str(tmp_path / "d.npz"),
                 "--data.init_args.use_labels", "true", "--trainer.max_steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("ayf: error:") and "labels of shape (19,) for 20 data items" in err
    assert len(err.splitlines()) == 1, err


@pytest.mark.parametrize("name", list(DATASETS))
def test_ayf_points_writes_a_standardised_set_that_vector_data_reads(tmp_path, name):
    out = tmp_path / f"{name}.npz"
    assert main(["points", name, "--output", str(out), "--n", "600"]) == 0
    dm = VectorData(str(out), dim=2, batch_size=16)
    x = torch.cat([dm._sets["train"].x, dm._sets["val"].x])
    assert x.shape == (600, 2)
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert (dm.num_classes == 2) == (name in ("moons", "circles"))
    # the same seed writes the same set; another seed another one
    a, _ = make_points(name, 100, seed=1)
    b, _ = make_points(name, 100, seed=1)
    c, _ = make_points(name, 100, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ayf_points_refuses_to_overwrite_and_unknown_sets(tmp_path, capsys):
    out = tmp_path / "m.npz"
    assert main(["points", "moons", "--output", str(out), "--n", "10"]) == 0
    assert main(["points", "moons", "--output", str(out), "--n", "10"]) != 0
    assert "exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="moons, circles, swiss_roll"):
        make_points("spirals", 10)
