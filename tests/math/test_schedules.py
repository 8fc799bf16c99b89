"""ayf.math.schedules against references written here independently (numpy, diffusers' formulas)."""
import math

import numpy as np
import pytest
import torch

from ayf.math.schedules import (
    BETA_SCHEDULES,
    PREDICTIONS,
    VPSchedule,
    denoised_to_velocity,
    edm_point,
    flow_native_time,
    flow_to_velocity,
    rescale_zero_terminal_snr,
    vp_alpha_bar_of_t,
    vp_alphas_cumprod,
    vp_betas,
    vp_coefficients,
    vp_x0_eps,
)

SCHEDULE_CASES = [(kind, zero) for kind in BETA_SCHEDULES for zero in (False, True)]


# ---- references (numpy, float64), after diffusers' DDPMScheduler.__init__, betas_for_alpha_bar
# ---- and rescale_zero_terminal_snr; EulerDiscreteScheduler._sigma_to_t for the timestep


def np_betas(kind, n=1000, b0=0.0001, b1=0.02):
    if kind == "linear":
        return np.linspace(b0, b1, n)
    if kind == "scaled_linear":
        return np.linspace(b0**0.5, b1**0.5, n) ** 2
    ab = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - ab((i + 1) / n) / ab(i / n), 0.999) for i in range(n)])


def np_zero_snr(betas):
    s = np.sqrt(np.cumprod(1 - betas))
    s0, sT = s[0], s[-1]
    s = (s - sT) * s0 / (s0 - sT)
    ab = s**2
    return 1 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])


def np_alphas_cumprod(kind, zero_snr=False, **kw):
    betas = np_betas(kind, **kw)
    return np.cumprod(1 - (np_zero_snr(betas) if zero_snr else betas))


def np_sigma_to_timestep(sigma, log_sigmas):
    """diffusers' EulerDiscreteScheduler._sigma_to_t (numpy, any sigma > 0)."""
    log_sigma = np.log(sigma)
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


# ---- schedules


@pytest.mark.parametrize("kind,zero_snr", SCHEDULE_CASES)
def test_alphas_cumprod_match_diffusers_formulas(kind, zero_snr):
    ours = vp_alphas_cumprod(kind, 1000, 0.0001, 0.02, rescale_betas_zero_snr=zero_snr)
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    np.testing.assert_allclose(ours.numpy(), np_alphas_cumprod(kind, zero_snr), rtol=1e-12, atol=1e-15)
    # another N and beta range (Stable Diffusion's scaled_linear)
    ours = vp_alphas_cumprod(kind, 37, 0.00085, 0.012, rescale_betas_zero_snr=zero_snr)
    np.testing.assert_allclose(ours.numpy(), np_alphas_cumprod(kind, zero_snr, n=37, b0=0.00085, b1=0.012),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind,zero_snr", SCHEDULE_CASES)
def test_alphas_cumprod_match_installed_diffusers(kind, zero_snr):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind,
                                  rescale_betas_zero_snr=zero_snr).alphas_cumprod.double()
    ours = vp_alphas_cumprod(kind, rescale_betas_zero_snr=zero_snr)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)  # diffusers computes in float32


def test_zero_terminal_snr_rescale_is_alg1():
    for kind in BETA_SCHEDULES:
        betas = vp_betas(kind)
        old = torch.cumprod(1 - betas, 0).sqrt()
        new = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0).sqrt()
        assert new[-1] == 0
        torch.testing.assert_close(new[0], old[0], rtol=1e-14, atol=0)
        # an affine map of the old sqrt(alpha_bar)
        slope = (new[0] - new[-1]) / (old[0] - old[-1])
        torch.testing.assert_close(new, new[-1] + slope * (old - old[-1]), rtol=0, atol=1e-14)


# ---- timesteps


@pytest.mark.parametrize("kind,zero_snr", SCHEDULE_CASES)
def test_round_trip_t_timestep_alpha_bar(kind, zero_snr):
    sched = VPSchedule(vp_alphas_cumprod(kind, rescale_betas_zero_snr=zero_snr))
    lo, hi = sched.t_range()
    t = torch.cat([torch.linspace(lo, hi, 4001, dtype=torch.float64), torch.tensor([lo, hi], dtype=torch.float64)])
    tau = sched.timestep_of_t(t)
    assert tau.min() >= 0 and tau.max() <= 999
    torch.testing.assert_close(sched.alpha_bar_of_timestep(tau), vp_alpha_bar_of_t(t), rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.t_of_timestep(tau), t, rtol=0, atol=1e-12)
    # integer timesteps: the schedule's own alpha_bar, and back to the same integer
    steps = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sched.alpha_bar_of_timestep(steps), sched.alphas_cumprod, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(sched.timestep_of_t(sched.t_of_timestep(steps)), steps, rtol=0, atol=1e-9)
    assert tau[-2].item() == pytest.approx(0, abs=1e-9) and tau[-1].item() == pytest.approx(999, abs=1e-9)


