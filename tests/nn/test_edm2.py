"""EDM2Net: EDM2's network as an ayf backbone, checked against NVlabs/edm2's own outputs
(tests/fixtures/edm2, made by edm2's training/networks_edm2.py) and against EDM's definition of
the velocity in ayf's time, ``v = (x_t - D(x_t / (1 - t); t / (1 - t))) / t``."""
import math
from pathlib import Path

import pytest
import torch

from ayf.checkpoints import CheckpointTeacher, build_network, student_config
from ayf.commands.convert import convert_edm2
from ayf.errors import ConfigError
from ayf.math.path import sigma_to_t, t_to_sigma
from ayf.math.tangents import jvp_average_velocity
from ayf.nn import Cond, FlowMap
from ayf.nn.edm2 import EDM2Net

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "edm2"
NAMES = ("tiny_cond", "tiny_uncond")


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: one thread is as fast, and stays fast while another process
    holds the second core (two OpenMP threads then slow every conv down many times)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fixture(name):
    return torch.load(FIXTURES / f"{name}.pt", map_location="cpu", weights_only=True)


def fixture_kwargs(fx, **kw):
    kwargs = {k: v for k, v in fx["init_kwargs"].items() if k != "use_fp16"}
    kwargs.update(kw)
    return kwargs


def fixture_net(name, **kw):
    fx = fixture(name)
    net = EDM2Net(**fixture_kwargs(fx, **kw))
    net.load_state_dict(fx["state_dict"])
    return net.eval(), fx


def rel_err(a, b):
    """Per-example relative error ``||a - b|| / ||b||``."""
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


def teacher_checkpoint(tmp_path, name="tiny_cond"):
    ckpt, _ = convert_edm2(str(FIXTURES / f"{name}.pt"))
    path = tmp_path / f"{name}.ckpt"
    torch.save(ckpt, path)
    return str(path)


# --- 1. EDM2's own outputs ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_denoiser_and_logvar_reproduce_edm2(name):
    net, fx = fixture_net(name)
    with torch.no_grad():
        D = net.denoise(fx["x"], fx["sigma"], fx["class_labels"])
        logvar = net.logvar(fx["sigma"])
    assert D.dtype == torch.float32
    assert rel_err(D, fx["D"]) <= 1e-5
    torch.testing.assert_close(logvar, fx["logvar"].flatten(), atol=1e-5, rtol=0)


# --- 2. the velocity is EDM's denoiser in ayf's time ------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_flow_map_velocity_is_edm_denoiser_in_ayf_time(name, gen):
    net, fx = fixture_net(name)
    model = FlowMap(net, s_embedding="none").double()
    t = torch.tensor([0.003, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.98], dtype=torch.float64)
    n = len(t)
    x0 = 0.5 * torch.randn(n, *model.data_shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, *model.data_shape, generator=gen, dtype=torch.float64)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    sigma = t_to_sigma(t)
    labels = [None] if not net.num_classes else [torch.tensor([0, 1, 2, 0, 1, 2, 1, 0]), torch.full((n,), -1)]
    with torch.no_grad():
        for label in labels:
            one_hot = None
            if label is not None:  # the null label (-1) is EDM2's zero one-hot
                one_hot = torch.nn.functional.one_hot(label.clamp(min=0), net.num_classes).double()
                one_hot = one_hot * (label >= 0).double().unsqueeze(1)
            v = model(x_t, t, cond=Cond(label=label))
            D = model.backbone.denoise(x_t / (1 - t.view(-1, 1, 1, 1)), sigma, one_hot)
            ref = (x_t - D) / t.view(-1, 1, 1, 1)
            assert v.dtype == torch.float64
            assert rel_err(v, ref) <= 1e-10, (label, rel_err(v, ref))
        if net.num_classes:  # the label matters, so the null-label case checks something
            assert rel_err(model(x_t, t, cond=Cond(label=labels[0])), model(x_t, t, cond=Cond(label=labels[1]))) > 1e-3


# --- 3. range rules -------------------------------------------------------------------------------
def test_clamp_keeps_the_ends_finite_and_the_embedding_at_the_range_end(gen):
    net, _ = fixture_net("tiny_cond")
    model = FlowMap(net, s_embedding="none")
    lo, hi = net.t_range
    assert lo == pytest.approx(sigma_to_t(torch.tensor(0.002, dtype=torch.float64)).item())
    assert hi == pytest.approx(80 / 81)
    x = torch.randn(2, *model.data_shape, generator=gen)
    with torch.no_grad():
        for t in (0.0, 1.0):
            v = model(x, torch.full((2,), t), cond=Cond(label=torch.tensor([0, 2])))
            assert torch.isfinite(v).all(), t
        beyond = net.time_embedding(torch.tensor([0.0, 1e-4, 0.999, 1.0]))
        ends = net.time_embedding(torch.tensor([lo, lo, hi, hi]))
        inside = net.time_embedding(torch.tensor([2 * lo, 0.5 * hi]))
    torch.testing.assert_close(beyond, ends, rtol=0, atol=1e-6)
    assert (inside - ends[[0, 2]]).abs().max() > 1e-2  # the embedding does vary with t inside the range


