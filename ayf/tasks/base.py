"""What every ayf LightningModule shares: optimiser wiring, checkpoint metadata, loss guard."""
from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ayf.errors import ConfigError, NonFiniteLossError
from ayf.math.samplers import ODE_SOLVERS
from ayf.math.times import time_grid


def default_optimizer(params):
    return torch.optim.Adam(params, lr=1e-3)


def _plain(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class AyfTask(L.LightningModule):
    """Base of ayf's tasks. ``net`` is the trained FlowMap; callbacks (EMA, plots) use it."""

    kind = "AyfTask"
    #: guidance scale lam used by :meth:`generate` when none is passed (validation, plots,
    #: ``ayf test --guidance``); None: the task's default
    sample_guidance = None

    def __init__(
        self,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        compile: bool = False,
    ):
        super().__init__()
        self._optimizer = optimizer or default_optimizer
        self._lr_scheduler = lr_scheduler
        self._compiled = None
        self.compile_loss = compile
        self.checkpoint_step = 0  # global_step of the checkpoint these weights came from (ayf test reports it)

    def on_load_checkpoint(self, checkpoint):
        self.checkpoint_step = int(checkpoint.get("global_step", 0))

    def set_sample_guidance(self, lam: float) -> None:
        """Sets :attr:`sample_guidance`; a model that cannot be guided raises ConfigError."""
        raise ConfigError(f"{self.kind} cannot sample with guidance")

    def loss_terms(self, *tensors):  # pragma: no cover - abstract
        """Per-example loss from tensors only (what ``compile`` compiles)."""
        raise NotImplementedError

    def per_example_loss(self, *tensors):
        """:meth:`loss_terms`, through ``torch.compile`` when the task was built with compile.

        Only training steps (grad enabled) run compiled: validation and test batches are few, and
        a no-grad call would compile a second graph, which costs more than it saves.
        """
        if not self.compile_loss or not torch.is_grad_enabled():
            return self.loss_terms(*tensors)
        if self._compiled is None:
            # static shapes: a training batch keeps its shape, and a rare odd one (a last partial
            # batch) compiles once more rather than turning every size symbolic
            self._compiled = torch.compile(self.loss_terms, dynamic=False)
        return self._compiled(*tensors)

    def trainable_parameters(self):
        return self.net.parameters()

    # --- shape agreement --------------------------------------------------------------------
    def attached_datamodule(self):
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    def known_shapes(self, datamodule=None) -> dict:
        """``{what: data shape or None}``; every known one must agree."""
        return {"data shape": getattr(datamodule, "data_shape", None), "model data shape": self.net.data_shape}

    def check_shapes(self, datamodule=None) -> None:
        known = [(name, tuple(shape)) for name, shape in self.known_shapes(datamodule).items() if shape is not None]
        for name, shape in known[1:]:
            if shape != known[0][1]:
                raise ConfigError(f"{known[0][0]} {known[0][1]} and {name} {shape} disagree")

    def setup(self, stage):
        self.check_shapes(self.attached_datamodule())

    def configure_optimizers(self):
        opt = self._optimizer(list(self.trainable_parameters()))
        if self._lr_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._lr_scheduler(opt), "interval": "step"}}

    def check_finite(self, loss: torch.Tensor, what: str = "loss") -> None:
        if not torch.isfinite(loss).all():
            raise NonFiniteLossError(
                f"non-finite {what} ({loss.item()}) at step {self.global_step}: training stopped; "
                "the last saved checkpoint is untouched (lower the learning rate or check the data)"
            )

    def split_batch(self, batch):
        """``(x0, label or None)`` from a dict batch ``{"x": ..., "label": ...}`` or a tuple."""
        if isinstance(batch, dict):
            x, label = batch["x"], batch.get("label")
        elif isinstance(batch, (list, tuple)):
            x, label = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, label = batch, None
        self._batch_size = len(x)
        return x, (label if self.net.num_classes > 0 else None)

    def log(self, name, value, *args, **kwargs):
        """LightningModule.log with the batch size of the last :meth:`split_batch` (dict batches
        are otherwise ambiguous to Lightning)."""
        if getattr(self, "_batch_size", None) is not None:
            kwargs.setdefault("batch_size", self._batch_size)
        super().log(name, value, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint):
        # hparams hold config dicts under `ayf fit`, but live objects when a task is built in
        # Python; keep only plain data so the checkpoint loads with torch.load(weights_only=True)
        hp = checkpoint.get("hyper_parameters")
        if hp:
            checkpoint["hyper_parameters"] = {k: v for k, v in hp.items() if _plain(v)}
        net_cfg = self.hparams.get("net")
        checkpoint["ayf"] = {
            "kind": self.kind,
            "net": net_cfg if isinstance(net_cfg, dict) else None,
            "data_shape": list(self.net.data_shape),
            "objective": self.hparams.get("objective"),
        }

    # sampling used by callbacks and `ayf sample`
    def generate(self, noise, steps: int, label=None, generator=None):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def grid(steps: int, like: torch.Tensor):
        return time_grid(steps).to(like)

    def solve_ode(self, velocity_fn, noise, steps: int, solver: str = "euler"):
        """Teacher-style ODE sampling from t = 1 to 0 on the uniform grid; ``solver`` euler or
        heun (Heun: 2 * steps velocity calls)."""
        if solver not in ODE_SOLVERS:
            raise ConfigError(f"unknown solver {solver!r}; choose one of {', '.join(ODE_SOLVERS)}")
        return ODE_SOLVERS[solver](velocity_fn, noise, self.grid(steps, noise))
