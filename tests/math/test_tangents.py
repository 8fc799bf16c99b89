import pytest
import torch

from ayf.math import (
    GaussianOracle,
    MixtureOracle,
    emd_tangent,
    flow_map_loss,
    flow_matching_loss,
    jvp_average_velocity,
    lmd_tangent,
    normalize_tangent,
    warmup_ratio,
)

C = 0.5


def _batch(gen, n=256, dim=2):
    x0 = C * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    t = 0.02 + 0.98 * torch.rand(n, generator=gen, dtype=torch.float64)
    s = t * torch.rand(n, generator=gen, dtype=torch.float64)
    s[:8] = t[:8]  # include the flow-matching diagonal
    s[8:16] = 0.0  # and the consistency end
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    return x_t, t, s


def _tangents(oracle, F_fn, x, t, s):
    v = oracle.velocity(x, t)
    _, g_emd = emd_tangent(F_fn, x, t, s, v, r=1.0)
    _, g_lmd = lmd_tangent(F_fn, oracle.velocity, x, t, s)
    return g_emd, g_lmd


def test_tangents_vanish_at_exact_gaussian_map(gen):
    oracle = GaussianOracle(std=C, dim=2)
    x, t, s = _batch(gen)
    g_emd, g_lmd = _tangents(oracle, oracle.average_velocity, x, t, s)
    assert g_emd.abs().max() < 1e-5
    assert g_lmd.abs().max() < 1e-5


def test_tangents_vanish_at_exact_mixture_map(gen):
    oracle = MixtureOracle([[-1.0, 0.0], [1.0, 0.5]], [0.3, 0.4], [0.6, 0.4])
    x, t, s = _batch(gen, n=64)
    t = t.clamp(min=0.05)
    F_fn = lambda a, b, c, cond=None: oracle.average_velocity(a, b, c, steps=200)  # noqa: E731
    g_emd, g_lmd = _tangents(oracle, F_fn, x, t, s)
    assert g_emd.abs().max() < 1e-5
    assert g_lmd.abs().max() < 1e-5


def test_tangents_nonzero_for_perturbed_map(gen):
    oracle = GaussianOracle(std=C, dim=2)
    x, t, s = _batch(gen)
    F_fn = lambda a, b, c, cond=None: oracle.average_velocity(a, b, c) + 0.05 * torch.tanh(a) * (1 + b)[:, None]  # noqa: E731
    g_emd, g_lmd = _tangents(oracle, F_fn, x, t, s)
    assert g_emd.flatten(1).norm(dim=1).mean() > 1e-2
    assert g_lmd.flatten(1).norm(dim=1).mean() > 1e-2


