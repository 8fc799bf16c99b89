"""FlowMatching: train a velocity teacher on data (docs/maths.md §1)."""
from __future__ import annotations

from typing import Optional

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ayf.errors import ConfigError
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import velocity_teacher
from ayf.objectives import FlowMatchingObjective
from ayf.tasks.base import AyfTask


class FlowMatching(AyfTask):
    """Flow matching ``|| v_theta(x_t, t) - (eps - x0) ||^2`` with ``x_t = (1 - t) x0 + t eps``.

    Args:
        net: the velocity network, a FlowMap with ``s_embedding: none``.
        optimizer: optimiser factory (default Adam, lr 1e-3).
        lr_scheduler: optional learning-rate scheduler factory, stepped every batch.
        p_mean: mean of the logit-normal training-time distribution.
        p_std: standard deviation of the logit-normal training-time distribution.
        label_dropout: share of training labels replaced by the null label (and prompts by the
            empty prompt), so that the same network also learns the unconditional velocity that
            classifier-free guidance needs.
        compile: run the loss computation through ``torch.compile`` (first step compiles).
        skip_nonfinite: non-finite losses in a row to skip before training stops (0: stop at the first).
    """

    kind = "FlowMatching"

    def __init__(
        self,
        net: FlowMap,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        p_mean: float = 0.0,
        p_std: float = 1.0,
        label_dropout: float = 0.0,
        compile: bool = False,
        skip_nonfinite: int = 0,
    ):
        super().__init__(optimizer, lr_scheduler, skip_nonfinite)
        if net.is_flow_map:
            raise ConfigError("FlowMatching trains a velocity model: give the net `s_embedding: none`")
        if label_dropout > 0 and net.num_classes == 0 and not net.reads_text:
            raise ConfigError("label_dropout needs a class- or text-conditional net (`num_classes` > 0, or prompts)")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = net
        self.objective = FlowMatchingObjective(p_mean, p_std, label_dropout, compile)

    def sampling_model(self, lam):
        """The net as a teacher; with lam other than None or 1, classifier-free guidance."""
        model = velocity_teacher(self.net, self.hparams.label_dropout, lam, freeze=False)
        return model, (lam if model.reads_lam else None)

    def record_extras(self) -> dict:
        return {"label_dropout": self.hparams.label_dropout}
