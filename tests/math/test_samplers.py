import pytest
import torch

from ayf.math import (
    GaussianOracle,
    MixtureOracle,
    check_grid,
    sample_consistency,
    sample_euler,
    sample_flow_map,
    sample_heun,
    time_grid,
)

C = 0.5


@pytest.mark.parametrize("steps", list(range(1, 17)))
def test_every_sampler_recovers_gaussian_from_exact_map(gen, steps):
    oracle = GaussianOracle(std=C, dim=1)
    noise = torch.randn(100_000, 1, generator=gen, dtype=torch.float64)
    grid = time_grid(steps)
    exact = oracle.flow_map(noise, torch.ones(len(noise), dtype=torch.float64), torch.zeros(len(noise), dtype=torch.float64))
    det = sample_flow_map(oracle.average_velocity, noise, grid)
    torch.testing.assert_close(det, exact)  # deterministic: the exact ODE solution itself
    for name, out in {
        "gamma=0.5": sample_flow_map(oracle.average_velocity, noise, grid, gamma=0.5, generator=gen),
        "gamma=1": sample_flow_map(oracle.average_velocity, noise, grid, gamma=1.0, generator=gen),
        "consistency": sample_consistency(oracle.average_velocity, noise, grid, generator=gen),
    }.items():
        # 100k samples: std error of the sample std is ~0.5 / sqrt(2e5) ~ 1e-3
        assert abs(out.std().item() - C) < 5e-3, (name, out.std().item())
        assert abs(out.mean().item()) < 5e-3, (name, out.mean().item())


def _order(solver, oracle, noise, n):
    exact = oracle.flow_map(noise, torch.ones(len(noise), dtype=torch.float64),
                            torch.zeros(len(noise), dtype=torch.float64))
    errs = [(solver(oracle.velocity, noise, time_grid(k)) - exact).norm(dim=1).mean().item()
            for k in (n, 2 * n)]
    return errs[0] / errs[1]


@pytest.mark.parametrize("oracle", [
    GaussianOracle(std=C, dim=2),
    MixtureOracle([[-1.0, 0.0], [1.0, 0.5]], [0.4, 0.5], [0.6, 0.4]),
])
def test_euler_and_heun_orders(gen, oracle):
    noise = torch.randn(256, 2, generator=gen, dtype=torch.float64)
    assert 1.8 < _order(sample_euler, oracle, noise, 64) < 2.2
    assert 3.6 < _order(sample_heun, oracle, noise, 64) < 4.4


def test_grid_validation():
    g = time_grid(4)
    assert g[0] == 1 and g[-1] == 0 and (g[1:] < g[:-1]).all()
    with pytest.raises(ValueError, match="s > t"):
        check_grid([1.0, 0.3, 0.5, 0.0])
    with pytest.raises(ValueError, match="lie in"):
        check_grid([1.5, 0.0])
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(0)