def test_out_of_range_error_names_the_range(gen):
    net, _ = fixture_net("tiny_cond", out_of_range="error")
    model = FlowMap(net, s_embedding="none")
    lo, hi = net.t_range
    x = torch.randn(2, *model.data_shape, generator=gen)
    cond = Cond(label=torch.tensor([0, 1]))
    with torch.no_grad():
        v = model(x, torch.tensor([lo, hi]), cond=cond)  # the range ends themselves are inside
        assert torch.isfinite(v).all()
        model(x, torch.tensor([0.01, 0.9]), cond=cond)
        for t in (1.0, 0.0):
            with pytest.raises(ConfigError) as info:
                model(x, torch.tensor([0.5, t]), cond=cond)
            msg = str(info.value)
            assert "\n" not in msg
            assert f"[{lo:.6g}, {hi:.6g}]" in msg and "sigma in [0.002, 80]" in msg, msg
            assert "clamp" in msg


# --- 4. a student of a converted teacher ---------------------------------------------------------
def make_student(tmp_path):
    teacher = CheckpointTeacher(teacher_checkpoint(tmp_path))
    student = build_network(student_config(teacher.net_config, guidance_input=True))
    with torch.no_grad():  # as a student that trained before: init_from_teacher must zero these branches
        for branch in (student.s_emb, student.guidance_emb):
            branch.mlp[-1].weight.normal_()
            branch.mlp[-1].bias.normal_()
    student.init_from_teacher(teacher.net)
    assert isinstance(student.backbone, EDM2Net) and student.s_emb is not None and student.guidance_emb is not None
    return student, teacher


def test_student_of_converted_teacher_starts_at_teacher_and_learns_s_and_lam(tmp_path, gen):
    student, teacher = make_student(tmp_path)
    n = 6
    x = torch.randn(n, *student.data_shape, generator=gen)
    t = 0.02 + 0.96 * torch.rand(n, generator=gen)
    label = torch.tensor([0, 1, 2, -1, 1, 0])
    with torch.no_grad():
        v = teacher(x, t, Cond(label=label))
        for _ in range(3):
            s = t * torch.rand(n, generator=gen)
            lam = 1 + 2 * torch.rand(n, generator=gen)
            torch.testing.assert_close(student(x, t, s, Cond(label=label, lam=lam)), v, rtol=1e-5, atol=1e-5)

    # at init the s and guidance branches are zero at their output but get gradients
    student.train()
    s = 0.3 * t
    lam = torch.full((n,), 2.5)
    loss = student(x, t, s, Cond(label=label, lam=lam)).square().mean()
    loss.backward()
    for branch in (student.s_emb, student.guidance_emb):
        grad = branch.mlp[-1].weight.grad
        assert grad is not None and grad.abs().max() > 1e-6

    # a few steps on a loss that wants F(x, t, s) to differ between s = 0 and s = t / 2 make F depend on s
    student.zero_grad()
    cond = Cond(label=label)
    opt = torch.optim.Adam(student.s_emb.parameters(), lr=1e-2)
    s_a, s_b = torch.zeros(n), 0.5 * t
    target = torch.randn(x.shape, generator=gen)  # the wanted F(x, t, s_a) - F(x, t, s_b)

    def gap():
        return student(x, t, s_a, cond) - student(x, t, s_b, cond)

    losses = []
    with torch.no_grad():
        assert gap().abs().max().item() == 0.0
    for _ in range(5):
        opt.zero_grad()
        loss = (gap() - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        F_a = student(x, t, s_a, cond)
        moved = gap().flatten(1).norm(dim=1) / F_a.flatten(1).norm(dim=1)
        assert losses[-1] < losses[0]
        assert moved.min() > 1e-2  # F(x, t, s) now depends on s, for every example


# --- 5. forward-mode derivatives through the student ----------------------------------------------
def test_student_jvp_matches_central_difference(tmp_path, gen):
    student, teacher = make_student(tmp_path)
    student = student.double()
    with torch.no_grad():  # s must matter: move the s and guidance branches away from zero
        for branch in (student.s_emb, student.guidance_emb):
            last = branch.mlp[-1]
            last.weight.copy_(0.3 * torch.randn(last.weight.shape, generator=gen, dtype=torch.float64))
            last.bias.copy_(0.3 * torch.randn(last.bias.shape, generator=gen, dtype=torch.float64))
    n = 4
    x = torch.randn(n, *student.data_shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    s = t * torch.tensor([0.0, 0.5, 0.2, 0.9], dtype=torch.float64)
    cond = Cond(label=torch.tensor([0, 2, -1, 1]), lam=torch.tensor([1.0, 2.0, 1.5, 3.0], dtype=torch.float64))
    with torch.no_grad():
        v = teacher.net.double()(x, t, cond=cond.with_(lam=None))

    def F_fn(a, b, c, cond=None):
        return student(a, b, c, cond)

    F, dF = jvp_average_velocity(F_fn, x, t, s, v, torch.ones_like(t), torch.zeros_like(s), cond)
    with torch.no_grad():
        assert rel_err(F_fn(x, t, 0.5 * s, cond), F_fn(x, t, s, cond)) > 1e-3  # s matters
        h = 1e-6
        fd = (F_fn(x + h * v, t + h, s, cond) - F_fn(x - h * v, t - h, s, cond)) / (2 * h)
    assert fd.abs().max() > 1e-2  # not vacuous
    assert rel_err(dF, fd) <= 1e-6
    torch.testing.assert_close(F, F_fn(x, t, s, cond))
    assert math.isfinite(dF.abs().max().item())
