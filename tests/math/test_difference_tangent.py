"""The tangent by a finite difference (``tangent_method: forward / central``) against the exact
JVP, in float64: on the Gaussian oracle (a perturbed map, so that the tangent is not zero) and on
each backbone, with the error's order in the step (halving h divides a central difference's error
by about 4, a forward difference's by about 2)."""
import os

import pytest
import torch

from ayf.math import GaussianOracle, emd_tangent, lmd_tangent
from ayf.nn import Cond

C = 0.5


def batch(gen, n=64, dim=2, shape=None):
    shape = shape or (dim,)
    x0 = C * torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(n, generator=gen, dtype=torch.float64)
    s = t * torch.rand(n, generator=gen, dtype=torch.float64)
    tt = t.view(-1, *([1] * len(shape)))
    return (1 - tt) * x0 + tt * eps, t, s


def errors(tangent, steps, method):
    """Max abs error of the difference tangent against the JVP's, at each step h."""
    _, exact = tangent("jvp", 1e-3)
    return [float((tangent(method, h)[1] - exact).abs().max()) / float(exact.abs().max()) for h in steps]


def gaussian_tangents(gen, kind):
    oracle = GaussianOracle(std=C, dim=2)
    x, t, s = batch(gen)

    def F_fn(a, b, c, cond=None):  # the exact map, perturbed in x, t and s: a tangent to measure
        return oracle.average_velocity(a, b, c) + 0.2 * torch.sin(2 * a) * (1 + b * c)[:, None] + 0.1 * (b - c)[:, None] ** 2

    v = oracle.velocity(x, t)
    if kind == "emd":
        return lambda method, h: emd_tangent(F_fn, x, t, s, v, r=1.0, method=method, step=h)
    return lambda method, h: lmd_tangent(F_fn, oracle.velocity, x, t, s, method=method, step=h)


@pytest.mark.parametrize("kind", ["emd", "lmd"])
def test_a_difference_tangent_converges_to_the_jvp_at_its_order_on_the_gaussian(gen, kind):
    tangent = gaussian_tangents(gen, kind)
    central = errors(tangent, (4e-3, 2e-3, 1e-3), "central")
    forward = errors(tangent, (4e-3, 2e-3, 1e-3), "forward")
    assert central[-1] < 1e-5 and forward[-1] < 1e-2, (central, forward)
    for e in (central, forward):
        assert all(a > b for a, b in zip(e, e[1:], strict=False))
    assert 3.5 < central[0] / central[1] < 4.5 and 3.5 < central[1] / central[2] < 4.5, central  # O(h^2)
    assert 1.8 < forward[0] / forward[1] < 2.2 and 1.8 < forward[1] / forward[2] < 2.2, forward  # O(h)


def mlp_student():
    from ayf.nn import MLP, FlowMap

    return FlowMap(MLP(data_dim=2, width=32, depth=2, emb_dim=16), num_classes=3, guidance_input=True), (2,)


def unet_student():
    from ayf.nn import FlowMap, UNet

    return FlowMap(UNet(img_channels=1, img_resolution=8, channels=8, channel_mult=[1, 2], num_blocks=1,
                        channels_per_head=8, emb_dim=16), num_classes=3, guidance_input=True), (1, 8, 8)


def edm2_student(tmp):
    from ayf.checkpoints import build_network, read_checkpoint, student_config
    from tests.edm2_runs import convert

    teacher = read_checkpoint(convert("tiny_cond", os.path.join(tmp, "t.ckpt")))["ayf"]["net"]
    return build_network(student_config(teacher, guidance_input=True)), (2, 8, 8)


