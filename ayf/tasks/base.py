"""What every ayf LightningModule shares: the objective call and its logging, optimiser wiring,
checkpoint metadata, the loss guard and sampling through :mod:`ayf.sampling`."""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ayf.checkpoints import FORMAT, rng_state, set_rng_state
from ayf.distributed import gather_objects, reset_run_dir, world
from ayf.errors import ConfigError, NonFiniteLossError
from ayf.nn.cond import Cond
from ayf.objectives.base import Batch, State
from ayf.sampling import generate

log = logging.getLogger("ayf.tasks")

#: what a non-finite training loss does (AyfTask's ``nonfinite``)
NONFINITE = ("stop", "skip")

#: base seed of the draws of validation and test batches (see AyfTask.evaluation_rng)
VALIDATION_SEED = 12345


@contextlib.contextmanager
def _fixed_rng(device, seed: int):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def check_compile(device) -> None:
    """A one-line ConfigError when ``torch.compile`` cannot compile on ``device`` here (no C++
    compiler for the CPU backend, no Triton for the GPU one, an unsupported platform), instead of a
    long compiler traceback at the first training step."""
    probe = torch.compile(lambda x: torch.sin(x) * 2.0 + 1.0, dynamic=False)
    try:
        probe(torch.ones(4, device=device))
    except Exception as err:  # noqa: BLE001 - any failure of the compiler stack means the same
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"compile: true, but torch.compile cannot compile for {device.type} on this machine "
                          f"({type(err).__name__}: {first}); set compile: false") from None


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
    """Base of ayf's tasks: ``net`` is the trained FlowMap (callbacks such as EMA use it) and
    ``objective`` (an :class:`ayf.objectives.Objective`) maps it and a batch to a loss."""

    kind = "AyfTask"
    #: guidance scale lam used by :meth:`generate` when none is passed (validation, plots,
    #: ``ayf test --guidance``); None: no guidance
    sample_guidance = None
    #: the ODE solver :meth:`generate` uses by default (None: the flow-map sampler)
    default_solver = None
    #: some steps leave trainable parameters without a gradient (DDP must be told, see :meth:`setup`)
    unused_parameters = False

    def __init__(
        self,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        compile: bool = False,
        nonfinite: str = "stop",
        max_skips: int = 10,
    ):
        super().__init__()
        if nonfinite not in NONFINITE:
            raise ConfigError(f"unknown nonfinite policy {nonfinite!r}; choose one of {', '.join(NONFINITE)}")
        if max_skips < 0:
            raise ConfigError(f"max_skips must be >= 0, got {max_skips}")
        self._optimizer = optimizer or default_optimizer
        self._lr_scheduler = lr_scheduler
        self.compile_loss = compile
        self.nonfinite, self.max_skips = nonfinite, int(max_skips)
        self.skipped_steps, self._skips_in_a_row, self._skip_update = 0, 0, False
        self.checkpoint_step = 0  # global_step of the checkpoint these weights came from (ayf test reports it)

    def set_objective(self, objective) -> None:
        objective.compile = self.compile_loss
        self.objective = objective

    def on_load_checkpoint(self, checkpoint):
        self.checkpoint_step = int(checkpoint.get("global_step", 0))
        self._rng_to_restore = checkpoint.get("ayf_rng")

    def on_train_start(self):
        # a resumed run draws on from where the checkpointed one stood (restored here, after
        # Lightning's own set-up, which must not be able to move the stream); the loader's
        # position comes back through Lightning's loop state (ayf.data.loaders.ResumableLoader)
        states = getattr(self, "_rng_to_restore", None)
        rank, size = world(self.trainer)
        if states:
            set_rng_state(states[rank] if len(states) == size else states[0])
        elif size > 1:
            # every rank starts from the same seed, which would give all of them the same times and
            # noise for their different examples: a stream per rank makes the global batch's draws
            # independent, as one process's are (the weights agree anyway: DDP broadcasts rank 0's)
            torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)
        self._rng_to_restore = None

    def set_sample_guidance(self, lam: float) -> None:
        """Sets :attr:`sample_guidance`; a model that cannot be guided raises ConfigError."""
        raise ConfigError(f"{self.kind} cannot sample with guidance")

    def trainable_parameters(self):
        return list(self.net.parameters()) + [p for p in self.objective.parameters() if p.requires_grad]

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
        if self.compile_loss and stage == "fit":
            check_compile(self.trainer.strategy.root_device)
        reset_run_dir(self.trainer)  # on every rank: under DDP, asking for it on rank 0 alone would hang
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)
        if self.unused_parameters and ddp_kwargs is not None:
            # plain DDP would stop at the next step ("parameters that were not used in producing the
            # loss"); the strategy wraps the model after this hook
            ddp_kwargs["find_unused_parameters"] = True

    def configure_optimizers(self):
        opt = self._optimizer(list(self.trainable_parameters()))
        if self._lr_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._lr_scheduler(opt), "interval": "step"}}

    def check_finite(self, loss: torch.Tensor, what: str = "loss") -> bool:
        """True when ``loss`` is finite on every rank. Otherwise, by the ``nonfinite`` policy:
        ``stop`` raises NonFiniteLossError; ``skip`` counts and logs the step and returns False
        (the caller makes no update), and raises after ``max_skips`` such steps in a row. Every
        rank must call it: under DDP a non-finite loss on one rank skips the step on all."""
        bad = not bool(torch.isfinite(loss).all())
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = bool(self.trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            self._skips_in_a_row = 0
            return True
        if self.nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite {what} ({loss.item()}) at step {self.global_step}: training stopped; "
                "the last saved checkpoint is untouched (lower the learning rate, check the data, "
                "or set nonfinite: skip)"
            )
        self.skipped_steps += 1
        self._skips_in_a_row += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        if self._skips_in_a_row > self.max_skips:
            raise NonFiniteLossError(
                f"non-finite {what} in {self._skips_in_a_row} steps in a row (max_skips {self.max_skips}) at step "
                f"{self.global_step}: training stopped; the last saved checkpoint is untouched")
        log.warning("non-finite %s at step %d: step skipped (%d in a row, %d in all)", what, self.global_step,
                    self._skips_in_a_row, self.skipped_steps)
        return False

    # --- the objective ----------------------------------------------------------------------
    def to_batch(self, batch) -> Batch:
        """A :class:`Batch` from a dict batch ``{"x": ..., "label": ...}`` or a tuple."""
        if isinstance(batch, dict):
            x, label = batch["x"], batch.get("label")
        elif isinstance(batch, (list, tuple)):
            x, label = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, label = batch, None
        self._batch_size = len(x)
        return Batch(x, Cond(label=label if self.net.num_classes > 0 else None))

    def objective_state(self) -> State:
        return State()

    def loss(self, batch, stage: str):
        """Mean loss of one batch; logs it and the objective's statistics under ``stage/``."""
        per, stats = self.objective(self.net, self.to_batch(batch), self.objective_state())
        loss = per.mean()
        # validation and test figures are means over every rank's batches (a no-op in one process)
        sync = stage != "train"
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
        self._skip_update = not self.check_finite(loss)
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

    def evaluation_rng(self, batch_idx: int):
        """A context in which evaluation draws its times and noise from a fixed seed per batch,
        and after which the training RNG stands where it stood: validation losses compare across
        steps, and a run that validates draws the same training noise as one that does not."""
        return _fixed_rng(self.device, VALIDATION_SEED + batch_idx)

    def log(self, name, value, *args, **kwargs):
        """LightningModule.log with the batch size of the last :meth:`to_batch` (dict batches
        are otherwise ambiguous to Lightning)."""
        if getattr(self, "_batch_size", None) is not None:
            kwargs.setdefault("batch_size", self._batch_size)
        super().log(name, value, *args, **kwargs)

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        for key in [k for k in sd if k.startswith("objective.teacher.")]:
            del sd[key]  # the teacher is frozen and named by the config, never saved
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        teacher = getattr(self.objective, "teacher", None)
        if teacher is not None:
            for key, value in teacher.state_dict(prefix="objective.teacher.").items():
                state_dict.setdefault(key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint):
        # hparams hold config dicts under `ayf fit`, but live objects when a task is built in
        # Python; keep only plain data so the checkpoint loads with torch.load(weights_only=True)
        hp = checkpoint.get("hyper_parameters")
        if hp:
            checkpoint["hyper_parameters"] = {k: v for k, v in hp.items() if _plain(v)}
        rng = gather_objects(self._trainer, rng_state())  # every rank's, for its own resume
        checkpoint["ayf_rng"] = rng  # beside the metadata, which stays plain (JSON-able) data
        checkpoint["ayf"] = {
            "format": FORMAT,
            "kind": self.kind,
            "net": self.net_config(),
            "data_shape": list(self.net.data_shape),
            "objective": self.hparams.get("objective"),
            "sample_guidance": self.sample_guidance,
        }

    def net_config(self) -> Optional[dict]:
        """The ``class_path``/``init_args`` config of :attr:`net` (None when built in Python)."""
        net_cfg = self.hparams.get("net")
        return net_cfg if isinstance(net_cfg, dict) else None

    # --- sampling (callbacks, `ayf test`) ---------------------------------------------------
    def sampling_model(self, lam):  # pragma: no cover - abstract
        """The model :meth:`generate` samples (guided at scale lam where that applies)."""
        raise NotImplementedError

    def sampling_cond(self, like: torch.Tensor, label=None, lam=None) -> Cond:
        return Cond.build(like.shape[0], label=label, lam=lam, device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def generate(self, noise, steps: int, label=None, generator=None, solver: Optional[str] = None,
                 gamma: Optional[float] = None, grid=None, guidance=None):
        """Samples from ``noise`` in ``steps`` steps (or on ``grid``) with class ``label`` and
        guidance scale ``guidance`` (default :attr:`sample_guidance`)."""
        lam = self.sample_guidance if guidance is None else guidance
        model, lam = self.sampling_model(lam)
        solver = solver or self.default_solver or "flow_map"
        gamma = self.default_gamma() if gamma is None else gamma
        return generate(model, noise, steps if grid is None else grid, self.sampling_cond(noise, label, lam),
                        solver=solver, gamma=gamma, generator=generator)

    def default_gamma(self) -> float:
        return 0.0
