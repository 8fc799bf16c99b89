"""Image grids: fixed seeds at several step counts, with the teacher beside them."""
from __future__ import annotations

from typing import List, Optional

import lightning as L
import torch

from ayf.callbacks.ema import sampling_weights
from ayf.callbacks.plots import fixed_inputs, publish_figure, step_counts
from ayf.distributed import barrier
from ayf.figures import grid_figure


class ImageGrid(L.Callback):
    """After each validation run, samples the same seeds (and class labels, one class per
    column) at each step count, beside the teacher's samples from that noise, and logs the grid
    to TensorBoard (``grids``) and as ``<log_dir>/grids/step_<k>.png``. Image data only; latents
    are decoded by the data's encoder first.

    Args:
        steps: step counts to draw (default: 1, 2, 4 and 8 jumps of a flow map; 8, 16 and 32
            Euler steps of a velocity model).
        teacher_steps: Euler steps of the teacher column in distillation runs (0: no teacher).
        num_images: images per panel.
        cols: images per row in a panel (default: the number of classes, else 8).
        seed: seed of the fixed noise.
    """

    def __init__(self, steps: Optional[List[int]] = None, teacher_steps: int = 32, num_images: int = 40,
                 cols: int = 0, seed: int = 0):
        self.steps = None if steps is None else [int(k) for k in steps]
        self.teacher_steps, self.num_images, self.cols, self.seed = teacher_steps, num_images, cols, seed

    def on_validation_end(self, trainer, pl_module):
        # drawn on rank 0 while the other ranks wait (the grid equals a single process's)
        if trainer.sanity_checking or len(pl_module.net.data_shape) != 3:
            return
        if trainer.is_global_zero:
            self.draw(trainer, pl_module)
        barrier(trainer, "ayf.ImageGrid")

    @torch.no_grad()
    def draw(self, trainer, pl_module):
        net = pl_module.net
        noise, label = fixed_inputs(net, self.num_images, self.seed, pl_module.device)
        panels = {}
        with sampling_weights(trainer, pl_module):
            for k in step_counts(self.steps, pl_module, (8, 16, 32)):
                panels[f"{k} step{'s' if k > 1 else ''}"] = pl_module.to_pixels(pl_module.generate(noise, k, label=label))
            if self.teacher_steps and hasattr(pl_module, "teacher_generate"):
                panels[f"teacher, Euler {self.teacher_steps}"] = pl_module.to_pixels(
                    pl_module.teacher_generate(noise, self.teacher_steps, label))
        cols = self.cols or (net.num_classes if net.num_classes > 0 else 8)
        publish_figure(trainer, grid_figure(panels, cols, f"{pl_module.kind} @ step {trainer.global_step}"), "grids")