def diffusers_student(tmp):
    pytest.importorskip("diffusers")
    from ayf.nn import FlowMap
    from ayf.nn.diffusers import DiffusersBackbone
    from tests.export_checks import tiny_unet2d

    model = tiny_unet2d(num_class_embeds=3)
    # a flow-matching schedule: a DDPM one is interpolated between its discrete timesteps, whose
    # kinks a difference across them does not see the way the JVP does
    backbone = DiffusersBackbone(model, scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler"})
    return FlowMap(backbone), (1, 8, 8)


@pytest.mark.parametrize("backbone", ["mlp", "unet", "edm2", "diffusers"])
def test_a_difference_tangent_matches_the_jvp_on_every_backbone(gen, tmp_path, backbone):
    """Every weight away from its (partly zero) start, so that x, t, s, the label and lam all move
    F; the EMD tangent along the teacher's velocity (here: any fixed field) and the LMD one."""
    make = {"mlp": mlp_student, "unet": unet_student, "edm2": lambda: edm2_student(str(tmp_path)),
            "diffusers": lambda: diffusers_student(str(tmp_path))}[backbone]
    torch.manual_seed(1)
    net, shape = make()
    net = net.double().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_((0.5 if name.split(".")[0].endswith("_emb") or name.endswith("gain") else 0.05) * torch.randn_like(p))
    x, t, s = batch(gen, n=8, shape=shape)
    labels = torch.arange(8) % 3
    lam = 1 + 2 * torch.rand(8, generator=gen, dtype=torch.float64) if net.guidance_emb is not None else None
    cond = Cond(label=labels if net.num_classes else None, lam=lam)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    emd = lambda method, h: emd_tangent(net, x, t, s, v, r=1.0, cond=cond, method=method, step=h)  # noqa: E731
    lmd = lambda method, h: lmd_tangent(net, lambda a, b, c: v, x, t, s, cond=cond, method=method, step=h)  # noqa: E731
    # small steps: the time embeddings reach high frequencies (docs/maths.md §3); diffusers embeds
    # its timestep in float32 whatever the model's dtype, so there the step stays larger
    (central_h, central_tol), (forward_h, forward_tol) = (
        (((4e-4, 2e-4), 1e-2), ((2e-4, 1e-4), 5e-2)) if backbone == "diffusers"
        else (((2e-5, 1e-5), 5e-4), ((2e-6, 1e-6), 1e-3)))
    for tangent in (emd, lmd):
        central = errors(tangent, central_h, "central")
        assert central[1] < central_tol and 3 < central[0] / central[1] < 5, central
        forward = errors(tangent, forward_h, "forward")
        assert forward[1] < forward_tol and 1.6 < forward[0] / forward[1] < 2.4, forward


def test_the_objectives_take_the_method_and_refuse_a_bad_one():
    from ayf.errors import ConfigError
    from ayf.objectives import EMD, LMD, Consistency

    for cls in (EMD, LMD, Consistency):
        assert cls(tangent_method="central", difference_step=1e-3).tangent_method == "central"
        assert cls(tangent_method="central").difference_step == 3e-4  # float32's sweet spots
        assert cls(tangent_method="forward").difference_step == 1e-4
    with pytest.raises(ConfigError, match="unknown tangent_method 'jvpp'"):
        EMD(tangent_method="jvpp")
    with pytest.raises(ConfigError, match="difference_step"):
        EMD(tangent_method="forward", difference_step=0.0)


@pytest.mark.parametrize("objective", ["EMD", "LMD"])
def test_the_objective_computes_its_tangent_the_way_it_is_told(gen, objective):
    """The objective's own tangent: a central difference of a small step is the JVP's, a large
    step is not (so the option reaches the derivative), and the trainable F is the same."""
    import ayf.objectives as objectives
    from ayf.nn import MLP, FlowMap, NetTeacher

    torch.manual_seed(0)
    student = FlowMap(MLP(data_dim=2, width=16, depth=1, emb_dim=8)).double()
    with torch.no_grad():
        for p in student.s_emb.parameters():
            p.add_(0.5 * torch.randn_like(p))
    teacher = NetTeacher(FlowMap(MLP(data_dim=2, width=16, depth=1, emb_dim=8), s_embedding="none").double())
    x, t, s = batch(gen, n=16)
    r = torch.tensor(0.7, dtype=torch.float64)
    out = {}
    for method, h in (("jvp", 1e-3), ("central", 1e-5), ("central", 0.2)):
        obj = getattr(objectives, objective)(tangent_method=method, difference_step=h)
        obj.bind(teacher)
        out[method, h] = obj.tangent(student, x, t, s, Cond(), r)
    (F_jvp, g_jvp), (F_small, g_small), (_, g_big) = out.values()
    torch.testing.assert_close(F_small, F_jvp)
    torch.testing.assert_close(g_small, g_jvp, rtol=1e-4, atol=1e-5)
    assert (g_big - g_jvp).abs().max() > 1e-3
