"""Cost of one AYF-EMD training step against one flow-matching step of the same network and
batch: wall time and peak memory, as ratios measured in one run.

    python benchmarks/cost.py [--width 256 --depth 4 --batch 1024 --device cpu --repeats 30] [--no_compile]
    python benchmarks/cost.py --semigroup 0.25        # + the two-jump target's cost (eager)
    python benchmarks/cost.py --tangents jvp,central,forward   # the tangent by JVP and by differences

The EMD step includes the teacher call, the JVP and the student's forward and backward pass. The
teacher has the student's architecture (a velocity FlowMap), as in real distillation. Both steps
are timed eagerly and with their loss computation under torch.compile (what `compile: true` on an
objective does); each ratio compares like with like.
Peak memory is measured with torch.cuda.max_memory_allocated on a GPU, and on CPU (eager only) by
the bytes autograd saves for the backward pass.

Warm-up: each step is called until its timings are steady (the median of its last 5 calls within
5% of the 5 before, at least 6 calls, at most 200), not a fixed number of calls: a compiled step's
first calls on a machine with a cold inductor cache compile and tune for seconds, and a fixed
warm-up of 3 calls reported a 1770 ms compiled step there. The table says how many calls it took.

With --semigroup P, a second table times the distillation objective's own EMD step (ayf.objectives.EMD)
with and without P of each batch on the two-jump target (its longest jumps, docs/maths.md §12),
side by side, eagerly.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ayf.math.losses import flow_map_loss, flow_matching_loss
from ayf.math.path import interpolate, velocity_target
from ayf.math.tangents import emd_tangent, normalize_tangent
from ayf.math.times import TimePairSampler
from ayf.nn import MLP, Cond, FlowMap, NetTeacher
from ayf.objectives import EMD


class SavedBytes:
    """Peak bytes held by autograd's saved tensors (CPU stand-in for peak activation memory)."""

    def __init__(self):
        self.cur = self.peak = 0

    def pack(self, t):
        self.cur += t.numel() * t.element_size()
        self.peak = max(self.peak, self.cur)
        return t

    def unpack(self, t):
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def make(width, depth, dim, s_embedding, device):
    return FlowMap(MLP(dim, width, depth, 128), s_embedding=s_embedding).to(device)


def fm_loss(student, x0, t, eps):
    return flow_matching_loss(student(interpolate(x0, eps, t), t, t), velocity_target(x0, eps)).mean()


def emd_loss(student, teacher, x0, t, s, eps, r, jvp_float32=False, method="jvp", step_size=None):
    x_t = interpolate(x0, eps, t)
    with torch.no_grad():
        v = teacher.velocity(x_t, t)
    F, g = emd_tangent(student, x_t, t, s, v, r=r, jvp_float32=jvp_float32, method=method, step=step_size)
    return flow_map_loss(F, normalize_tangent(g, 0.1), t, s).mean()


