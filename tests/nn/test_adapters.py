"""Each adapter, given the exact model of its kind for Gaussian data (written here from the
closed form in the model's own time), returns the exact ayf velocity (GaussianOracle)."""
import numpy as np
import pytest
import torch

from ayf.errors import ConfigError
from ayf.math import GaussianOracle
from ayf.nn.adapters import DenoiserTeacher, FlowTeacher, VPTeacher
from ayf.nn.cond import Cond
from ayf.nn.teachers import Teacher
from tests.math.test_schedules import SCHEDULE_CASES, np_alphas_cumprod

C = 0.7
MEAN = [0.5, -1.0, 2.0]
ORACLE = GaussianOracle(std=C, mean=MEAN, dim=3)
MU = torch.tensor(MEAN, dtype=torch.float64)
TOL = dict(rtol=0, atol=1e-10)


class Recorder:
    """Wraps an exact model and records the native times and conditions it was called with."""

    def __init__(self, fn):
        self.fn, self.times, self.conds = fn, [], []

    def __call__(self, x, time, cond):
        self.times.append(time.clone())
        self.conds.append(cond)
        return self.fn(x, time)


def points(gen, lo, hi, n=64, extra=()):
    t = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    t = torch.cat([t, torch.tensor([lo, hi, *extra], dtype=torch.float64)])
    return MU + 2 * torch.randn(t.numel(), 3, generator=gen, dtype=torch.float64), t


def gaussian_posterior(x, a, b):
    """E[x0 | x] and E[eps | x] for x = a x0 + b eps, x0 ~ N(MU, C^2 I) (a, b: (B,))."""
    a, b = a[:, None], b[:, None]
    resid = x - a * MU
    var = a**2 * C**2 + b**2
    return MU + a * C**2 / var * resid, b / var * resid


# ---- EDM


def exact_denoiser(x, sigma):
    """D(x; sigma) = mu + c^2 / (c^2 + sigma^2) (x - mu)."""
    s2 = sigma[:, None] ** 2
    return MU + C**2 / (C**2 + s2) * (x - MU)


def test_denoiser_teacher_is_exact(gen):
    model = Recorder(exact_denoiser)
    teacher = DenoiserTeacher(model, data_shape=(3,))
    assert isinstance(teacher, Teacher) and teacher.data_shape == (3,)
    lo, hi = teacher.t_range
    assert lo == pytest.approx(0.002 / 1.002, rel=1e-15) and hi == pytest.approx(80 / 81, rel=1e-15)
    x, t = points(gen, lo, hi)
    torch.testing.assert_close(teacher(x, t), ORACLE.velocity(x, t), **TOL)
    torch.testing.assert_close(model.times[-1], t / (1 - t), rtol=1e-15, atol=0)


# ---- VP


def np_alpha_bar_of_timestep(tau, ac):
    """The test's own rule: log sigma linear between integer timesteps (np.interp); with zero
    terminal SNR, the last segment linear in t up to t = 1."""
    tau = np.asarray(tau, dtype=np.float64)
    zero = ac[-1] == 0
    finite = ac[:-1] if zero else ac
    log_sigmas = 0.5 * np.log((1 - finite) / finite)
    ab = 1 / (1 + np.exp(2 * np.interp(tau, np.arange(len(finite)), log_sigmas)))
    if zero:
        sigma = np.exp(log_sigmas[-1])
        t_last = sigma / (1 + sigma)
        t = t_last + np.clip(tau - (len(ac) - 2), 0, 1) * (1 - t_last)
        ab = np.where(tau > len(ac) - 2, (1 - t) ** 2 / ((1 - t) ** 2 + t**2), ab)
    return ab


