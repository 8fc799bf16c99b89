import math

import pytest
import torch

from ayf.math.tangents import jvp_average_velocity
from ayf.nn import Cond, FlowMap
from ayf.nn.unet import UNet, mp_cat, mp_silu, mp_sum


def make_unet(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(img_channels=2, img_resolution=8, channels=8, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(4,), channels_per_head=8, emb_dim=16)
    cfg.update(kw)
    return UNet(**cfg)


def perturb(net, gen, scale=0.3):
    """Adds noise to every weight, so the zero-initialised gains and branches are non-trivial."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))
    return net


def test_unet_flow_map_jvp_matches_central_difference(gen):
    net = perturb(FlowMap(make_unet(), num_classes=3).double(), gen)
    assert any(b.num_heads for b in list(net.backbone.enc.values())[1:]), "attention is exercised"
    x = torch.randn(4, 2, 8, 8, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(4, generator=gen, dtype=torch.float64)
    s = t * torch.rand(4, generator=gen, dtype=torch.float64)
    label = torch.tensor([0, 2, 1, 2])
    dx, dt, ds = torch.randn_like(x), torch.randn_like(t), torch.randn_like(s)
    F_fn = lambda xx, tt, ss, cond=None: net(xx, tt, ss, Cond(label=label))  # noqa: E731
    F, dF = jvp_average_velocity(F_fn, x, t, s, dx, dt, ds)
    with torch.no_grad():
        h = 1e-6
        fd = (F_fn(x + h * dx, t + h * dt, s + h * ds) - F_fn(x - h * dx, t - h * dt, s - h * ds)) / (2 * h)
    assert fd.abs().max() > 1e-2  # the check is not vacuous
    torch.testing.assert_close(dF, fd, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(F, F_fn(x, t, s))


def test_student_from_unet_teacher_starts_at_teacher_velocity(gen):
    teacher = perturb(FlowMap(make_unet(seed=1), s_embedding="none").double(), gen)
    student = FlowMap(make_unet(seed=2)).double()
    student.init_from_teacher(teacher)
    x = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.rand(3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(student(x, t, 0.3 * t), teacher.velocity(x, t))


def test_mp_sum_takes_a_bfloat16_and_a_float32_input(gen):
    # under CUDA bf16 autocast a residual branch comes back bfloat16 while the skip stays float32
    a = torch.randn(5, 4, generator=gen)
    b = torch.randn(5, 4, generator=gen)
    for lo, hi in ((a.bfloat16(), b), (a, b.bfloat16())):
        out = mp_sum(lo, hi, 0.3)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, mp_sum(lo.float(), hi.float(), 0.3))


def test_magnitude_preserving_primitives(gen):
    a = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    assert mp_silu(a).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.02)  # unit RMS
    assert mp_sum(a, b, 0.3).std().item() == pytest.approx(1.0, abs=0.02)
    assert mp_cat(a, b[:, :2], 0.5).pow(2).mean().item() == pytest.approx(1.0, abs=0.02)
    # an untrained U-Net keeps unit-scale activations on unit-scale input
    net = make_unet(channels=16)
    net.out_gain.data.fill_(1.0)
    y = net(torch.randn(64, 2, 8, 8, generator=gen), torch.randn(64, 16, generator=gen))
    assert 0.3 < y.std().item() < 3.0


def test_unet_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        make_unet(img_resolution=6, channel_mult=(1, 2, 2))
    assert math.prod(make_unet().data_shape) == 128


@pytest.mark.gpu
def test_unet_jvp_on_cuda_matches_cpu_float64(gen):
    """On a GPU the forward may use fused attention; the JVP runs on the math kernel."""
    net = perturb(FlowMap(make_unet(), num_classes=3).double(), gen)
    x = torch.randn(4, 2, 8, 8, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(4, generator=gen, dtype=torch.float64)
    s = 0.5 * t
    label = torch.tensor([0, 2, 1, 2])
    dx, dt, ds = torch.randn_like(x), torch.ones_like(t), torch.zeros_like(s)
    ref_F, ref_dF = jvp_average_velocity(net, x, t, s, dx, dt, ds, Cond(label=label))
    gpu = net.float().cuda()
    lab = label.cuda()
    args = [a.float().cuda() for a in (x, t, s, dx, dt, ds)]
    F, dF = jvp_average_velocity(gpu, *args, Cond(label=lab))
    torch.testing.assert_close(F.double().cpu(), ref_F, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(dF.double().cpu(), ref_dF, atol=2e-2, rtol=2e-2)
    with torch.no_grad():  # the ordinary forward (any attention kernel) agrees too
        torch.testing.assert_close(gpu(*args[:3], Cond(label=lab)).double().cpu(), ref_F, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
def test_unet_jvp_under_cuda_bf16_autocast_stays_near_float32(gen):
    """`--trainer.precision bf16-mixed`: the forward and the JVP run and stay within bf16's error."""
    net = perturb(FlowMap(make_unet(), num_classes=3), gen).cuda()
    x, dx = (torch.randn(4, 2, 8, 8, generator=gen).cuda() for _ in range(2))
    t = (0.1 + 0.8 * torch.rand(4, generator=gen)).cuda()
    s, dt, ds = 0.5 * t, torch.ones_like(t), torch.zeros_like(t)
    label = torch.tensor([0, 2, 1, 2]).cuda()
    F_fn = lambda a, b, c, cond=None: net(a, b, c, Cond(label=label))  # noqa: E731
    ref_F, ref_dF = jvp_average_velocity(F_fn, x, t, s, dx, dt, ds)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        F, dF = jvp_average_velocity(F_fn, x, t, s, dx, dt, ds)
    for low, ref in ((F, ref_F), (dF, ref_dF)):
        err = ((low.float() - ref).norm() / ref.norm()).item()
        assert math.isfinite(err) and err < 0.05, err


def unet_emd_loss(gen, device="cpu"):
    """An EMD loss of a U-Net student against a U-Net teacher, and its inputs."""
    from ayf.math.tangents import emd_tangent

    teacher = perturb(FlowMap(make_unet(seed=1), s_embedding="none", num_classes=3), gen).requires_grad_(False)
    student = perturb(FlowMap(make_unet(seed=2), num_classes=3), gen)
    teacher, student = teacher.to(device), student.to(device)
    x = torch.randn(4, 2, 8, 8, generator=gen).to(device)
    t = (0.1 + 0.8 * torch.rand(4, generator=gen)).to(device)
    s = t * torch.rand(4, generator=gen).to(device)
    label = torch.tensor([0, 2, 1, 2]).to(device)

    def loss(x, t, s, r):
        with torch.no_grad():
            v = teacher(x, t, None, Cond(label=label))
        F, g = emd_tangent(student, x, t, s, v, r=r, cond=Cond(label=label))
        return (F - g).square().mean()

    return loss, student, (x, t, s, torch.tensor(0.5, device=device))


def test_torch_compile_traces_the_unet_emd_loss_without_graph_breaks(gen):
    # a graph break splits the compiled step into many small graphs and hides the speed-up
    # (benchmarks/throughput.py --compile); dynamo's trace alone, no inductor codegen
    loss, _, args = unet_emd_loss(gen)
    torch._dynamo.reset()
    report = torch._dynamo.explain(loss)(*args)
    assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons


@pytest.mark.gpu
def test_compiled_unet_emd_loss_on_cuda_matches_eager(gen):
    """`--model.compile true` on a GPU: the compiled loss and its gradients equal the eager ones."""
    loss, student, args = unet_emd_loss(gen, "cuda")
    want = loss(*args)
    want_grads = torch.autograd.grad(want, list(student.parameters()))
    torch._dynamo.reset()
    got = torch.compile(loss, dynamic=False)(*args)
    got_grads = torch.autograd.grad(got, list(student.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)
