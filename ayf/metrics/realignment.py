"""The velocity error of a realigned teacher against the original (docs/maths.md §11)."""
from __future__ import annotations

import torch

from ayf.math.path import interpolate

#: bins of the valid t range in the velocity-error report
REPORT_BINS = 4


@torch.no_grad()
def velocity_error(net, teacher, x0, cond, eps, t, bins: int = REPORT_BINS, batch_size: int = 256) -> dict:
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