def exact_vp_model(ac, prediction, integer=False):
    """The exact prediction at (x_vp, timestep) from alpha_bar of the timestep it receives."""

    def model(x, timestep):
        tau = timestep.numpy()
        if integer:
            idx = np.rint(tau).astype(int)
            assert np.abs(tau - idx).max() < 1e-9, "not an integer timestep"
            ab = ac[idx]
        else:
            ab = np_alpha_bar_of_timestep(tau, ac)
        a, b = torch.from_numpy(np.sqrt(ab)), torch.from_numpy(np.sqrt(1 - ab))
        x0, eps = gaussian_posterior(x, a, b)
        return {"epsilon": eps, "sample": x0, "v_prediction": a[:, None] * eps - b[:, None] * x0}[prediction]

    return model


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("kind,zero_snr", SCHEDULE_CASES)
def test_vp_teacher_is_exact(gen, kind, zero_snr, prediction):
    ac = np_alphas_cumprod(kind, zero_snr)
    teacher = VPTeacher(Recorder(exact_vp_model(ac, prediction)), prediction=prediction, beta_schedule=kind,
                        rescale_betas_zero_snr=zero_snr)
    lo, hi = teacher.t_range
    x, t = points(gen, lo, hi)
    torch.testing.assert_close(teacher(x, t), ORACLE.velocity(x, t), **TOL)
    taus = teacher.model.times[-1]
    assert taus.dtype == torch.float64 and taus.min() >= 0 and taus.max() <= 999
    # at the schedule's own integer timesteps, with the schedule's alpha_bar_i
    finite = ac[:-1] if zero_snr else ac
    sigma = np.sqrt((1 - finite) / finite)
    t_int = torch.from_numpy(sigma / (1 + sigma))[::7]
    x_int = torch.randn(t_int.numel(), 3, generator=gen, dtype=torch.float64) + MU
    if zero_snr and prediction != "epsilon":
        t_int = torch.cat([t_int, torch.ones(1, dtype=torch.float64)])  # t = 1: timestep 999, alpha_bar = 0
        x_int = torch.cat([x_int, torch.randn(1, 3, generator=gen, dtype=torch.float64)])
    integer = VPTeacher(Recorder(exact_vp_model(ac, prediction, integer=True)), prediction=prediction, beta_schedule=kind,
                        rescale_betas_zero_snr=zero_snr)
    torch.testing.assert_close(integer(x_int, t_int), ORACLE.velocity(x_int, t_int), **TOL)


def test_vp_teacher_other_schedule_arguments(gen):
    ac = np_alphas_cumprod("scaled_linear", n=500, b0=0.00085, b1=0.012)
    teacher = VPTeacher(Recorder(exact_vp_model(ac, "v_prediction")), prediction="v_prediction", beta_schedule="scaled_linear",
                        num_train_timesteps=500, beta_start=0.00085, beta_end=0.012)
    x, t = points(gen, *teacher.t_range)
    torch.testing.assert_close(teacher(x, t), ORACLE.velocity(x, t), **TOL)


def test_vp_zero_snr_ranges():
    eps = VPTeacher(lambda x, tau, c: x, prediction="epsilon", rescale_betas_zero_snr=True, out_of_range="error")
    v = VPTeacher(lambda x, tau, c: x, prediction="v_prediction", rescale_betas_zero_snr=True, out_of_range="error")
    ac = np_alphas_cumprod("linear", zero_snr=True)
    sigma_998 = np.sqrt((1 - ac[998]) / ac[998])
    assert v.t_range[1] == 1.0
    assert eps.t_range[1] == pytest.approx(sigma_998 / (1 + sigma_998), rel=1e-14)
    assert eps.t_range[0] == v.t_range[0]
    one = torch.ones(1, dtype=torch.float64)
    v(torch.zeros(1, 3, dtype=torch.float64), one)
    with pytest.raises(ConfigError, match="outside its valid range"):
        eps(torch.zeros(1, 3, dtype=torch.float64), one)


