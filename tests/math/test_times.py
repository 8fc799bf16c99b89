"""The (t, s) proposals of TimePairSampler draw the distributions that docs/maths.md §5 states."""
import math

import pytest
import torch

from ayf.math.times import PROPOSALS, TimePairSampler

N = 200_000


def draw(**kw):
    return TimePairSampler(**kw)(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def logit_normal_cdf(x, mean, std):
    z = (torch.logit(x) - mean) / std
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def ks(samples, cdf):
    """Kolmogorov-Smirnov distance of samples from a CDF."""
    x, _ = torch.sort(samples)
    emp = torch.arange(1, len(x) + 1, dtype=x.dtype) / len(x)
    return (emp - cdf(x)).abs().max().item()


KS_TOL = 0.01  # about 4.5x the 1% critical value at N = 200k; a wrong law misses by far more


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_pairs_are_ordered_in_the_unit_interval(proposal):
    t, s = draw(proposal=proposal, p_diagonal=0.2)
    assert ((0 <= s) & (s <= t) & (t <= 1)).all()


@pytest.mark.parametrize("proposal", PROPOSALS)
def test_shares_of_t_one_s_zero_and_diagonal(proposal):
    t, s = draw(proposal=proposal, p_t_one=0.3, p_s_zero=0.2, p_diagonal=0.1)
    # t = 1 is kept unless the diagonal share moves s onto it; s = 0 unless the diagonal share does
    assert (t == 1).double().mean().item() == pytest.approx(0.3, abs=0.005)
    assert (s == 0).double().mean().item() == pytest.approx(0.2 * 0.9, abs=0.005)
    assert (s == t).double().mean().item() == pytest.approx(0.1, abs=0.005)


def test_uniform_s_draws_logit_normal_t_and_uniform_s_below_it():
    t, s = TimePairSampler(p_mean=-0.8, p_std=1.6, p_t_one=0, p_s_zero=0)(N, generator=torch.Generator().manual_seed(1),
                                                                           dtype=torch.float64)
    assert ks(t, lambda x: logit_normal_cdf(x, -0.8, 1.6)) < KS_TOL
    assert ks(s / t, lambda x: x) < KS_TOL


def test_sorted_is_the_max_and_min_of_two_logit_normals():
    t, s = draw(proposal="sorted", p_mean=-0.4, p_std=1.2, p_t_one=0, p_s_zero=0)
    cdf = lambda x: logit_normal_cdf(x, -0.4, 1.2)  # noqa: E731
    assert ks(t, lambda x: cdf(x) ** 2) < KS_TOL
    assert ks(s, lambda x: 1 - (1 - cdf(x)) ** 2) < KS_TOL


def test_interval_draws_a_logit_normal_gap_at_a_uniform_position():
    t, s = draw(proposal="interval", gap_mean=0.5, gap_std=0.8, p_t_one=0, p_s_zero=0)
    gap = t - s
    assert ks(gap, lambda x: logit_normal_cdf(x, 0.5, 0.8)) < KS_TOL
    assert ks(s / (1 - gap), lambda x: x) < KS_TOL


def test_long_gap_adds_its_share_of_uniform_long_gaps():
    base_t, base_s = draw(p_t_one=0, p_s_zero=0)
    t, s = draw(proposal="long_gap", p_long=0.4, p_t_one=0, p_s_zero=0)
    long_base = (base_t - base_s >= 0.5).double().mean().item()
    assert (t - s >= 0.5).double().mean().item() == pytest.approx(0.4 + 0.6 * long_base, abs=0.005)
    # the added gaps are uniform on [1/2, 1]: 40% of the pairs spread evenly over [0.75, 1] and [0.5, 0.75]
    assert (t - s >= 0.75).double().mean().item() == pytest.approx(
        0.2 + 0.6 * (base_t - base_s >= 0.75).double().mean().item(), abs=0.005)


@pytest.mark.parametrize("bad, match", [(dict(proposal="beta"), "uniform_s, sorted, interval, long_gap"),
                                        (dict(p_long=1.5), "p_long"), (dict(gap_std=0.0), "gap_std")])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        TimePairSampler(**bad)
