import pytest
import torch
from torch.func import jvp

from ayf.errors import ConfigError
from ayf.nn import MLP, Cond, FlowMap


def make(s_embedding="t_minus_s", seed=0, **kw):
    torch.manual_seed(seed)
    return FlowMap(MLP(3, width=32, depth=2, emb_dim=16), s_embedding=s_embedding, **kw).double()


def test_student_from_teacher_matches_teacher_velocity_for_every_s(gen):
    teacher = make("none", seed=1)
    student = make("t_minus_s", guidance_input=True)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(16, generator=gen, dtype=torch.float64)
    s = t * torch.rand(16, generator=gen, dtype=torch.float64)
    assert not torch.allclose(student(x, t, s), teacher.velocity(x, t))  # different random init
    student.init_from_teacher(teacher)
    for ss in (s, torch.zeros_like(s), t):
        torch.testing.assert_close(student(x, t, ss, Cond.build(16, lam=2.5, dtype=torch.float64)), teacher.velocity(x, t))
    # the flow map itself: f(x, t, t) = x
    torch.testing.assert_close(student.flow(x, t, t), x)


def perturbed(net, gen, scale=0.1):
    """``net`` with every weight moved, as training moves them: the zero-initialised s and lam
    branches now contribute, so an input that the forward pass drops shows up."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def test_trained_student_uses_s_lam_and_label(gen):
    net = perturbed(make("t_minus_s", num_classes=3, guidance_input=True), gen)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    t = 0.2 + 0.8 * torch.rand(16, generator=gen, dtype=torch.float64)
    s = t * torch.rand(16, generator=gen, dtype=torch.float64)
    label = torch.randint(3, (16,), generator=gen)
    cond = Cond.build(16, label=label, lam=1.5, dtype=torch.float64)
    F = net(x, t, s, cond)

    def moved(other):
        return (other - F).flatten(1).norm(dim=1).min().item()

    assert moved(net(x, t, t * 0.3, cond)) > 1e-4, "F ignores s"
    assert moved(net(x, t, s, cond.with_(lam=torch.full_like(t, 3.0)))) > 1e-4, "F ignores lam"
    assert moved(net(x, t, s, cond.with_(label=(label + 1) % 3))) > 1e-4, "F ignores the label"
    assert moved(net(x, t, s, cond.unconditional())) > 1e-4, "F ignores the null label"


def test_default_s_is_the_velocity_after_training(gen):
    net = perturbed(make("t_minus_s"), gen)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(net(x, t), net.velocity(x, t))
    assert not torch.allclose(net(x, t), net(x, t, torch.zeros_like(t)))


def test_init_from_teacher_rejects_other_architecture():
    teacher = FlowMap(MLP(3, width=64, depth=2, emb_dim=16), s_embedding="none")
    with pytest.raises(ConfigError, match="architectures differ"):
        make().init_from_teacher(teacher)


@pytest.mark.parametrize("s_embedding", ["t_minus_s", "s"])
def test_backbone_jvp_matches_central_difference(gen, s_embedding):
    net = make(s_embedding)
    for p in net.parameters():  # leave the zero-initialised branches non-trivial
        p.data.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(8, generator=gen, dtype=torch.float64)
    s = t * torch.rand(8, generator=gen, dtype=torch.float64)
    dx, dt, ds = torch.randn_like(x), torch.randn_like(t), torch.randn_like(s)
    with torch.no_grad():
        _, dF = jvp(net, (x, t, s), (dx, dt, ds))
        h = 1e-6
        fd = (net(x + h * dx, t + h * dt, s + h * ds) - net(x - h * dx, t - h * dt, s - h * ds)) / (2 * h)
    torch.testing.assert_close(dF, fd, atol=1e-7, rtol=1e-5)


def test_bad_options_raise_one_line_errors():
    with pytest.raises(ConfigError, match="s_embedding"):
        FlowMap(MLP(2), s_embedding="log_sigma")
    with pytest.raises(ConfigError, match="label"):
        FlowMap(MLP(2), num_classes=3)(torch.zeros(2, 2), torch.ones(2), torch.zeros(2))