def test_from_scheduler_config():
    config = {  # a diffusers DDPMScheduler config, with keys that concern sampling only
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.30.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "steps_offset": 1,
        "timestep_spacing": "trailing", "trained_betas": None, "variance_type": "fixed_small",
    }
    teacher = VPTeacher.from_scheduler_config(lambda x, tau, c: x, config)
    assert teacher.prediction == "v_prediction" and teacher.t_range[1] == 1.0
    ref = np_alphas_cumprod("scaled_linear", zero_snr=True, b0=0.00085, b1=0.012)
    np.testing.assert_allclose(teacher.alphas_cumprod.numpy(), ref, rtol=1e-12, atol=1e-15)
    assert VPTeacher.from_scheduler_config(lambda x, tau, c: x, config, prediction="sample").prediction == "sample"
    errors = [
        (dict(config, beta_schedule="sigmoid"), "linear, scaled_linear, squaredcos_cap_v2"),
        (dict(config, prediction_type="flow"), "epsilon, v_prediction, sample"),
        (dict(config, trained_betas=[0.1, 0.2]), "trained_betas"),
        (dict(config, timestep_type="continuous"), "discrete"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "FlowTeacher"),
    ]
    for bad, match in errors:
        with pytest.raises(ConfigError, match=match) as err:
            VPTeacher.from_scheduler_config(lambda x, tau, c: x, bad)
        assert "\n" not in str(err.value)


# ---- flows


def exact_data_at_one(scale):
    """u(x, s) = E[x0 - eps | x] for x = s x0 + (1 - s) eps, called with time = scale * s."""

    def model(x, time):
        s = (time / scale)[:, None]
        var = s**2 * C**2 + (1 - s) ** 2
        return MU + (2 * s * C**2 - 2 * (1 - s)) / (2 * var) * (x - s * MU)

    return model


def exact_flow_match_euler(scale):
    """noise - x0 for x = (1 - sigma) x0 + sigma noise, called with timestep = scale * sigma."""

    def model(x, timestep):
        sigma = (timestep / scale)[:, None]
        var = (1 - sigma) ** 2 * C**2 + sigma**2
        return -MU + (2 * sigma - 2 * (1 - sigma) * C**2) / (2 * var) * (x - (1 - sigma) * MU)

    return model


@pytest.mark.parametrize("convention,scale,native", [
    ("data_at_one", None, 1.0), ("data_at_one", 1000.0, 1000.0),
    ("flow_match_euler", None, 1000.0), ("flow_match_euler", 1.0, 1.0),
])
def test_flow_teacher_is_exact(gen, convention, scale, native):
    exact = exact_data_at_one(native) if convention == "data_at_one" else exact_flow_match_euler(native)
    model = Recorder(exact)
    teacher = FlowTeacher(model, convention=convention, timestep_scale=scale)
    assert teacher.t_range == (0.0, 1.0)
    x, t = points(gen, 0.0, 1.0)
    torch.testing.assert_close(teacher(x, t), ORACLE.velocity(x, t), **TOL)
    expected = native * (1 - t) if convention == "data_at_one" else native * t
    torch.testing.assert_close(model.times[-1], expected, rtol=1e-15, atol=0)


# ---- shared behaviour: cond, dtype, range rules, bad input


def make_all(model_fn=lambda x, time, cond: x, **kw):
    return [DenoiserTeacher(model_fn, **kw), VPTeacher(model_fn, **kw), FlowTeacher(model_fn, t_range=(0.1, 0.9), **kw)]


def test_cond_is_passed_unchanged_and_float32_works():
    seen = []
    model = lambda x, time, cond: seen.append((time.dtype, cond)) or x  # noqa: E731
    cond = Cond.build(4, label=[1, 2, -1, 0])
    for teacher in make_all(model, num_classes=10, unconditional=True):
        assert teacher.num_classes == 10 and teacher.unconditional
        out = teacher(torch.randn(4, 3), torch.full((4,), 0.5), cond)
        assert out.dtype == torch.float32 and out.shape == (4, 3)
        assert seen[-1] == (torch.float32, cond) and seen[-1][1] is cond
        teacher(torch.randn(4, 3), torch.full((4,), 0.5))
        assert seen[-1][1] == Cond()


