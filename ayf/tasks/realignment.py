"""Realignment: a converted teacher's time input switched from c_noise(sigma) to t (docs/maths.md §11)."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ayf.checkpoints import CheckpointTeacher, build_network
from ayf.distributed import run_dir
from ayf.errors import ConfigError
from ayf.io import refuse_existing
from ayf.metrics.realignment import velocity_error
from ayf.nn.cond import Cond
from ayf.nn.edm2 import realigned_config
from ayf.nn.teachers import NetTeacher
from ayf.objectives.realignment import RealignmentObjective
from ayf.tasks.base import AyfTask


class Realignment(AyfTask):
    """Teacher realignment: the time input of a converted teacher (EDM2's ``c_noise =
    ln(sigma) / 4``, which diverges at t = 0 and t = 1) becomes a smooth embedding of t.

    For the first ``embedding_steps`` steps only the new embedding trains, to reproduce the old
    one; then, with ``target`` teacher or data, the whole network is fine-tuned by flow matching.
    The velocity error against the original (relative RMS over the valid t range, on validation
    data) is measured before training and at every validation, logged as
    ``val/velocity_rel_error`` and written to ``report`` as JSON. The result is a teacher
    checkpoint like FlowMatching's: distil it with ``CheckpointTeacher``.

    Args:
        teacher: the converted teacher checkpoint (``ayf convert edm2``) or a FlowMatching
            checkpoint of an EDM2Net.
        embedding_steps: steps that fit the new time embedding alone.
        target: what the later steps fine-tune on: `teacher` (the frozen original's velocity),
            `data` (flow matching), or `none` (stop after the embedding phase).
        optimizer: optimiser factory (default Adam, lr 1e-3) for the network.
        lr_scheduler: optional learning-rate scheduler factory, stepped every batch.
        embedding_lr: learning rate of the new time embedding.
        p_mean: mean of the logit-normal fine-tuning time distribution.
        p_std: standard deviation of the logit-normal fine-tuning time distribution.
        t_num_freqs: Fourier frequencies of the new time embedding.
        t_max_freq: its largest frequency (cycles per unit t).
        eval_examples: validation examples in the velocity-error report.
        report: JSON file of the report (default: realignment.json in the run's log folder).
        compile: run the loss computation through ``torch.compile``.
        skip_nonfinite: non-finite losses in a row to skip before training stops (0: stop at the first).
    """

    kind = "Realignment"

    def __init__(self, teacher: str, embedding_steps: int = 2000, target: str = "teacher",
                 optimizer: Optional[OptimizerCallable] = None, lr_scheduler: Optional[LRSchedulerCallable] = None,
                 embedding_lr: float = 3e-3, p_mean: float = 0.0, p_std: float = 1.0, t_num_freqs: int = 64,
                 t_max_freq: float = 256.0, eval_examples: int = 512, report: Optional[str] = None,
                 compile: bool = False, skip_nonfinite: int = 0):
        super().__init__(optimizer, lr_scheduler, skip_nonfinite)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        original = CheckpointTeacher(teacher)
        self.realigned_config = realigned_config(original.net_config, t_num_freqs, t_max_freq)
        self.net = build_network(self.realigned_config)
        kept = {k: v for k, v in original.net.state_dict().items() if k in self.net.state_dict()}
        missing = self.net.load_state_dict(kept, strict=False).missing_keys
        if any(not k.startswith("backbone.t_embedding.") for k in missing):
            raise ConfigError(f"the realigned network lacks weights of the original: {missing[:3]}")
        self.objective = RealignmentObjective(original, embedding_steps, target, p_mean, p_std, compile)
        self.history = []
        self.unused_parameters = embedding_steps > 0  # that phase trains the time embedding alone

    def net_config(self) -> dict:
        return self.realigned_config

    def inputs(self) -> list:
        return [f"realigning: {line}" for line in self.objective.teacher.describe()]

    def sampling_model(self, lam):
        if lam not in (None, 1):
            raise ConfigError("sample a realigned teacher without guidance (autoguide it with GuidedTeacher)")
        return NetTeacher(self.net, freeze=False), None

    def configure_optimizers(self):
        emb = list(self.net.backbone.t_embedding.parameters())
        ids = {id(p) for p in emb}
        rest = [p for p in self.net.parameters() if id(p) not in ids and p.requires_grad]
        return self.with_scheduler(self._optimizer([{"params": rest}, {"params": emb, "lr": self.hparams.embedding_lr}]))

    # --- the report -------------------------------------------------------------------------
    def _eval_set(self):
        """Fixed validation examples: data, labels, noise and times spread over the valid range."""
        if getattr(self, "_eval", None) is None:
            dm, n = self.trainer.datamodule, self.hparams.eval_examples
            if hasattr(dm, "validation_examples"):  # whole on every rank, whatever the number of processes
                batches = [dm.validation_examples(n)]
            else:
                batches, count = [], 0
                for batch in dm.val_dataloader():
                    batches.append(batch)
                    count += len(self.to_batch(batch).x0)
                    if count >= n:
                        break
            parts = [self.to_batch(batch) for batch in batches]
            x0 = torch.cat([b.x0 for b in parts])[:n]
            label = None if parts[0].cond.label is None else torch.cat([b.cond.label for b in parts])[: len(x0)]
            gen = torch.Generator().manual_seed(0)
            lo, hi = self.objective.teacher.net.backbone.t_range
            t = lo + (hi - lo) * (torch.arange(len(x0), dtype=torch.float64) + 0.5) / len(x0)
            self._eval = (x0, label, torch.randn(x0.shape, generator=gen, dtype=x0.dtype), t.to(x0.dtype))
        return self._eval

    def velocity_error(self) -> dict:
        """:func:`velocity_error` of the net against the original on the fixed validation examples."""
        x0, label, eps, t = (v if v is None else v.to(self.device) for v in self._eval_set())
        was = self.net.training
        report = velocity_error(self.net.eval(), self.objective.teacher, x0, Cond(label=label), eps, t)
        self.net.train(was)
        return dict(report, step=int(self.global_step))

    def on_fit_start(self):
        if not self.history:  # a fresh run (a resumed one continues its own report)
            refuse_existing(self.hparams.report, "realignment report")
            self.history.append(dict(self.velocity_error(), when="before"))
            self._write_report()

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            return
        entry = dict(self.velocity_error(), when="validation")
        self.history.append(entry)
        self.log("val/velocity_rel_error", entry["velocity_rel_error"], sync_dist=True)
        self._write_report()

    def _write_report(self):
        if self.trainer.is_global_zero:
            path = self.hparams.report or os.path.join(run_dir(self.trainer), "realignment.json")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump({"teacher": self.hparams.teacher, "before": self.history[0],
                           "after": self.history[-1], "history": self.history}, f, indent=1)

    def record_extras(self) -> dict:
        return {"label_dropout": 0.0, "realignment": {"history": self.history}}

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self.history = list(checkpoint.get("ayf", {}).get("realignment", {}).get("history", []))
