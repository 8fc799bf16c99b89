"""The EMA callback: its warm-up decay, EDM2's power-function EMA, resume, and the EMA weights in
validation and sampling."""
import logging
import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ayf.callbacks import EMA
from ayf.callbacks.ema import power_gamma, sampling_weights


class Module(nn.Module):
    """What EMA needs of a task: a ``net``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(1, 1, bias=False).double()


def set_weight(module, value):
    with torch.no_grad():
        module.net.weight.fill_(value)


def profile_sigma_rel(gamma):
    """The standard deviation of tau / t under p(tau) ∝ tau^gamma on [0, t]: E[u^2] - E[u]^2."""
    return math.sqrt((gamma + 1) / (gamma + 3) - ((gamma + 1) / (gamma + 2)) ** 2)


def run_ema(ema, values, stride=1):
    """Feeds net weights ``values[k - 1]`` at optimiser steps ``stride * k``; returns the EMA."""
    module = Module()
    for k, value in enumerate(values, start=1):
        set_weight(module, value)
        ema.on_train_batch_end(SimpleNamespace(global_step=stride * k), module, None, None, k)
    return ema.ema.weight.item()


def test_warmup_decay_follows_min_decay_and_k_formula():
    module, ema = Module(), EMA(decay=0.9)
    values = [3.0, -1.0, 2.0, 5.0, 0.5, 4.0, -2.0, 1.0, 7.0, 0.0, 2.5, 3.5] * 3
    expected = None
    for k, value in enumerate(values):
        set_weight(module, value)
        ema.on_train_batch_end(SimpleNamespace(global_step=k), module, None, None, k)
        d = min(0.9, (1 + k) / (10 + k))
        expected = value if expected is None else d * expected + (1 - d) * value
        assert abs(ema.ema.weight.item() - expected) < 1e-12  # lerp rounds differently from the formula
    assert ema.decay_at(0) == 0.1 and ema.decay_at(80) == 0.9  # (1 + k) / (10 + k) passes 0.9 at k = 80
    assert EMA().decay == 0.999 and EMA().sigma_rel is None


def test_a_continued_ema_uses_the_full_decay():
    module, ema = Module(), EMA(decay=0.9)
    set_weight(module, 1.0)
    module.initial_ema = {"weight": torch.full((1, 1), 10.0, dtype=torch.float64)}
    ema.on_train_batch_end(SimpleNamespace(global_step=0), module, None, None, 0)
    assert ema.continued and abs(ema.ema.weight.item() - (0.9 * 10.0 + 0.1 * 1.0)) < 1e-12


@pytest.mark.parametrize("sigma_rel", [1e-3, 0.01, 0.05, 0.1, 0.2, 0.28, 0.2886])
def test_power_gamma_is_the_positive_root_of_the_sigma_rel_formula(sigma_rel):
    gamma = power_gamma(sigma_rel)
    assert gamma > 0
    assert abs(profile_sigma_rel(gamma) - sigma_rel) < 1e-12
    assert abs(math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) - sigma_rel) < 1e-12
    # the largest real root of the cubic, found numerically (companion-matrix eigenvalues)
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    assert gamma == pytest.approx(roots.real.max(), rel=1e-9)


def test_power_gamma_of_edm2s_two_profiles():
    assert power_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)  # the narrow one: a high power
    assert power_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)
    assert power_gamma(math.sqrt(1 / 12) - 1e-12) == pytest.approx(0.0, abs=1e-9)  # a flat average at the bound


@pytest.mark.parametrize("kw, match", [
    (dict(sigma_rel=0.0), r"sigma_rel must lie in \(0, sqrt\(1/12\)"),
    (dict(sigma_rel=-0.05), r"sigma_rel must lie in \(0, sqrt\(1/12\)"),
    (dict(sigma_rel=math.sqrt(1 / 12)), r"sigma_rel must lie in \(0, sqrt\(1/12\) = 0\.288675\), got 0\.2886"),
    (dict(sigma_rel=0.29), r"sigma_rel must lie in"),
    (dict(sigma_rel=float("nan")), r"sigma_rel must lie in"),
    (dict(decay=0.999, sigma_rel=0.05), r"^EMA takes decay or sigma_rel, not both"),
    (dict(decay=1.0), r"decay must lie in \[0, 1\)"),
])
def test_bad_arguments_are_one_line_value_errors(kw, match):
    with pytest.raises(ValueError, match=match) as err:
        EMA(**kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1])
@pytest.mark.parametrize("stride", [1, 2])  # 2: the two optimiser steps of each adversarial iteration
def test_power_ema_is_the_discrete_power_function_average(sigma_rel, stride):
    ema = EMA(sigma_rel=sigma_rel)
    gamma = ema.gamma
    K = 60
    values = [k + 0.3 * math.sin(k) for k in range(1, K + 1)]
    # the recursion unrolled: step k enters with (1 - beta_k), then every later step keeps beta_j
    beta = [None] + [(1 - 1 / j) ** (gamma + 1) for j in range(1, K + 1)]
    weights = [(1 - beta[k]) * math.prod(beta[k + 1:]) for k in range(1, K + 1)]
    # ... which telescopes into the continuous profile (gamma + 1) tau^gamma / K^(gamma + 1) over (k - 1, k]
    for k, w in enumerate(weights, start=1):
        assert w == pytest.approx((k / K) ** (gamma + 1) - ((k - 1) / K) ** (gamma + 1), rel=1e-9, abs=1e-300)
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)
    expected = math.fsum(w * v for w, v in zip(weights, values, strict=True))
    assert run_ema(ema, values, stride) == pytest.approx(expected, rel=1e-12)
    assert ema.step == stride * K
    assert run_ema(EMA(sigma_rel=sigma_rel), [2.5] * 20, stride) == 2.5  # the average of a constant


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1])
def test_power_ema_has_the_relative_width_it_was_given(sigma_rel):
    # w_k = k / K and (k / K)^2 give the first two moments of the weights the EMA put on the steps
    K = 2000
    mean = run_ema(EMA(sigma_rel=sigma_rel), [k / K for k in range(1, K + 1)])
    square = run_ema(EMA(sigma_rel=sigma_rel), [(k / K) ** 2 for k in range(1, K + 1)])
    gamma = power_gamma(sigma_rel)
    assert mean == pytest.approx((gamma + 1) / (gamma + 2), rel=1e-3)  # the continuous profile's mean
    assert math.sqrt(square - mean ** 2) == pytest.approx(sigma_rel, rel=1e-2)


def test_power_ema_skips_batches_without_an_optimiser_step():
    # gradient accumulation: the net does not change between the batches of one optimiser step
    a, b = EMA(sigma_rel=0.1), EMA(sigma_rel=0.1)
    values = [3.0, -1.0, 2.0, 5.0, 0.5, 4.0]
    module = Module()
    for k, value in enumerate(values, start=1):
        set_weight(module, value)
        for _ in range(3):
            a.on_train_batch_end(SimpleNamespace(global_step=k), module, None, None, 0)
    assert a.ema.weight.item() == pytest.approx(run_ema(b, values), rel=1e-14)


def test_a_continued_power_ema_restarts_its_profile_on_this_run():
    module, ema = Module(), EMA(sigma_rel=0.1)
    set_weight(module, 1.0)
    module.initial_ema = {"weight": torch.full((1, 1), 10.0, dtype=torch.float64)}
    trainer = SimpleNamespace(callbacks=[ema], global_step=0)
    ema.on_train_start(trainer, module)
    with sampling_weights(trainer, module):  # before the first step: the earlier run's average
        assert module.net.weight.item() == 10.0
    ema.on_train_batch_end(SimpleNamespace(global_step=1), module, None, None, 0)
    assert ema.continued and ema.ema.weight.item() == 1.0
    set_weight(module, 3.0)
    ema.on_train_batch_end(SimpleNamespace(global_step=2), module, None, None, 1)
    beta = 0.5 ** (ema.gamma + 1)
    assert ema.ema.weight.item() == pytest.approx(beta * 1.0 + (1 - beta) * 3.0, rel=1e-14)


def test_an_older_checkpoint_loads_as_the_classic_ema(caplog):
    old = {"decay": 0.9, "continued": False, "ema": {"weight": torch.full((1, 1), 4.0, dtype=torch.float64)}}
    module = Module()
    set_weight(module, 1.0)
    with caplog.at_level(logging.WARNING, logger="ayf.callbacks"):
        classic = EMA(decay=0.9)
        classic.load_state_dict(dict(old))
        assert caplog.text == ""
        power = EMA(sigma_rel=0.1)
        power.load_state_dict(dict(old))
    assert "the checkpoint's EMA is the classic EMA; its average continues as the power-function EMA" in caplog.text
    for ema in (classic, power):
        ema.on_train_start(SimpleNamespace(global_step=5), module)  # the step the run resumes from
        ema.on_train_batch_end(SimpleNamespace(global_step=6), module, None, None, 0)
    d = min(0.9, 7 / 16)  # the classic warm-up at step 6
    assert classic.ema.weight.item() == pytest.approx(d * 4.0 + (1 - d) * 1.0, rel=1e-14)
    beta = (5 / 6) ** (power.gamma + 1)  # the loaded average counts as that of the first 5 steps
    assert power.ema.weight.item() == pytest.approx(beta * 4.0 + (1 - beta) * 1.0, rel=1e-14)
    assert power.state_dict()["sigma_rel"] == 0.1 and power.state_dict()["step"] == 6


class Tiny(L.LightningModule):
    """A net pulled towards a target that moves with the optimiser step, whatever the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(2, 2).double()

    def training_step(self, batch, batch_idx):
        target = torch.tensor([math.sin(self.global_step), math.cos(0.5 * self.global_step)], dtype=torch.float64)
        return ((self.net(torch.ones(1, 2, dtype=torch.float64)) - target) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.2, momentum=0.9)


