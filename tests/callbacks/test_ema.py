"""The EMA callback: its warm-up decay, and the EMA weights in validation and sampling."""
from types import SimpleNamespace

import torch
from torch import nn

from ayf.callbacks import EMA
from ayf.callbacks.ema import sampling_weights


class Module(nn.Module):
    """What EMA needs of a task: a ``net``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(1, 1, bias=False).double()


def set_weight(module, value):
    with torch.no_grad():
        module.net.weight.fill_(value)


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


def test_a_continued_ema_uses_the_full_decay():
    module, ema = Module(), EMA(decay=0.9)
    set_weight(module, 1.0)
    module.initial_ema = {"weight": torch.full((1, 1), 10.0, dtype=torch.float64)}
    ema.on_train_batch_end(SimpleNamespace(global_step=0), module, None, None, 0)
    assert ema.continued and abs(ema.ema.weight.item() - (0.9 * 10.0 + 0.1 * 1.0)) < 1e-12


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