def test_clamp_evaluates_at_the_nearest_valid_t(gen):
    model = Recorder(exact_denoiser)
    teacher = DenoiserTeacher(model)
    lo, hi = teacher.t_range
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, lo / 2, hi + (1 - hi) / 2, 1.0], dtype=torch.float64)
    inside = torch.tensor([lo, lo, hi, hi], dtype=torch.float64)
    torch.testing.assert_close(teacher(x, t), ORACLE.velocity(x, inside), **TOL)
    torch.testing.assert_close(model.times[-1], torch.tensor([0.002, 0.002, 80.0, 80.0], dtype=torch.float64))
    assert torch.isfinite(teacher(x, t)).all()
    ac = np_alphas_cumprod("linear")
    vp = VPTeacher(Recorder(exact_vp_model(ac, "epsilon")))
    lo, hi = vp.t_range
    torch.testing.assert_close(vp(x, t), ORACLE.velocity(x, torch.tensor([lo, lo, hi, hi], dtype=torch.float64)), **TOL)
    torch.testing.assert_close(vp.model.times[-1], torch.tensor([0.0, 0.0, 999.0, 999.0], dtype=torch.float64),
                               rtol=0, atol=1e-9)


def test_error_names_range_and_offending_t():
    for teacher in make_all(out_of_range="error"):
        lo, hi = teacher.t_range
        x = torch.zeros(3, 3, dtype=torch.float64)
        teacher(x, torch.tensor([lo, (lo + hi) / 2, hi], dtype=torch.float64))  # the ends are valid
        for bad in (lo / 2, hi + (1 - hi) / 2):
            with pytest.raises(ConfigError) as err:
                teacher(x, torch.tensor([(lo + hi) / 2, bad, hi], dtype=torch.float64))
            msg = str(err.value)
            assert "\n" not in msg and f"t = {bad:.6g}" in msg and f"[{lo:.6g}, {hi:.6g}]" in msg, msg


