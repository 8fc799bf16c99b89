"""TimePairSampler draws the pairs that docs/maths.md §5 states: logit-normal t, s uniform below
it, and the shares of t = 1, s = 0 and s = t."""
import math

import pytest
import torch

from ayf.math.times import TimePairSampler

N = 200_000


def draw(sampler=TimePairSampler, **kw):
    return sampler(**kw)(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def logit_normal_cdf(x, mean, std):
    z = (torch.logit(x) - mean) / std
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def ks(samples, cdf):
    """Kolmogorov-Smirnov distance of samples from a CDF."""
    x, _ = torch.sort(samples)
    emp = torch.arange(1, len(x) + 1, dtype=x.dtype) / len(x)
    return (emp - cdf(x)).abs().max().item()


KS_TOL = 0.01  # about 4.5x the 1% critical value at N = 200k; a wrong law misses by far more


def test_pairs_are_ordered_in_the_unit_interval():
    t, s = draw(p_diagonal=0.2)
    assert ((0 <= s) & (s <= t) & (t <= 1)).all()


def test_shares_of_t_one_s_zero_and_diagonal():
    t, s = draw(p_t_one=0.3, p_s_zero=0.2, p_diagonal=0.1)
    # t = 1 is kept unless the diagonal share moves s onto it; s = 0 unless the diagonal share does
    assert (t == 1).double().mean().item() == pytest.approx(0.3, abs=0.005)
    assert (s == 0).double().mean().item() == pytest.approx(0.2 * 0.9, abs=0.005)
    assert (s == t).double().mean().item() == pytest.approx(0.1, abs=0.005)


def test_uniform_s_draws_logit_normal_t_and_uniform_s_below_it():
    t, s = TimePairSampler(p_mean=-0.8, p_std=1.6, p_t_one=0, p_s_zero=0)(N, generator=torch.Generator().manual_seed(1),
                                                                           dtype=torch.float64)
    assert ks(t, lambda x: logit_normal_cdf(x, -0.8, 1.6)) < KS_TOL
    assert ks(s / t, lambda x: x) < KS_TOL


@pytest.mark.parametrize("bad, match", [(dict(p_t_one=1.5), "p_t_one"), (dict(p_std=0.0), "p_std")])
def test_bad_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        TimePairSampler(**bad)
