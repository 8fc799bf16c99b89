import torch

from ayf.math import GaussianOracle, MixtureOracle, two_jump_velocity

MIX = dict(
    means=[[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]],
    stds=[0.3, 0.2, 0.4],
    weights=[0.5, 0.3, 0.2],
)


def test_single_component_mixture_matches_gaussian_closed_form(gen):
    g = GaussianOracle(std=0.5, mean=[0.3, -0.2], dim=2)
    m = MixtureOracle([[0.3, -0.2]], [0.5], [1.0])
    x = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(64, generator=gen, dtype=torch.float64)
    s = t * torch.rand(64, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(m.velocity(x, t), g.velocity(x, t))
    torch.testing.assert_close(m.log_prob(x, t), g.log_prob(x, t))
    # RK4 solve against the affine closed form
    torch.testing.assert_close(m.flow_map(x, t, s, steps=64), g.flow_map(x, t, s), atol=1e-9, rtol=0)


def test_mixture_velocity_solves_continuity_equation(gen):
    """d/dt p_t + div(p_t v) = 0, checked by float64 central differences of the exact density."""
    m = MixtureOracle(**MIX)
    x = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(32, generator=gen, dtype=torch.float64)
    h = 1e-4
    p = lambda x_, t_: m.log_prob(x_, t_).exp()  # noqa: E731
    dp_dt = (p(x, t + h) - p(x, t - h)) / (2 * h)
    div = torch.zeros_like(dp_dt)
    for d in range(2):
        e = torch.zeros_like(x)
        e[:, d] = h
        flux = lambda x_: p(x_, t)[:, None] * m.velocity(x_, t)  # noqa: E731
        div += (flux(x + e)[:, d] - flux(x - e)[:, d]) / (2 * h)
    torch.testing.assert_close(dp_dt, -div, atol=1e-6, rtol=1e-5)


def test_flow_map_identity_and_semigroup(gen):
    m = MixtureOracle(**MIX)
    g = GaussianOracle(std=0.5, dim=2)
    x = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    t = torch.full((16,), 0.9, dtype=torch.float64)
    u = torch.full((16,), 0.5, dtype=torch.float64)
    s = torch.full((16,), 0.1, dtype=torch.float64)
    for oracle in (m, g):
        torch.testing.assert_close(oracle.flow_map(x, t, t), x)
        two = oracle.flow_map(oracle.flow_map(x, t, u), u, s)
        torch.testing.assert_close(two, oracle.flow_map(x, t, s), atol=1e-8, rtol=0)


def test_mixture_samples_match_density(gen):
    m = MixtureOracle(**MIX)
    x = m.sample(20000, generator=gen)
    # the sample mean of log p equals minus the entropy; compare with importance estimate
    # from a broad Gaussian proposal (independent of the sampler)
    q = GaussianOracle(std=3.0, dim=2)
    y = q.sample(200000, generator=gen)
    w = (m.log_prob(y) - q.log_prob(y)).exp()
    neg_entropy_is = (w * m.log_prob(y)).mean() / w.mean()
    assert abs(m.log_prob(x).mean() - neg_entropy_is) < 0.05


def test_two_jump_velocity_equals_the_one_jump_on_exact_maps_only(gen):
    """The exact flow map is a semigroup, so its two jumps through the midpoint average to its
    one-jump velocity (docs/maths.md §12); an Euler map (F = v for every s) is not."""
    x = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    t = 0.2 + 0.8 * torch.rand(32, generator=gen, dtype=torch.float64)
    s = t * torch.rand(32, generator=gen, dtype=torch.float64) * 0.8
    for oracle in (GaussianOracle(std=0.5, dim=2), MixtureOracle(**MIX)):
        exact = oracle.average_velocity(x, t, s)
        torch.testing.assert_close(two_jump_velocity(oracle.average_velocity, x, t, s), exact, atol=1e-7, rtol=0)

        def euler(x_, t_, s_, cond=None, oracle=oracle):
            return oracle.velocity(x_, t_)

        assert (two_jump_velocity(euler, x, t, s) - euler(x, t, s)).norm(dim=1).max() > 1e-2
