"""The non-finite loss policy ``skip_nonfinite`` (stopping at the first, its default, is tested
in test_distillation.py)."""
import lightning as L
import pytest
import torch

from ayf.errors import ConfigError, NonFiniteLossError
from ayf.nn import MixtureTeacher
from ayf.tasks import FlowMapDistillation
from tests.tasks.test_distillation import MIX, data, student, trainer


def poison(task, bad_steps):
    """Makes the task's training loss NaN at the given global steps (the weights stay finite)."""
    forward = task.objective.forward

    def poisoned(net, batch, state=None):
        per, stats = forward(net, batch, state)
        if task.training and task.global_step in bad_steps:
            per = per * float("nan")
        return per, stats

    task.objective.forward = poisoned


class Snapshots(L.Callback):
    """The weights and the Adam step counters at the start of each step."""

    def __init__(self):
        self.weights, self.adam_steps = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.net.parameters()]
        state = trainer.optimizers[0].state
        first = next(pl_module.net.parameters())
        self.adam_steps[trainer.global_step] = float(state[first]["step"]) if first in state else 0.0


def test_skip_policy_leaves_the_weights_and_the_optimiser_untouched(tmp_path):
    task = FlowMapDistillation(student(), MixtureTeacher(MIX), skip_nonfinite=2)
    poison(task, {3, 4})
    snaps = Snapshots()
    trainer(tmp_path, steps=8, callbacks=[snaps]).fit(task, datamodule=data())
    assert task.guard.skipped == 2
    # steps 3 and 4 changed nothing: not the weights, not Adam's moments or its step count
    for before, after in zip(snaps.weights[3], snaps.weights[5], strict=True):
        assert torch.equal(before, after)
    assert snaps.adam_steps[3] == snaps.adam_steps[5] == 3.0
    # the others trained
    assert any(not torch.equal(a, b) for a, b in zip(snaps.weights[5], snaps.weights[7], strict=True))
    assert all(torch.isfinite(p).all() for p in task.net.parameters())


def test_skip_policy_stops_after_max_skips_in_a_row(tmp_path):
    task = FlowMapDistillation(student(), MixtureTeacher(MIX), skip_nonfinite=2)
    poison(task, {2, 3, 4})
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        trainer(tmp_path, steps=8).fit(task, datamodule=data())


def test_a_negative_count_is_a_config_error():
    with pytest.raises(ConfigError, match="skip_nonfinite must be >= 0"):
        FlowMapDistillation(student(), MixtureTeacher(MIX), skip_nonfinite=-1)