def step(opt, loss_fn, *args):
    loss = loss_fn(*args)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(fn, device):
    """Wall time of one call of ``fn`` (synchronised on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def warm_up(fn, device, window: int = 5, tolerance: float = 0.05, most: int = 200) -> int:
    """Calls ``fn`` until its timings are steady: the median of the last ``window`` calls within
    ``tolerance`` of the median of the ``window`` before (at least ``window + 1`` calls, at most
    ``most``). Returns the number of calls made."""
    times = []
    while len(times) < most:
        times.append(timed(fn, device))
        if len(times) > window and len(times) >= 2 * window:
            now, before = statistics.median(times[-window:]), statistics.median(times[-2 * window: -window])
            if abs(now - before) <= tolerance * before:
                break
    return len(times)


def measure_pair(fn_a, fn_b, repeats, device):
    """Side by side: each warmed up until steady (:func:`warm_up`), then ``repeats`` calls of a and
    b in turn. Returns the median times of a and of b, the median of the ratios b / a of the calls
    made next to each other (which a machine whose speed drifts during the run, a shared CPU, leaves
    nearly unbiased) and the warm-up calls of a and of b."""
    warm = (warm_up(fn_a, device), warm_up(fn_b, device))
    pairs = [(timed(fn_a, device), timed(fn_b, device)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(b / a for a, b in pairs), warm)


def measure(fn, repeats, device):
    """Median wall time of ``repeats`` calls, after :func:`warm_up`."""
    warm_up(fn, device)
    return statistics.median(timed(fn, device) for _ in range(repeats))


def peak_memory(fn, device):
    """Peak bytes of one call: torch.cuda.max_memory_allocated on a GPU, autograd's saved tensors on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        mem = torch.cuda.max_memory_allocated() - base
    else:
        with SavedBytes() as sb:
            fn()
        mem = sb.peak
    return mem


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no_compile", action="store_true", help="time the eager steps only")
    p.add_argument("--semigroup", type=float, default=0.0, help="also time the EMD objective with this share of "
                   "each batch on the two-jump target (its longest jumps) against the plain one")
    p.add_argument("--tangents", default="jvp", help="comma-separated tangent methods to time: jvp, central, "
                   "forward (a finite difference of step --difference_step)")
    p.add_argument("--difference_step", type=float, default=None, help="default: the objectives' (central 3e-4, forward 1e-4)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device(args.device)
    student = make(args.width, args.depth, args.dim, "t_minus_s", device)
    teacher = make(args.width, args.depth, args.dim, "none", device).requires_grad_(False).eval()
    student.init_from_teacher(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    x0 = torch.randn(args.batch, args.dim, device=device)
    t, s = TimePairSampler()(args.batch, device=device)
    eps = torch.randn_like(x0)
    r = torch.tensor(0.5, device=device)
    tangents = [m.strip() for m in args.tangents.split(",") if m.strip()]
    variants = [("eager", fm_loss, emd_loss)]
    if not args.no_compile:
        variants += [("torch.compile", torch.compile(fm_loss), torch.compile(emd_loss))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; MLP width {args.width}, depth {args.depth}, batch {args.batch}")
    print("| mode | tangent | FM step (ms) | EMD step (ms) | time ratio EMD/FM | peak memory FM / EMD (MiB) | "
          "memory ratio | warm-up calls FM / EMD |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, fm, emd in variants:
        for method in tangents:
            fm_step = lambda f=fm: step(opt, f, student, x0, t, eps)  # noqa: E731
            emd_step = lambda f=emd, m=method: step(opt, f, student, teacher, x0, t, s, eps, r, False, m,  # noqa: E731
                                                    args.difference_step)
            t_fm, t_emd, ratio, warm = measure_pair(fm_step, emd_step, args.repeats, device)
            m_fm = m_emd = float("nan")
            if mode.startswith("eager") or device.type == "cuda":
                m_fm, m_emd = (peak_memory(f, device) for f in (fm_step, emd_step))
            print(f"| {mode} | {method} | {1e3 * t_fm:.2f} | {1e3 * t_emd:.2f} | {ratio:.2f} | "
                  f"{m_fm / 2**20:.1f} / {m_emd / 2**20:.1f} | {m_emd / max(m_fm, 1):.2f} | {warm[0]} / {warm[1]} |")

    if args.semigroup:
        semigroup_table(student, teacher, opt, x0, t, s, eps, r, args)


def semigroup_table(student, teacher, opt, x0, t, s, eps, r, args):
    """The objective's EMD step, plain and with ``args.semigroup`` of the batch on the two-jump target."""
    plain, two_jump = (EMD(semigroup=p) for p in (0.0, args.semigroup))
    for objective in (plain, two_jump):
        objective.bind(NetTeacher(teacher))
    device = x0.device

    def objective_step(objective):
        return step(opt, lambda: objective.terms(student, x0, Cond(), eps, t, s, r)[0].mean())

    t_plain, t_two, ratio, _ = measure_pair(lambda: objective_step(plain), lambda: objective_step(two_jump),
                                            args.repeats, device)
    print()
    print(f"| EMD step (ms) | with semigroup {args.semigroup:g}, longest (ms) | time ratio |")
    print("|---|---|---|")
    print(f"| {1e3 * t_plain:.2f} | {1e3 * t_two:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