class Perturbed(torch.nn.Module):
    """Exact Gaussian map plus a learnable error ``a * x + b * (t - s)``."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle
        self.a = torch.nn.Parameter(torch.tensor([0.2, -0.1], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor([0.1, 0.3], dtype=torch.float64))

    def forward(self, x, t, s, cond=None):
        return self.oracle.average_velocity(x, t, s) + self.a * x + self.b * (t - s)[:, None]


@pytest.mark.parametrize("objective", ["emd", "lmd"])
@pytest.mark.parametrize("weighting", ["none", "f_space"])
def test_descent_step_moves_toward_exact_map(gen, objective, weighting):
    oracle = GaussianOracle(std=C, dim=2)
    model = Perturbed(oracle)
    x, t, s = _batch(gen, n=512)

    def error():
        with torch.no_grad():
            return (model(x, t, s) - oracle.average_velocity(x, t, s)).pow(2).mean().item()

    before = error()
    if objective == "emd":
        F, g = emd_tangent(model, x, t, s, oracle.velocity(x, t), r=1.0)
    else:
        F, g = lmd_tangent(model, oracle.velocity, x, t, s)
    loss = flow_map_loss(F, normalize_tangent(g, 0.1), t, s, weighting).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= (0.05 if weighting == "none" else 1.0) * p.grad
    after = error()
    assert after < 0.97 * before, (before, after)


@pytest.mark.parametrize("weighting, weight", [("none", lambda gap: torch.ones_like(gap)),
                                               ("f_space", lambda gap: gap ** 2)])
def test_weightings_scale_each_example_by_their_function_of_the_gap(gen, weighting, weight):
    x, t, s = _batch(gen, n=64)
    F, g = torch.randn(64, 2, generator=gen, dtype=torch.float64), torch.randn(64, 2, generator=gen, dtype=torch.float64)
    plain = g.pow(2).mean(dim=1)  # the loss value is ||g||^2 / D
    torch.testing.assert_close(flow_map_loss(F, g, t, s, weighting), plain * weight(t - s), rtol=1e-12, atol=0)


def test_jvp_matches_central_difference(gen):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2)).double()
    F_fn = lambda x, t, s, cond=None: net(torch.cat([x, t[:, None], (t - s)[:, None]], 1)) * (1 + t[:, None])  # noqa: E731
    x, t, s = _batch(gen, n=32)
    dx = torch.randn_like(x)
    dt, ds = torch.randn_like(t), torch.randn_like(s)
    F, dF = jvp_average_velocity(F_fn, x, t, s, dx, dt, ds)
    h = 1e-6
    with torch.no_grad():
        fd = (F_fn(x + h * dx, t + h * dt, s + h * ds) - F_fn(x - h * dx, t - h * dt, s - h * ds)) / (2 * h)
        torch.testing.assert_close(F, F_fn(x, t, s))
    torch.testing.assert_close(dF, fd, atol=1e-8, rtol=1e-6)


def test_emd_gradient_equals_flow_matching_gradient_on_diagonal(gen):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()
    F_fn = lambda x, t, s, cond=None: net(torch.cat([x, t[:, None], (t - s)[:, None]], 1))  # noqa: E731
    oracle = GaussianOracle(std=C, dim=2)
    x, t, _ = _batch(gen, n=64)
    v = oracle.velocity(x, t)

    def grads(loss):
        net.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in net.parameters()]

    F, g = emd_tangent(F_fn, x, t, t, v, r=0.7)
    g_emd = grads(flow_map_loss(F, g, t, t).mean())
    g_fm = grads(flow_matching_loss(F_fn(x, t, t), v).mean())
    for a, b in zip(g_emd, g_fm, strict=True):
        torch.testing.assert_close(a, b)
    assert any(a.abs().max() > 1e-6 for a in g_fm)


def test_normalize_tangent():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    out = normalize_tangent(g, 0.1)
    torch.testing.assert_close(out[0], g[0] / 5.1)
    assert out[1].abs().sum() == 0
    torch.testing.assert_close(normalize_tangent(g, 0.0), g)


def test_warmup_never_exceeds_cap():
    values = [warmup_ratio(k, 1000) for k in range(0, 100_000, 7)]
    assert max(values) == pytest.approx(0.99)
    assert warmup_ratio(500, 1000) == pytest.approx(0.5)
    assert warmup_ratio(10**12, 10) <= 0.99
    assert warmup_ratio(5, 0) == pytest.approx(0.99)
    with pytest.raises(ValueError):
        warmup_ratio(1, 10, r_max=1.0)


def test_jvp_runs_in_float32_inside_bf16_autocast_unless_told_otherwise():
    """jvp_float32 (the objectives' default) keeps the tangent at float32 accuracy inside a
    bfloat16 autocast region; without it the tangent carries bf16's error."""
    from ayf.math.tangents import emd_tangent, lmd_tangent
    from ayf.nn import MLP, FlowMap

    torch.manual_seed(0)
    net = FlowMap(MLP(2, 64, 2, 32), s_embedding="t_minus_s")
    x, v = torch.randn(256, 2), torch.randn(256, 2)
    t = torch.rand(256) * 0.9 + 0.05
    s = t * torch.rand(256)
    teacher = lambda x, t, cond=None: torch.cos(x) * t[:, None]  # noqa: E731

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    with torch.no_grad():
        for name, tangent in (("emd", lambda **kw: emd_tangent(net, x, t, s, v, r=0.7, **kw)),
                              ("lmd", lambda **kw: lmd_tangent(net, teacher, x, t, s, **kw))):
            _, ref = tangent()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, exact = tangent(jvp_float32=True)
                _, rough = tangent(jvp_float32=False)
            assert rel(exact, ref) < 1e-2 * rel(rough, ref), name
            assert rel(rough, ref) > 1e-3, name
