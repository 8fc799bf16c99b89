import math

import pytest
import torch

from ayf.errors import CheckpointError, ConfigError
from ayf.math.frechet import frechet_distance
from ayf.metrics import ClassifierFeatures, InceptionFeatures, fidelity_metrics, reference_features
from ayf.metrics.features import ClassifierNet
from ayf.metrics.fidelity import frechet_from_features


def test_fd_matches_closed_form_for_two_gaussians(gen):
    d, n = 4, 40000
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    cov2 = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + mu1
    y = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov2).T + mu2
    exact = frechet_distance(mu1, torch.eye(d, dtype=torch.float64), mu2, cov2).item()
    # closed form by hand for this case: ||mu||^2 + tr(I) + tr(C) - 2 tr(C^1/2)
    w = torch.linalg.eigvalsh(cov2)
    by_hand = (mu2.pow(2).sum() + d + w.sum() - 2 * w.sqrt().sum()).item()
    assert exact == pytest.approx(by_hand, rel=1e-10)
    assert frechet_from_features(x, y) == pytest.approx(exact, rel=0.03)
    assert abs(frechet_from_features(x[: n // 2], x[n // 2:])) < 0.01
    got = fidelity_metrics(x[:2000], y[:2000], kid_subset_size=500)
    same = fidelity_metrics(x[:2000], x[2000:4000], kid_subset_size=500)
    assert got["fd"] == pytest.approx(exact, rel=0.15) and abs(same["fd"]) < 0.05 and abs(same["kid"]) < 0.01
    assert got["kid"] > 10 * max(abs(same["kid"]), 1e-4)


def test_precision_recall_see_mode_dropping(gen):
    real = torch.cat([torch.randn(500, 2, generator=gen) + 4, torch.randn(500, 2, generator=gen) - 4])
    one_mode = torch.randn(1000, 2, generator=gen) + 4
    m = fidelity_metrics(one_mode, real, kid_subset_size=200)
    assert m["precision"] > 0.9 and 0.3 < m["recall"] < 0.6


def _random_inception_file(path, monkeypatch):
    """A weights file with the right keys and random values, made without any download."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(sd, path)
    monkeypatch.undo()
    return sd


def test_inception_loads_local_weights_file(tmp_path, monkeypatch):
    path = tmp_path / "inception.pth"
    sd = _random_inception_file(path, monkeypatch)
    ext = InceptionFeatures(weights_path=str(path))
    loaded = ext.net.state_dict()
    key = "Mixed_7c.branch_pool.conv.weight"
    assert torch.equal(loaded[key], sd[key])
    imgs = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    f = ext.extract(imgs)
    assert f.shape == (3, 2048) and torch.isfinite(f).all()
    assert torch.equal(f, ext.extract(imgs))
    assert ext.name.startswith("inception-")
    # the hub-cache location is used when no path is given
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="ayf does not download"):
        InceptionFeatures()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth").write_bytes(path.read_bytes())
    assert InceptionFeatures().name == ext.name
    (tmp_path / "bad.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read Inception weights"):
        InceptionFeatures(weights_path=str(tmp_path / "bad.pth"))


def classifier_file(path):
    """A small classifier saved as `ayf features fit` saves it; returns the net and its loaded extractor."""
    net = ClassifierNet(1, 3, width=4, feature_dim=6)
    torch.save({"kind": "ayf-classifier", "config": {"in_channels": 1, "num_classes": 3, "width": 4, "feature_dim": 6},
                "shape": [1, 8, 8], "state_dict": net.state_dict()}, path)
    return net, ClassifierFeatures(str(path))


def test_classifier_features_file_and_reference_cache(tmp_path):
    torch.manual_seed(0)
    net, ext = classifier_file(tmp_path / "f.pt")
    imgs = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(ext.extract(imgs), net.features(imgs))
    calls = []
    first = reference_features(ext, lambda: calls.append(1) or imgs, 5, tmp_path)
    again = reference_features(ext, lambda: calls.append(1) or imgs, 5, tmp_path)
    assert calls == [1] and torch.equal(first, again)
    assert (tmp_path / f"reference-{ext.name}-5.pt").is_file()
    with pytest.raises(ConfigError, match="trained on images"):
        ext(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an ayf classifier"):
        ClassifierFeatures(str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="not found.*ayf features fit"):
        ClassifierFeatures(str(tmp_path / "missing.pt"))
    assert math.isfinite(float(first.sum()))


@pytest.mark.gpu
def test_classifier_features_extract_on_cuda(tmp_path):
    """A loaded extractor lives on the CPU; extract(device="cuda") moves it to the images' device."""
    net, ext = classifier_file(tmp_path / "f.pt")
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    on_cpu = ext.extract(images, batch_size=4)
    on_gpu = ext.extract(images, batch_size=4, device="cuda")
    assert on_gpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu, on_cpu, atol=1e-3, rtol=1e-3)


def test_mode_recall_counts_each_modes_share_against_its_weight():
    from ayf.math.analytic import MixtureOracle
    from ayf.metrics.toy import mode_recall

    oracle = MixtureOracle(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64),
                           torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64),
                           torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    at = oracle.means

    def samples(counts, off=0.0):
        return torch.cat([at[k].expand(n, 2) + off for k, n in enumerate(counts)])

    torch.testing.assert_close(mode_recall(oracle, samples([50, 25, 25])), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(mode_recall(oracle, samples([50, 50, 0])), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(mode_recall(oracle, samples([25, 25, 50])), torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64))
    # 1.4 std away is inside radius 3; 2 std away from the mode (1.0) is outside radius 1.5
    torch.testing.assert_close(mode_recall(oracle, samples([50, 25, 25], off=0.7)), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(mode_recall(oracle, samples([50, 25, 25], off=1.0), radius=1.5), torch.zeros(3, dtype=torch.float64))


def test_an_output_file_of_an_earlier_test_is_refused_before_the_evaluation(tmp_path):
    from ayf.callbacks import FidelityMetrics

    earlier = tmp_path / "fid.json"
    earlier.write_text('{"mine": 1}')
    callback = FidelityMetrics(extractor=None, output=str(earlier))
    with pytest.raises(ConfigError, match="FidelityMetrics output .* exists"):
        callback.on_test_start(None, None)
    FidelityMetrics(extractor=None, output=str(tmp_path / "new.json")).on_test_start(None, None)
    assert earlier.read_text() == '{"mine": 1}'