@pytest.mark.parametrize("kind,zero_snr", SCHEDULE_CASES)
def test_timestep_is_diffusers_log_sigma_interpolation(kind, zero_snr):
    ac = np_alphas_cumprod(kind, zero_snr)
    sched = VPSchedule(torch.from_numpy(ac))
    finite = ac[:-1] if zero_snr else ac
    log_sigmas = np.log(np.sqrt((1 - finite) / finite))
    sigma = np.exp(np.linspace(log_sigmas[0], log_sigmas[-1], 2001))
    t = sigma / (1 + sigma)
    ours = sched.timestep_of_t(torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(ours, np_sigma_to_timestep(sigma, log_sigmas), rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours, np.interp(np.log(sigma), log_sigmas, np.arange(len(log_sigmas))),
                               rtol=0, atol=1e-9)
    # outside the schedule: clamped to the end timesteps
    edge = sched.timestep_of_t(torch.tensor([0.0, t[0] / 2], dtype=torch.float64))
    assert edge.tolist() == [0.0, 0.0]
    if not zero_snr:
        assert sched.timestep_of_t(torch.tensor([1.0, (1 + t[-1]) / 2], dtype=torch.float64)).tolist() == [999, 999]


def test_zero_snr_last_segment_is_linear_in_t():
    ac = np_alphas_cumprod("scaled_linear", zero_snr=True)
    sched = VPSchedule(torch.from_numpy(ac))
    assert sched.zero_snr and ac[-1] == 0
    sigma_998 = np.sqrt((1 - ac[998]) / ac[998])
    t998 = sigma_998 / (1 + sigma_998)
    t = np.linspace(t998, 1.0, 101)
    expected = 998 + (t - t998) / (1 - t998)
    np.testing.assert_allclose(sched.timestep_of_t(torch.from_numpy(t)).numpy(), expected, rtol=0, atol=1e-9)
    assert sched.timestep_of_t(torch.tensor([1.0], dtype=torch.float64)).item() == 999
    assert sched.alpha_bar_of_timestep(torch.tensor([999.0], dtype=torch.float64)).item() == 0
    assert sched.t_range() == (pytest.approx(sched.t_range(finite=True)[0]), 1.0)
    assert sched.t_range(finite=True)[1] == pytest.approx(t998, rel=1e-14)


def test_t_range_is_the_schedules_sigma_range():
    ac = np_alphas_cumprod("linear")
    sigma = np.sqrt((1 - ac) / ac)
    lo, hi = VPSchedule(torch.from_numpy(ac)).t_range()
    assert lo == pytest.approx(sigma[0] / (1 + sigma[0]), rel=1e-13)
    assert hi == pytest.approx(sigma[-1] / (1 + sigma[-1]), rel=1e-13)


# ---- parametrisations


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_vp_predictions_recover_x0_and_eps(gen, prediction):
    x0 = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    t = 0.01 + 0.98 * torch.rand(50, generator=gen, dtype=torch.float64)
    a, b, r = vp_coefficients(t)
    torch.testing.assert_close(a**2, vp_alpha_bar_of_t(t), rtol=1e-14, atol=0)
    torch.testing.assert_close(a**2 + b**2, torch.ones_like(t), rtol=1e-14, atol=0)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    x_vp = a[:, None] * x0 + b[:, None] * eps
    torch.testing.assert_close(x_t / r[:, None], x_vp, rtol=0, atol=1e-14)
    out = {"epsilon": eps, "sample": x0, "v_prediction": a[:, None] * eps - b[:, None] * x0}[prediction]
    x0_hat, eps_hat = vp_x0_eps(out, x_vp, a, b, prediction)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-12)


def test_edm_point_and_flow_conventions(gen):
    x0 = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(20, generator=gen, dtype=torch.float64)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    x_sigma, sigma = edm_point(x_t, t)
    torch.testing.assert_close(x_sigma, x0 + sigma[:, None] * eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(denoised_to_velocity(x0, x_t, t), eps - x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(flow_native_time(t, "data_at_one", 1000.0), 1000 * (1 - t))
    torch.testing.assert_close(flow_native_time(t, "flow_match_euler", 1000.0), 1000 * t)
    torch.testing.assert_close(flow_to_velocity(x0 - eps, "data_at_one"), eps - x0)
    torch.testing.assert_close(flow_to_velocity(eps - x0, "flow_match_euler"), eps - x0)


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="linear, scaled_linear, squaredcos_cap_v2"):
        vp_betas("sigmoid")
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample"):
        vp_x0_eps(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1), "x0")
    with pytest.raises(ValueError, match="data_at_one, flow_match_euler"):
        flow_native_time(torch.zeros(1), "rectified", 1.0)
    with pytest.raises(ValueError, match="integer >= 2"):
        vp_betas("linear", 1)
    with pytest.raises(ValueError, match="outside"):
        vp_betas("linear", 10, 0.0, 0.02)
    with pytest.raises(ValueError, match="decrease"):
        VPSchedule(torch.tensor([0.9, 0.95, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="only the last"):
        VPSchedule(torch.tensor([0.9, 0.0, 0.0], dtype=torch.float64))
