"""What every ayf LightningModule shares: the objective call and its logging, optimiser wiring,
the loss guard, shape checks and sampling through :mod:`ayf.sampling` with the settings of the
task's own record."""
from __future__ import annotations

import contextlib
import sys
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ayf.checkpoints import sampling_defaults
from ayf.distributed import reset_run_dir
from ayf.errors import ConfigError
from ayf.nn.cond import TEXT_FIELDS, Cond
from ayf.objectives.base import Batch, State
from ayf.sampling import generate
from ayf.tasks.guards import NonFiniteGuard, check_compile
from ayf.tasks.persistence import Persistence

#: base seed of the draws of validation and test batches (see AyfTask.evaluation_rng)
VALIDATION_SEED = 12345


def default_optimizer(params):
    return torch.optim.Adam(params, lr=1e-3)


class AyfTask(Persistence, L.LightningModule):
    """Base of ayf's tasks: ``net`` is the trained FlowMap (callbacks such as EMA use it) and
    ``objective`` (an :class:`ayf.objectives.Objective`) maps it, a batch and the training
    :class:`ayf.objectives.State` to a loss.

    Args:
        optimizer: optimiser factory (default Adam, lr 1e-3).
        lr_scheduler: optional learning-rate scheduler factory, stepped every batch.
        skip_nonfinite: how many non-finite losses in a row to skip (no update, counted in
            ``train/skipped_steps``) before training stops; 0 (default) stops at the first. The
            last saved checkpoint is untouched either way.
    """

    kind = "AyfTask"
    #: guidance scale lam of sampling when none is passed (validation, plots, ``ayf test
    #: --guidance``); None: no guidance
    sample_guidance = None
    #: the ODE solver of sampling (``flow_map`` for flow maps)
    default_solver = "euler"
    #: some steps leave trainable parameters without a gradient (DDP must be told, see :meth:`setup`)
    unused_parameters = False

    def __init__(self, optimizer: Optional[OptimizerCallable] = None,
                 lr_scheduler: Optional[LRSchedulerCallable] = None, skip_nonfinite: int = 0):
        super().__init__()
        self._optimizer = optimizer or default_optimizer
        self._lr_scheduler = lr_scheduler
        self.guard = NonFiniteGuard(skip_nonfinite)
        self._skip_update = False

    def set_sample_guidance(self, lam: float) -> None:
        """Sets :attr:`sample_guidance`; a model that cannot be guided raises ConfigError."""
        self.sampling_model(lam)
        self.sample_guidance = lam

    def trainable_parameters(self):
        return list(self.net.parameters()) + [p for p in self.objective.parameters() if p.requires_grad]

    def state(self) -> State:
        """The training state handed to the objective: the optimiser step (in ``ayf test``, the
        checkpoint's, so that schedules stand where training left them)."""
        return State(step=max(int(self.global_step), int(self.checkpoint_step)))

    # --- set-up -----------------------------------------------------------------------------
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

    def inputs(self) -> list:
        """Lines naming what this task read (teachers, a student's checkpoint), which ``ayf fit`` and
        ``ayf test`` print at the start."""
        return []

    def setup(self, stage):
        if self._trainer is not None and self.trainer.is_global_zero:
            for line in [*self.inputs(), *self.space_lines()]:
                print(f"ayf: {line}", file=sys.stderr, flush=True)
        self.check_shapes(self.attached_datamodule())
        if getattr(self.objective, "compile_terms", False) and stage == "fit":
            check_compile(self.trainer.strategy.root_device)
        reset_run_dir(self.trainer)  # on every rank: under DDP, asking for it on rank 0 alone would hang
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if self.unused_parameters and ddp_kwargs is not None:
            # plain DDP would stop at the next step ("parameters that were not used in producing the
            # loss"); the strategy wraps the model after this hook
            ddp_kwargs["find_unused_parameters"] = True

    def configure_optimizers(self):
        return self.with_scheduler(self._optimizer(list(self.trainable_parameters())))

    def with_scheduler(self, opt):
        scheduler = None if self._lr_scheduler is None else self._lr_scheduler(opt)
        return opt if scheduler is None else {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- the objective ----------------------------------------------------------------------
    def to_batch(self, batch) -> Batch:
        """A :class:`Batch` from a dict batch ``{"x", "label", a prompt's "text", ...}`` or a tuple."""
        text = {k: batch[k] for k in TEXT_FIELDS if k in batch} if isinstance(batch, dict) else {}
        if isinstance(batch, dict):
            x, label = batch["x"], batch.get("label")
        elif isinstance(batch, (list, tuple)):
            x, label = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, label = batch, None
        self._batch_size = len(x)
        return Batch(x, Cond(label=label if self.net.num_classes > 0 else None, **text))

    def loss(self, batch, stage: str):
        """Mean loss of one batch; logs it and the objective's statistics under ``stage/``."""
        per, stats = self.objective(self.net, self.to_batch(batch), self.state())
        loss = per.mean()
        sync = stage != "train"  # validation and test figures are means over every rank's batches
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", sync_dist=sync)
        for name, value in stats.items():
            self.log(f"{stage}/{name}", value, sync_dist=sync)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        # EDM2's forced weight normalisation, for backbones that have it (ayf.nn.edm2.EDM2Net)
        renormalize = getattr(getattr(self.net, "backbone", None), "renormalize_", None)
        if renormalize is not None:
            renormalize()

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch, "train")
        self._skip_update = not self.guard.finite(self, loss)
        if self._skip_update:
            # a zero that touches every trainable parameter: under DDP every rank still joins the
            # gradient all-reduce; on_before_optimizer_step then drops the gradients, so that the
            # optimiser (its moments included) leaves these parameters as they were
            return sum((p * 0).sum() for p in self.trainable_parameters())
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self._skip_update:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._skip_update = False

    def validation_step(self, batch, batch_idx):
        with self.evaluation_rng(batch_idx):
            self.loss(batch, "val")

    def test_step(self, batch, batch_idx):
        with self.evaluation_rng(batch_idx):
            self.loss(batch, "test")

    @contextlib.contextmanager
    def evaluation_rng(self, batch_idx: int):
        """A context in which evaluation draws its times and noise from a fixed seed per batch,
        and after which the training RNG stands where it stood: validation losses compare across
        steps, and a run that validates draws the same training noise as one that does not."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(VALIDATION_SEED + batch_idx)
            yield

    def log(self, name, value, *args, **kwargs):
        """LightningModule.log with the batch size of the last :meth:`to_batch` (dict batches
        are otherwise ambiguous to Lightning)."""
        if getattr(self, "_batch_size", None) is not None:
            kwargs.setdefault("batch_size", self._batch_size)
        super().log(name, value, *args, **kwargs)

    # --- sampling (callbacks, `ayf test`) ---------------------------------------------------
    def sampling_model(self, lam):  # pragma: no cover - abstract
        """``(model, lam)``: the model :meth:`generate` samples at guidance scale lam, and the lam
        its condition carries."""
        raise NotImplementedError

    def sampling_cond(self, like: torch.Tensor, label=None, lam=None) -> Cond:
        return Cond.build(like.shape[0], label=label, lam=lam, device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def generate(self, noise, steps: int, label=None, generator=None, solver: Optional[str] = None,
                 gamma: Optional[float] = None, grid=None, guidance=None):
        """Samples from ``noise`` in ``steps`` steps (or on ``grid``) with class ``label``; the
        solver, gamma and guidance scale default to the task's record (:func:`sampling_defaults`)."""
        settings = sampling_defaults(self.record(), solver=solver, gamma=gamma, guidance=guidance)
        model, lam = self.sampling_model(settings["guidance"])
        return generate(model, noise, steps if grid is None else grid, self.sampling_cond(noise, label, lam),
                        solver=settings["solver"], gamma=settings["gamma"], generator=generator)
