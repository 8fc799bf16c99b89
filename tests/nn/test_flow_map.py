import pytest
import torch
from torch.func import jvp

from ayf.errors import ConfigError
from ayf.nn import MLP, FlowMap


def make(s_embedding="t_minus_s", seed=0, **kw):
    torch.manual_seed(seed)
    return FlowMap(MLP(3, width=32, depth=2, emb_dim=16), s_embedding=s_embedding, **kw).double()


def test_student_from_teacher_matches_teacher_velocity_for_every_s(gen):
    teacher = make("none", seed=1)
    student = make("t_minus_s", guidance=True)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    t = torch.rand(16, generator=gen, dtype=torch.float64)
    s = t * torch.rand(16, generator=gen, dtype=torch.float64)
    assert not torch.allclose(student(x, t, s), teacher.velocity(x, t))  # different random init
    student.init_from_teacher(teacher)
    for ss in (s, torch.zeros_like(s), t):
        torch.testing.assert_close(student(x, t, ss, guidance=2.5), teacher.velocity(x, t))
    # the flow map itself: f(x, t, t) = x
    torch.testing.assert_close(student.flow(x, t, t), x)


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