def fit(tmp_path, steps, ema, callbacks=(), ckpt_path=None):
    data = DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=1)
    module = Tiny()
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
              callbacks=[ema, *callbacks], enable_checkpointing=bool(callbacks), enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0).fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
    return module, ema


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`", "ignore:You're resuming from a checkpoint")
@pytest.mark.parametrize("kw", [dict(sigma_rel=0.05), dict(decay=0.9)])
def test_a_resumed_run_has_the_ema_of_an_uninterrupted_one(tmp_path, kw):
    whole, whole_ema = fit(tmp_path / "whole", 8, EMA(**kw))
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    fit(tmp_path / "half", 4, EMA(**kw), [ckpt_cb])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4 and saved["callbacks"]["EMA"]["step"] == 4
    assert saved["callbacks"]["EMA"]["sigma_rel"] == kw.get("sigma_rel")
    resumed, resumed_ema = fit(tmp_path / "resumed", 8, EMA(**kw), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed_ema.step == whole_ema.step == 8
    for k, v in whole.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[k], v)
    # a uniform average would differ: the EMA is not that of the trained weights alone
    assert not torch.equal(whole_ema.ema.weight, whole.net.weight)
    for k, v in whole_ema.ema.state_dict().items():
        torch.testing.assert_close(resumed_ema.ema.state_dict()[k], v, rtol=1e-14, atol=1e-14)


def test_validation_and_sampling_run_on_the_ema_weights_and_restore_the_trained_ones():
    module, ema = Module(), EMA(decay=0.5)
    set_weight(module, 4.0)
    ema.on_train_batch_end(SimpleNamespace(global_step=0), module, None, None, 0)  # ema = 4
    set_weight(module, 8.0)  # training moved on; the EMA did not see it
    trainer = SimpleNamespace(callbacks=[ema])
    x = torch.ones(1, 1, dtype=torch.float64)
    with sampling_weights(trainer, module):
        assert module.net(x).item() == 4.0 and not module.training
    assert module.net.weight.item() == 8.0 and module.training
    ema.on_validation_start(trainer, module)
    assert module.net.weight.item() == 4.0
    checkpoint = {"state_dict": {"net.weight": module.net.weight.detach().clone()}}
    ema.on_save_checkpoint(trainer, module, checkpoint)  # a checkpoint written during validation
    assert checkpoint["state_dict"]["net.weight"].item() == 8.0
    ema.on_validation_end(trainer, module)
    assert module.net.weight.item() == 8.0