def test_bad_input_is_a_one_line_config_error():
    model = lambda x, time, cond: x  # noqa: E731
    cases = [
        (lambda: DenoiserTeacher(model, out_of_range="wrap"), "clamp, data_mean, error"),
        (lambda: VPTeacher(model, out_of_range="ignore"), "clamp, data_mean, error"),
        (lambda: DenoiserTeacher(model, sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"),
        (lambda: VPTeacher(model, prediction="x0"), "epsilon, v_prediction, sample"),
        (lambda: VPTeacher(model, beta_schedule="laplace"), "linear, scaled_linear, squaredcos_cap_v2"),
        (lambda: VPTeacher(model, beta_start=-0.1), "outside"),
        (lambda: FlowTeacher(model, convention="rectified"), "data_at_one, flow_match_euler"),
        (lambda: FlowTeacher(model, t_range=(0.5, 0.2)), "t_min < t_max"),
        (lambda: FlowTeacher("not a model"), "callable"),
    ]
    for make, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            make()
        assert "\n" not in str(err.value)


def test_module_model_is_frozen_and_data_shape_binds():
    net = torch.nn.Linear(3, 3)
    teacher = FlowTeacher(lambda x, time, cond: net(x))
    assert teacher.data_shape is None
    teacher.bind_data(type("DM", (), {"data_shape": (3,)})())
    assert teacher.data_shape == (3,)
    wrapped = DenoiserTeacher(torch.nn.Module())
    assert not wrapped.model.training and not wrapped.training
    frozen = VPTeacher(net.train())
    assert not any(p.requires_grad for p in frozen.parameters()) and not net.training


# --- a score model (its output is an autograd gradient) and the high-noise rule ---------------------
CS = 0.5  # the data: N(0, CS^2 I) in 2-D, whose denoiser and flow are closed-form


def score_denoiser(x, sigma, cond=None):
    """``D = x + sigma^2 grad log p_sigma(x)`` with the gradient taken by autograd, as a score model
    does: ``log p_sigma(x) = -||x||^2 / (2 (CS^2 + sigma^2))``, so ``D = CS^2 x / (CS^2 + sigma^2)``."""
    x = x.detach().requires_grad_(True)
    s2 = (sigma.to(x.dtype) ** 2)[:, None]
    (grad,) = torch.autograd.grad((-(x ** 2) / (2 * (CS ** 2 + s2))).sum(), x)
    return x + s2 * grad


def test_a_teacher_that_differentiates_itself_runs_under_no_grad_when_it_says_so(gen):
    x = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(16, generator=gen, dtype=torch.float64)
    exact = GaussianOracle(std=CS, dim=2).velocity(x, t)
    teacher = DenoiserTeacher(score_denoiser, sigma_min=1e-3, sigma_max=100.0, needs_grad=True)
    for mode in torch.no_grad, torch.inference_mode:  # how the objectives, samplers, ayf test call a teacher
        with mode():
            v = teacher(x, t)
        torch.testing.assert_close(v, exact, rtol=1e-10, atol=1e-12)
        assert not v.requires_grad
    with torch.no_grad(), pytest.raises(RuntimeError):  # without the flag the model cannot take its gradient
        DenoiserTeacher(score_denoiser, sigma_min=1e-3, sigma_max=100.0)(x, t)


def edm_heun(denoiser, x, sigmas):
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1) in sigma units, from x at sigmas[0]."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = (x - denoiser(x, s.expand(len(x)))) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            x_next = x + (s_next - s) * (d + (x_next - denoiser(x_next, s_next.expand(len(x)))) / s_next) / 2
        x = x_next
    return x


def test_the_high_noise_rule_matches_edm_started_at_sigma_max(gen):
    """A VE denoiser valid up to sigma_max = 1 (t_max = 0.5), sampled by ayf from t = 1 under
    out_of_range data_mean, lands where EDM's Heun sampler started at sigma_max * noise lands, and
    where the exact flow of the Gaussian lands; clamping (the model at sigma_max on points noisier
    than that) follows another ODE and misses."""
    from ayf.math.samplers import sample_heun

    c = 1.0  # data N(0, c^2 I): at sigma_max the denoiser is far from the data mean

    def exact_denoiser_2d(x, sigma, cond=None):
        return c ** 2 * x / (c ** 2 + sigma.to(x.dtype)[:, None] ** 2)

    sigma_max = 1.0
    noise = torch.randn(256, 2, generator=gen, dtype=torch.float64)
    sigmas = torch.cat([torch.logspace(np.log10(sigma_max), -3, 513, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x_edm = edm_heun(exact_denoiser_2d, sigma_max * noise, sigmas)
    exact = sigma_max * noise * c / (c ** 2 + sigma_max ** 2) ** 0.5  # the flow from sigma_max to 0
    errors = {}
    for steps in (256, 512):  # ayf's own uniform grid from t = 1: one step straddles t_max
        grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        for rule in ("data_mean", "clamp"):
            teacher = DenoiserTeacher(exact_denoiser_2d, sigma_min=1e-3, sigma_max=sigma_max, out_of_range=rule)
            errors[rule, steps] = (sample_heun(teacher, noise, grid) - exact).norm(dim=1).max().item()
    assert (x_edm - exact).norm(dim=1).max() < 1e-4
    # first order in the step (the velocity jumps at t_max), to the same point as EDM started at sigma_max
    assert errors["data_mean", 512] < 5e-3 and errors["data_mean", 512] < 0.6 * errors["data_mean", 256], errors
    assert errors["clamp", 512] > 0.1, errors  # another ODE: more steps do not bring it closer
