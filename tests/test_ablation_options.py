"""The options that moved out of ayf into benchmarks/ablation_options.py still do what the
ablation tables of docs/results/ablation.md say they do: the (t, s) proposals draw their laws,
the weightings scale each example, and the two-jump target can go to random examples."""
import os
import sys

import pytest
import torch

from ayf.nn import MLP, Cond, FlowMap, NetTeacher
from ayf.objectives import EMD, Batch
from tests.math.test_times import KS_TOL, N, ks, logit_normal_cdf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from ablation_options import (  # noqa: E402
    GapEMD,
    IntervalSampler,
    InvGapEMD,
    LongGapSampler,
    RandomPickEMD,
    SortedSampler,
)


def draw(sampler, **kw):
    return sampler(**kw)(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("sampler", [SortedSampler, IntervalSampler, LongGapSampler])
def test_proposals_keep_pairs_ordered_and_the_shares(sampler):
    t, s = draw(sampler, p_t_one=0.3, p_s_zero=0.2, p_diagonal=0.1)
    assert ((0 <= s) & (s <= t) & (t <= 1)).all()
    assert (t == 1).double().mean().item() == pytest.approx(0.3, abs=0.005)
    assert (s == t).double().mean().item() == pytest.approx(0.1, abs=0.005)


def test_sorted_is_the_max_and_min_of_two_logit_normals():
    t, s = draw(SortedSampler, p_mean=-0.4, p_std=1.2, p_t_one=0, p_s_zero=0)
    cdf = lambda x: logit_normal_cdf(x, -0.4, 1.2)  # noqa: E731
    assert ks(t, lambda x: cdf(x) ** 2) < KS_TOL
    assert ks(s, lambda x: 1 - (1 - cdf(x)) ** 2) < KS_TOL


def test_interval_draws_a_logit_normal_gap_at_a_uniform_position():
    t, s = draw(IntervalSampler, gap_mean=0.5, gap_std=0.8, p_t_one=0, p_s_zero=0)
    gap = t - s
    assert ks(gap, lambda x: logit_normal_cdf(x, 0.5, 0.8)) < KS_TOL
    assert ks(s / (1 - gap), lambda x: x) < KS_TOL


def test_long_gap_adds_its_share_of_uniform_long_gaps():
    from ayf.math.times import TimePairSampler

    base_t, base_s = draw(TimePairSampler, p_t_one=0, p_s_zero=0)
    t, s = draw(LongGapSampler, p_long=0.4, p_t_one=0, p_s_zero=0)
    long_base = (base_t - base_s >= 0.5).double().mean().item()
    assert (t - s >= 0.5).double().mean().item() == pytest.approx(0.4 + 0.6 * long_base, abs=0.005)
    # the added gaps are uniform on [1/2, 1]: 40% of the pairs spread evenly over [0.75, 1] and [0.5, 0.75]
    assert (t - s >= 0.75).double().mean().item() == pytest.approx(
        0.2 + 0.6 * (base_t - base_s >= 0.75).double().mean().item(), abs=0.005)


@pytest.mark.parametrize("kind, weight", [(GapEMD, lambda gap: gap), (InvGapEMD, lambda gap: 1 / (gap + 0.05))])
def test_weightings_scale_each_example_by_their_function_of_the_gap(gen, kind, weight):
    t = torch.rand(64, generator=gen, dtype=torch.float64)
    s = t * torch.rand(64, generator=gen, dtype=torch.float64)
    F, g = torch.randn(64, 2, generator=gen, dtype=torch.float64), torch.randn(64, 2, generator=gen, dtype=torch.float64)
    plain = EMD().regression(F, g, t, s)
    torch.testing.assert_close(kind().regression(F, g, t, s), plain * weight(t - s), rtol=1e-12, atol=0)


def test_random_pick_takes_the_first_examples_and_the_default_the_longest_jumps():
    t = torch.tensor([0.9, 0.2, 0.8, 0.5])
    s = torch.tensor([0.1, 0.1, 0.0, 0.4])
    assert RandomPickEMD().two_jump_examples(t, s, 2).tolist() == [0, 1]
    assert sorted(EMD().two_jump_examples(t, s, 2).tolist()) == [0, 2]


def test_the_subclasses_train_through_the_objective(gen):
    teacher = NetTeacher(FlowMap(MLP(2, 16, 2, 8), s_embedding="none"))
    student = FlowMap(MLP(2, 16, 2, 8))
    for objective in (GapEMD(), InvGapEMD(), RandomPickEMD(semigroup=0.5)):
        objective.bind(teacher)
        per, _ = objective(student, Batch(torch.randn(16, 2, generator=gen), Cond()))
        assert per.shape == (16,) and torch.isfinite(per).all()
