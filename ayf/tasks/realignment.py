"""Realignment: a converted teacher's time input switched from c_noise(sigma) to t (docs/maths.md §11)."""
from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ayf.checkpoints import CheckpointTeacher, build_network
from ayf.distributed import run_dir
from ayf.errors import ConfigError
from ayf.math.path import interpolate
from ayf.nn.cond import Cond
from ayf.nn.teachers import NetTeacher
from ayf.objectives.realignment import RealignmentObjective
from ayf.tasks.base import AyfTask

#: bins of the valid t range in the velocity-error report
REPORT_BINS = 4


def realigned_config(config: dict, t_num_freqs: int, t_max_freq: float) -> dict:
    """A converted network's config with its time input switched to t."""
    config = copy.deepcopy(config)
    backbone = config.get("init_args", {}).get("backbone", {})
    if backbone.get("class_path") != "ayf.nn.edm2.EDM2Net":
        raise ConfigError("realignment needs a teacher whose backbone is ayf.nn.edm2.EDM2Net "
                          f"(a converted EDM2 network), got {backbone.get('class_path')}")
    args = backbone.setdefault("init_args", {})
    if args.get("time_input", "c_noise") != "c_noise":
        raise ConfigError("this teacher is realigned already (time_input: t)")
    args.update(time_input="t", t_num_freqs=int(t_num_freqs), t_max_freq=float(t_max_freq))
    return config


@torch.no_grad()
def velocity_error(net, teacher, x0, cond: Cond, eps, t, bins: int = REPORT_BINS, batch_size: int = 256) -> dict:
    """Relative RMS error ``sqrt(sum ||v_net - v_teacher||^2 / sum ||v_teacher||^2)`` at
    ``x_t = (1 - t) x0 + t eps``, overall and in ``bins`` equal bins of the examples (sorted by t)."""
    order = torch.argsort(t)
    x0, eps, t, cond = x0[order], eps[order], t[order], cond[order]
    err, ref = [], []
    for i in range(0, len(x0), batch_size):
        sl = slice(i, i + batch_size)
        x_t = interpolate(x0[sl], eps[sl], t[sl])
        v_ref = teacher(x_t, t[sl], cond[sl])
        err.append((net.velocity(x_t, t[sl], cond[sl]) - v_ref).flatten(1).pow(2).sum(1))
        ref.append(v_ref.flatten(1).pow(2).sum(1))
    err, ref = torch.cat(err), torch.cat(ref)
    parts = [b for b in torch.tensor_split(torch.arange(len(err)), bins) if len(b)]
    return {"velocity_rel_error": float((err.sum() / ref.sum()).sqrt()),
            "t_range": [float(t[0]), float(t[-1])],
            "bins": [{"t": [float(t[b[0]]), float(t[b[-1]])], "velocity_rel_error": float((err[b].sum() / ref[b].sum()).sqrt())}
                     for b in parts]}


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
        nonfinite: what a non-finite loss does: ``stop`` training (default; the last checkpoint
            is untouched) or ``skip`` the step (no update; counted in ``train/skipped_steps``).
        max_skips: with ``skip``, stop after this many non-finite steps in a row.
    """

    kind = "Realignment"
    default_solver = "euler"

    def __init__(self, teacher: str, embedding_steps: int = 2000, target: str = "teacher",
                 optimizer: Optional[OptimizerCallable] = None, lr_scheduler: Optional[LRSchedulerCallable] = None,
                 embedding_lr: float = 3e-3, p_mean: float = 0.0, p_std: float = 1.0, t_num_freqs: int = 64,
                 t_max_freq: float = 256.0, eval_examples: int = 512, report: Optional[str] = None,
                 compile: bool = False, nonfinite: str = "stop", max_skips: int = 10):
        super().__init__(optimizer, lr_scheduler, compile, nonfinite, max_skips)
        if embedding_steps < 0:
            raise ConfigError(f"embedding_steps must be >= 0, got {embedding_steps}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        original = CheckpointTeacher(teacher)
        self.realigned_config = realigned_config(original.net_config, t_num_freqs, t_max_freq)
        self.net = build_network(self.realigned_config)
        kept = {k: v for k, v in original.net.state_dict().items() if k in self.net.state_dict()}
        missing = self.net.load_state_dict(kept, strict=False).missing_keys
        if any(not k.startswith("backbone.t_embedding.") for k in missing):
            raise ConfigError(f"the realigned network lacks weights of the original: {missing[:3]}")
        self.set_objective(RealignmentObjective(original, target, p_mean, p_std))
        self.history = []
        self.unused_parameters = embedding_steps > 0  # that phase trains the time embedding alone

    def net_config(self) -> dict:
        return self.realigned_config

    def sampling_model(self, lam):
        if lam not in (None, 1):
            raise ConfigError("sample a realigned teacher without guidance (autoguide it with GuidedTeacher)")
        return NetTeacher(self.net, freeze=False), None

    def configure_optimizers(self):
        emb = list(self.net.backbone.t_embedding.parameters())
        ids = {id(p) for p in emb}
        rest = [p for p in self.net.parameters() if id(p) not in ids and p.requires_grad]
        opt = self._optimizer([{"params": rest}, {"params": emb, "lr": self.hparams.embedding_lr}])
        if self._lr_scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._lr_scheduler(opt), "interval": "step"}}

    def set_phase(self) -> None:
        fit = self.global_step < self.hparams.embedding_steps or self.hparams.target == "none"
        self.objective.phase = "embedding" if fit else "finetune"

    def training_step(self, batch, batch_idx):
        self.set_phase()
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.set_phase()
        super().validation_step(batch, batch_idx)

    # --- the report -------------------------------------------------------------------------
    def _eval_set(self):
        """Fixed validation examples: data, labels, noise and times spread over the valid range."""
        if getattr(self, "_eval", None) is None:
            dm = self.trainer.datamodule
            if hasattr(dm, "validation_examples"):  # whole on every rank, whatever the number of processes
                b = self.to_batch(dm.validation_examples(self.hparams.eval_examples))
                x0, label = b.x0, b.cond.label
            else:
                xs, labels = [], []
                for batch in dm.val_dataloader():
                    b = self.to_batch(batch)
                    xs.append(b.x0)
                    labels.append(b.cond.label)
                    if sum(len(x) for x in xs) >= self.hparams.eval_examples:
                        break
                x0 = torch.cat(xs)[: self.hparams.eval_examples]
                label = None if labels[0] is None else torch.cat(labels)[: len(x0)]
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
        if not self.history:
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

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["ayf"]["label_dropout"] = 0.0
        checkpoint["ayf"]["realignment"] = {"history": self.history}

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self.history = list(checkpoint.get("ayf", {}).get("realignment", {}).get("history", []))
