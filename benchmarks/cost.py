"""Cost of one AYF-EMD training step against one flow-matching step of the same network and
batch: wall time and peak memory, as ratios measured in one run.

    python benchmarks/cost.py [--width 256 --depth 4 --batch 1024 --device cpu --repeats 30] [--no_compile]
    python benchmarks/cost.py --semigroup 0.25        # + the two-jump target's cost (eager)
    python benchmarks/cost.py --tangents jvp,central,forward   # the tangent by JVP and by differences
    python benchmarks/cost.py --tangents jvp,central,forward --profile --no_compile   # + where each step's time goes
    python benchmarks/cost.py --network unet ...     # the digits U-Net (batch 128) instead of the MLP

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

With --profile, a second table splits each eager step by torch.profiler into its named parts (the
teacher call, the trainable forward pass, the tangent, the loss, backward, the optimiser), per
step, and gives the floor of each EMD step: FM's own parts plus the passes the tangent needs.

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
from torch.profiler import record_function

from ayf.math.losses import flow_map_loss, flow_matching_loss
from ayf.math.path import interpolate, velocity_target
from ayf.math.tangents import emd_tangent, normalize_tangent
from ayf.math.times import TimePairSampler
from ayf.nn import MLP, Cond, FlowMap, NetTeacher, UNet
from ayf.objectives import EMD

#: the U-Nets of the image recipes (configs/digits, configs/fashion_mnist)
SIZES = {
    "digits": dict(img_channels=1, img_resolution=8, channels=32, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[4], channels_per_head=32, emb_dim=128),
    "fashion_mnist": dict(img_channels=1, img_resolution=32, channels=64, channel_mult=[1, 2, 2], num_blocks=2,
                          attn_resolutions=[8], channels_per_head=64, emb_dim=256),
}


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


def make(args, s_embedding, device):
    if args.network == "unet":  # the digits recipe's U-Net 
        return FlowMap(UNet(**SIZES["digits"]), s_embedding=s_embedding).to(device)
    return FlowMap(MLP(args.dim, args.width, args.depth, 128), s_embedding=s_embedding).to(device)


def fm_loss(student, x0, t, eps):
    with record_function("ayf.student_forward"):
        F = student(interpolate(x0, eps, t), t, t)
    with record_function("ayf.loss"):
        return flow_matching_loss(F, velocity_target(x0, eps)).mean()


def emd_loss(student, teacher, x0, t, s, eps, r, jvp_float32=False, method="jvp", step_size=None):
    x_t = interpolate(x0, eps, t)
    with torch.no_grad(), record_function("ayf.teacher"):
        v = teacher.velocity(x_t, t)
    F, g = emd_tangent(student, x_t, t, s, v, r=r, jvp_float32=jvp_float32, method=method, step=step_size)
    with record_function("ayf.loss"):
        return flow_map_loss(F, normalize_tangent(g, 0.1), t, s).mean()


def step(opt, loss_fn, *args):
    loss = loss_fn(*args)
    with record_function("ayf.backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("ayf.optimizer"):
        opt.step()


PARTS = ("teacher", "student_forward", "tangent", "loss", "backward", "optimizer")


def profile_parts(fn, calls: int = 20) -> dict:
    """Milliseconds per call of ``fn`` in each named part (:data:`PARTS`), and ``total``, by
    torch.profiler over ``calls`` calls (after a steady warm-up, and a profile of a few calls
    that is thrown away: a process's first profile pays the profiler's own start-up)."""
    warm_up(fn, torch.device("cpu"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        for _ in range(3):
            fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        total = time.perf_counter() - t0
    spent = {e.key: e.cpu_time_total / 1e3 / calls for e in prof.key_averages() if e.key.startswith("ayf.")}
    return {**{part: spent.get(f"ayf.{part}", 0.0) for part in PARTS}, "total": 1e3 * total / calls}


def profile_table(fm_step, emd_steps) -> None:
    """Where an eager step's time goes, FM beside each EMD tangent, and each EMD step's floor: the
    FM step plus the teacher call plus the tangent's extra passes, nothing else."""
    rows = {"FM": profile_parts(fm_step), **{f"EMD {m}": profile_parts(f) for m, f in emd_steps.items()}}
    fm = rows["FM"]["total"]
    print()
    print("| step | " + " | ".join(f"{p} (ms)" for p in PARTS) + " | total (ms) | ratio to FM | floor ratio |")
    print("|---|" + "---|" * (len(PARTS) + 3))
    for name, r in rows.items():
        floor = (fm + r["teacher"] + r["tangent"]) / fm if name != "FM" else 1.0
        print(f"| {name} | " + " | ".join(f"{r[p]:.2f}" for p in PARTS)
              + f" | {r['total']:.2f} | {r['total'] / fm:.2f} | {floor:.2f} |")


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
    p.add_argument("--network", default="mlp", choices=["mlp", "unet"], help="the toy MLP (--width, --depth, "
                   "--dim) or the digits U-Net")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="default: 1024 (MLP), 128 (U-Net)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no_compile", action="store_true", help="time the eager steps only")
    p.add_argument("--profile", action="store_true", help="also split each eager step into its parts (torch.profiler)")
    p.add_argument("--semigroup", type=float, default=0.0, help="also time the EMD objective with this share of "
                   "each batch on the two-jump target (its longest jumps) against the plain one")
    p.add_argument("--tangents", default="jvp", help="comma-separated tangent methods to time: jvp, central, "
                   "forward (a finite difference of step --difference_step)")
    p.add_argument("--difference_step", type=float, default=None, help="default: the objectives' (central 3e-4, forward 1e-4)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = torch.device(args.device)
    student = make(args, "t_minus_s", device)
    teacher = make(args, "none", device).requires_grad_(False).eval()
    student.init_from_teacher(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    args.batch = args.batch or (128 if args.network == "unet" else 1024)
    shape = (1, 8, 8) if args.network == "unet" else (args.dim,)
    x0 = torch.randn(args.batch, *shape, device=device)
    t, s = TimePairSampler()(args.batch, device=device)
    eps = torch.randn_like(x0)
    r = torch.tensor(0.5, device=device)
    tangents = [m.strip() for m in args.tangents.split(",") if m.strip()]
    variants = [("eager", fm_loss, emd_loss)]
    if not args.no_compile:
        variants += [("torch.compile", torch.compile(fm_loss), torch.compile(emd_loss))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    net = "digits U-Net" if args.network == "unet" else f"MLP width {args.width}, depth {args.depth}"
    print(f"device: {name}; {net}, batch {args.batch}")
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

    if args.profile and device.type != "cpu":
        print("\n--profile splits CPU steps only (a GPU's kernels run asynchronously); skipped")
    elif args.profile:
        profile_table(lambda: step(opt, fm_loss, student, x0, t, eps),
                      {m: (lambda m=m: step(opt, emd_loss, student, teacher, x0, t, s, eps, r, False, m,
                                            args.difference_step)) for m in tangents})
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
