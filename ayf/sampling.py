"""The one sampling front end: flow maps, velocity nets and teachers, from noise to data.

Tasks, callbacks, ``ayf sample``, benchmarks and tests all sample through :func:`generate`; the
samplers themselves are pure functions in :mod:`ayf.math.samplers` (docs/maths.md §5).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from ayf.errors import ConfigError
from ayf.math.samplers import ODE_SOLVERS, sample_flow_map
from ayf.math.times import check_grid, time_grid
from ayf.nn.cond import NO_COND, Cond
from ayf.nn.flow_map import FlowMap

SOLVERS = ("flow_map", *ODE_SOLVERS)


def make_grid(steps: Optional[int] = None, grid: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The time grid ``1 = t_0 > ... > t_N = 0`` of ``steps`` uniform steps, or an explicit one
    (validated); a bad value is a one-line ConfigError."""
    if steps is not None and grid is not None:
        raise ConfigError("give a number of steps or an explicit grid, not both")
    try:
        return check_grid(grid) if grid is not None else time_grid(1 if steps is None else steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def velocity_of(model) -> Callable:
    """``v(x, t, cond)`` of a velocity FlowMap, a flow map (``F(x, t, t)``) or a teacher."""
    return model.velocity if isinstance(model, FlowMap) else model


def check_solver(model, solver: str) -> None:
    if solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver == "flow_map" and not (isinstance(model, FlowMap) and model.is_flow_map):
        raise ConfigError("this model is a velocity model, not a flow map: sample it with solver euler or heun")


def generate(model, noise: torch.Tensor, steps: Union[int, torch.Tensor, Sequence[float]], cond: Optional[Cond] = None,
             solver: str = "flow_map", gamma: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Samples from ``noise`` (``x_1``, ``(B, *D)``) to data without autograd graph.

    model: a flow map (``solver="flow_map"``: one jump per step, gamma-sampling optional) or a
        velocity model / teacher (``solver="euler"`` or ``"heun"``, the probability-flow ODE).
    steps: a number of uniform steps, or an explicit grid from 1 to 0.
    cond: the condition handed to every model call (class labels, guidance scale).
    """
    check_solver(model, solver)
    grid = make_grid(steps=steps) if isinstance(steps, int) else make_grid(grid=steps)
    grid = grid.to(device=noise.device, dtype=noise.dtype)
    cond = NO_COND if cond is None else cond
    with torch.no_grad():
        if solver == "flow_map":
            return sample_flow_map(model, noise, grid, cond, gamma=gamma, generator=generator)
        return ODE_SOLVERS[solver](velocity_of(model), noise, grid, cond)


def generate_batched(model, noise: torch.Tensor, steps, cond: Optional[Cond] = None, solver: str = "flow_map",
                     gamma: float = 0.0, generator=None, batch_size: int = 1024, device=None,
                     postprocess: Optional[Callable] = None, progress: Optional[str] = None) -> torch.Tensor:
    """:func:`generate` over ``batch_size`` chunks of ``noise`` on ``device``; each chunk's result
    goes through ``postprocess`` (e.g. to uint8 pixels) and back to the CPU. ``progress``: the
    description of a progress bar (None: no bar)."""
    from tqdm.auto import tqdm

    cond = NO_COND if cond is None else cond
    device = torch.device(device) if device is not None else noise.device
    if generator is not None and generator.device != device:
        generator = None  # a CPU generator cannot drive another device's noise
    starts = range(0, len(noise), batch_size)
    out = []
    for i in tqdm(starts, desc=progress, unit="batch", disable=progress is None, leave=False):
        x = noise[i: i + batch_size].to(device)
        y = generate(model, x, steps, cond[i: i + batch_size].to(device), solver, gamma, generator)
        out.append((postprocess(y) if postprocess is not None else y).cpu())
    return torch.cat(out)
