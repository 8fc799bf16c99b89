"""FidelityMetrics: FD / KID / precision / recall at several step counts, during fit and in ``ayf test``."""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from ayf.callbacks.ema import sampling_weights
from ayf.distributed import barrier, gather_in_order, run_dir, shard_range, world
from ayf.errors import ConfigError
from ayf.figures import to_uint8
from ayf.io import refuse_existing
from ayf.math.samplers import ODE_SOLVERS
from ayf.metrics.features import FeatureExtractor
from ayf.metrics.fidelity import fidelity_metrics, reference_features

log = logging.getLogger("ayf.metrics")


@torch.no_grad()
def decoded_pixels(encoder, moments: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """uint8 pixels of stored latent moments: the encoder's decode of each posterior's mode."""
    encoder = encoder.to(device)
    return torch.cat([to_uint8(encoder.decode(encoder.mode(moments[i: i + batch_size].to(device).float()))).cpu()
                      for i in range(0, len(moments), batch_size)])


class FidelityMetrics(L.Callback):
    """Generates ``num_samples`` images at each step count and compares their features with the
    real training data (features cached beside the shards). Runs at the end of ``ayf test`` and,
    with ``every_n_steps``, periodically during fit (EMA weights when an EMA callback runs).
    Results go to the logger (``fidelity/<solver>_<steps>/<metric>``) and to a JSON file.

    Args:
        extractor: feature extractor (ayf.metrics.ClassifierFeatures or ayf.metrics.InceptionFeatures).
        steps: step counts to evaluate (flow map: jumps; a flow-matching teacher: ODE steps).
        solvers: ODE solvers (``euler``, ``heun``) of a flow-matching teacher, and of a
            distilled flow map's teacher when ``teacher_steps`` is set; flow maps always use
            their own sampler.
        teacher_steps: for a flow map, also evaluate its teacher (guided at the student's
            sampling scale, like the grids) at these ODE step counts with each of ``solvers``,
            from the same noise, in ``ayf test`` only (rows ``teacher_<solver>_<steps>``).
        num_samples: generated images per setting.
        reference_count: real images to compare with (default: the whole reference set).
        reference: a folder of pixel shards to compare with (for latent data: the images the latents
            were encoded from, as the paper's FID does). Default: the training shards; latent ones
            are decoded from their posterior means, so that FID then leaves out the VAE's own
            reconstruction error.
        every_n_steps: evaluate every this many training steps during fit (0: only in test).
        batch_size: generation batch size.
        seed: seed of the noise and class labels (the same for every setting).
        output: JSON file of the results (default ``<log_dir>/fidelity.json``; periodic
            evaluations append to ``<log_dir>/fidelity.jsonl``).
        kid_subset_size: subset size of the KID estimate.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        steps: List[int] = (1, 2, 4, 8),
        solvers: List[str] = ("euler",),
        num_samples: int = 2000,
        reference_count: Optional[int] = None,
        every_n_steps: int = 0,
        batch_size: int = 500,
        seed: int = 0,
        output: Optional[str] = None,
        kid_subset_size: int = 1000,
        teacher_steps: List[int] = (),
        reference: Optional[str] = None,
    ):
        if num_samples < 2 or batch_size < 1 or every_n_steps < 0 or not steps or min(list(steps) + list(teacher_steps)) < 1:
            raise ConfigError("FidelityMetrics needs num_samples >= 2, batch_size >= 1, every_n_steps >= 0 and steps >= 1")
        unknown = [s for s in solvers if s not in ODE_SOLVERS]
        if unknown:
            raise ConfigError(f"unknown teacher solver {unknown[0]!r} in FidelityMetrics; choose euler or heun")
        self.extractor = extractor
        self.steps, self.solvers = [int(k) for k in steps], list(solvers)
        self.teacher_steps = [int(k) for k in teacher_steps]
        self.num_samples, self.reference_count = num_samples, reference_count
        self.every_n_steps, self.batch_size, self.seed = every_n_steps, batch_size, seed
        self.output, self.kid_subset_size, self.reference = output, kid_subset_size, reference
        self._real = None

    # --- pieces -----------------------------------------------------------------------------
    def _reference(self, trainer, pl_module):
        if self._real is None:
            dm = trainer.datamodule
            if not hasattr(dm, "reference_images"):
                raise ConfigError("FidelityMetrics needs image data (ayf.data.ImageShards)")
            source = dm.reference_source(self.reference) if self.reference else dm.train_source
            count = self.reference_count or len(source)
            folder = getattr(source, "folder", None)
            latent = getattr(source, "space", "pixels") == "latent"
            self._reference_what = os.path.realpath(str(folder or source.spec)) + (
                " (latents decoded from their posterior means)" if latent else "")
            labels = {}

            def images():
                x, y = dm.reference_images(count, source=source)
                labels["y"] = y
                if latent:  # no pixels stored: decoded posterior modes
                    x = decoded_pixels(dm.encoder, x, self.batch_size, pl_module.device)
                return x

            feats = reference_features(self.extractor, images, count, folder, device=pl_module.device)
            if pl_module.net.num_classes > 0 and "y" not in labels:
                labels["y"] = dm.reference_images(count, source=source)[1]
            self._real = (feats, labels.get("y"))
        return self._real

    def _inputs(self, pl_module, ref_labels):
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.num_samples, *pl_module.net.data_shape, generator=gen)
        label = None
        if pl_module.net.num_classes > 0 and ref_labels is not None:
            # class labels drawn like the real data's
            label = ref_labels[torch.randint(len(ref_labels), (self.num_samples,), generator=gen)]
        return noise, label

    def _settings(self, pl_module, with_teacher: bool):
        if not getattr(pl_module.net, "is_flow_map", False):
            return [(s, k) for s in self.solvers for k in self.steps]
        teacher = [(f"teacher_{s}", k) for s in self.solvers for k in self.teacher_steps] if with_teacher else []
        return [("flow_map", k) for k in self.steps] + teacher

    def _generate(self, pl_module, solver, k, noise, label):
        out = []
        for i in range(0, len(noise), self.batch_size):
            x = noise[i: i + self.batch_size].to(pl_module.device)
            lab = None if label is None else label[i: i + self.batch_size].to(pl_module.device)
            if solver.startswith("teacher_"):
                y = pl_module.teacher_generate(x, k, label=lab, solver=solver[len("teacher_"):])
            else:
                y = pl_module.generate(x, k, label=lab, **({} if solver == "flow_map" else {"solver": solver}))
            out.append(to_uint8(pl_module.to_pixels(y)).cpu())
        return torch.cat(out)

    def evaluate(self, trainer, pl_module, with_teacher: bool = False) -> Optional[dict]:
        """``{"<solver>_<steps>": metrics}`` for every setting (with_teacher: and a flow map's
        teacher at ``teacher_steps``).

        Every rank must call it: under a multi-process strategy each rank generates and embeds
        its contiguous share of the fixed noise, the features are gathered in order, and rank 0
        (which alone reads the reference features) computes the metrics; the other ranks
        return None. The figures equal a single process's for the same seed."""
        rank, size = world(trainer)
        if self.num_samples < size:
            raise ConfigError(f"FidelityMetrics needs num_samples >= the number of processes ({size})")
        real, ref_labels = self._reference(trainer, pl_module) if rank == 0 else (None, None)
        noise, label = self._inputs(pl_module, ref_labels)  # the same noise on every rank
        if size > 1 and pl_module.net.num_classes > 0:
            label = trainer.strategy.broadcast(label, src=0)  # drawn from rank 0's reference labels
        mine = shard_range(self.num_samples, rank, size)
        noise, label = noise[mine.start: mine.stop], None if label is None else label[mine.start: mine.stop]
        results = {}
        settings = self._settings(pl_module, with_teacher)
        bar = tqdm(settings, desc="fidelity", unit="setting", disable=rank != 0, leave=False)
        with sampling_weights(trainer, pl_module):
            for solver, k in bar:
                bar.set_postfix_str(f"{solver}, {k} steps")
                fake = self.extractor.extract(self._generate(pl_module, solver, k, noise, label), device=pl_module.device)
                fake = gather_in_order(trainer, fake, self.num_samples)
                if rank == 0:
                    results[f"{solver}_{k}"] = fidelity_metrics(fake, real, self.kid_subset_size, seed=self.seed)
        return results if rank == 0 else None

    def _publish(self, trainer, results: dict, periodic: bool) -> None:
        # in ayf test the trainer's step is 0: report the trained step of the checkpoint instead
        step = trainer.global_step if periodic else getattr(trainer.lightning_module, "checkpoint_step", 0)
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"fidelity/{name}/{m}": v for name, res in results.items() for m, v in res.items()}, step=step)
        record = {"step": step, "checkpoint": trainer.ckpt_path, "teacher": teacher_checkpoints(trainer.lightning_module),
                  "extractor": self.extractor.name,
                  "guidance": getattr(trainer.lightning_module, "sample_guidance", None),
                  "num_samples": self.num_samples, "reference": self._reference_what,
                  "reference_count": len(self._real[0]), "results": results}
        log_dir = run_dir(trainer)
        os.makedirs(log_dir, exist_ok=True)
        if periodic:
            with open(os.path.join(log_dir, "fidelity.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")
            return
        path = self.output or os.path.join(log_dir, "fidelity.json")
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(record, fh, indent=1)
        rank_zero_info(format_results(results) + f"\nwritten to {path}")

    # --- hooks ------------------------------------------------------------------------------
    def _run(self, trainer, pl_module, periodic: bool) -> None:
        results = self.evaluate(trainer, pl_module, with_teacher=not periodic)  # on every rank
        if trainer.is_global_zero:
            self._publish(trainer, results, periodic=periodic)
        barrier(trainer, "ayf.FidelityMetrics")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self._run(trainer, pl_module, periodic=True)

    def on_test_start(self, trainer, pl_module):
        refuse_existing(self.output, "FidelityMetrics output")  # before the long evaluation, not after it

    def on_test_end(self, trainer, pl_module):
        self._run(trainer, pl_module, periodic=False)


def teacher_checkpoints(pl_module) -> list:
    """Checkpoint paths of a distilled model's teacher networks (strong first, then a weak one),
    so that a result file says which teacher its ``teacher_*`` rows and its student came from."""
    teacher = getattr(pl_module, "teacher", None)
    if teacher is None:
        return []
    return [m.ckpt_path for m in teacher.modules() if getattr(m, "ckpt_path", None)]


def format_results(results: dict) -> str:
    """A Markdown table of :meth:`FidelityMetrics.evaluate` results."""
    lines = ["| setting | FD | KID | precision | recall |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['fd']:.4g} | {r['kid']:.4g} | {r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(lines)
