"""Sample plots: 1/2/4/8-step samples beside data, to TensorBoard and as PNG."""
from __future__ import annotations

import os
from typing import List, Optional

import lightning as L
import torch

from ayf.callbacks.ema import sampling_weights
from ayf.distributed import barrier, run_dir
from ayf.figures import scatter_figure


class SamplePlot(L.Callback):
    """After each validation run, draws samples from fixed noise at several step counts next to
    validation data, logs the figure to TensorBoard (``samples``) and writes
    ``<log_dir>/samples/step_<k>.png``. Vector data only (it plots the first two coordinates).

    Args:
        steps: step counts to draw (default: 1, 2, 4 and 8 jumps of a flow map; 4, 8, 16 and 64
            Euler steps of a velocity model).
        num_samples: points per panel.
        seed: seed of the fixed noise.
    """

    def __init__(self, steps: Optional[List[int]] = None, num_samples: int = 2000, seed: int = 0):
        self.steps = None if steps is None else [int(k) for k in steps]
        self.num_samples = num_samples
        self.seed = seed

    def _data(self, trainer, n):
        dm = trainer.datamodule
        batch = getattr(dm, "reference_batch", None)
        return batch(n) if batch is not None else None

    def on_validation_end(self, trainer, pl_module):
        # drawn on rank 0 while the other ranks wait (the figure equals a single process's)
        if trainer.sanity_checking or len(pl_module.net.data_shape) != 1:
            return
        if trainer.is_global_zero:
            self.draw(trainer, pl_module)
        barrier(trainer, "ayf.SamplePlot")

    @torch.no_grad()
    def draw(self, trainer, pl_module):
        noise, label = fixed_inputs(pl_module.net, self.num_samples, self.seed, pl_module.device)
        panels = {}
        data = self._data(trainer, self.num_samples)
        if data is not None:
            panels["data"] = data
        with sampling_weights(trainer, pl_module):
            for k in step_counts(self.steps, pl_module, (4, 8, 16, 64)):
                panels[f"{k} step{'s' if k > 1 else ''}"] = pl_module.generate(noise, k, label=label).cpu()
        lim = float(max(p.abs().quantile(0.995) for p in panels.values())) * 1.1
        fig = scatter_figure(panels, f"{pl_module.kind} @ step {trainer.global_step}", lim)
        publish_figure(trainer, fig, "samples")


#: the step counts of a flow map's samples, when a callback is given none
FLOW_MAP_STEPS = (1, 2, 4, 8)


def step_counts(steps, pl_module, velocity_steps) -> list:
    """``steps``, or the defaults for what the task samples: :data:`FLOW_MAP_STEPS` jumps of a
    flow map, ``velocity_steps`` ODE steps of a velocity model."""
    if steps is not None:
        return list(steps)
    return list(FLOW_MAP_STEPS if pl_module.net.is_flow_map else velocity_steps)


def fixed_inputs(net, n: int, seed: int, device):
    """Seeded noise and, for class-conditional nets, labels cycling through the classes."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *net.data_shape, generator=gen).to(device)
    label = (torch.arange(n) % net.num_classes).to(device) if net.num_classes > 0 else None
    return noise, label


def publish_figure(trainer, fig, tag: str) -> str:
    """Log a figure to TensorBoard under ``tag`` and save ``<log_dir>/<tag>/step_<k>.png``."""
    import matplotlib.pyplot as plt

    step = trainer.global_step
    logger = trainer.logger
    if logger is not None and hasattr(logger.experiment, "add_figure"):
        logger.experiment.add_figure(tag, fig, global_step=step, close=False)
    out_dir = os.path.join(run_dir(trainer), tag)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"step_{step:07d}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
