import math

import torch

from ayf.math import (
    adaptive_weighted_loss,
    frechet_distance,
    gaussian_w2,
    guided_velocity,
    mmd_rbf,
    r1_penalty,
    rpgan_discriminator_loss,
    rpgan_generator_loss,
)


def test_frechet_distance_closed_form_diagonal():
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([1.0, -1.0])
    s1, s2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.5])
    fd = frechet_distance(mu1.double(), torch.diag(s1**2).double(), mu2.double(), torch.diag(s2**2).double())
    expected = (mu1 - mu2).pow(2).sum() + (s1 - s2).pow(2).sum()
    assert abs(fd.item() - expected.item()) < 1e-10


def test_frechet_distance_rotated_covariance(gen):
    a = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(3, dtype=torch.float64)
    assert abs(frechet_distance(torch.zeros(3).double(), cov, torch.zeros(3).double(), cov).item()) < 1e-9
    # scaling a covariance by k^2: W2^2 = (k - 1)^2 tr(C)
    fd = frechet_distance(torch.zeros(3).double(), cov, torch.zeros(3).double(), 4 * cov)
    assert abs(fd.item() - torch.trace(cov).item()) < 1e-8


def test_gaussian_w2_and_mmd(gen):
    x = torch.randn(4000, 2, generator=gen)
    y = 1.5 * torch.randn(4000, 2, generator=gen)
    assert abs(gaussian_w2(x, y).item() - math.sqrt(2) * 0.5) < 0.05
    same = mmd_rbf(x[:2000], x[2000:])
    diff = mmd_rbf(x[:2000], y[:2000])
    assert abs(same.item()) < 3e-3 and diff.item() > 10 * abs(same.item())


def test_rpgan_equal_logits_is_log2_and_r1_of_linear_d():
    d = torch.randn(7)
    torch.testing.assert_close(rpgan_generator_loss(d, d), torch.full((7,), math.log(2)))
    torch.testing.assert_close(rpgan_discriminator_loss(d, d), torch.full((7,), math.log(2)))
    w = torch.tensor([0.5, -2.0, 1.0])
    x = torch.randn(5, 3, requires_grad=True)
    torch.testing.assert_close(r1_penalty(x @ w + 0.3, x), torch.full((5,), w.pow(2).sum().item()))


def test_adaptive_weight_optimum_is_minus_log_loss():
    per = torch.tensor([0.5, 2.0])
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.2)
    for _ in range(500):
        opt.zero_grad()
        adaptive_weighted_loss(per, w).sum().backward()
        opt.step()
    torch.testing.assert_close(w.detach(), -per.log(), atol=1e-4, rtol=0)


def test_guided_velocity():
    a, b = torch.randn(4, 2), torch.randn(4, 2)
    torch.testing.assert_close(guided_velocity(a, b, 1.0), a)
    lam = torch.tensor([1.0, 2.0, 0.0, 3.0])
    torch.testing.assert_close(guided_velocity(a, b, lam), lam[:, None] * a + (1 - lam[:, None]) * b)
