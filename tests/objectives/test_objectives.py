"""The distillation objectives: the warmup r reaches the tangent, the tangent is normalised, and
the condition (labels, lam) reaches the teacher and the student (docs/maths.md §3-§6)."""
import pytest
import torch

from ayf.errors import ConfigError
from ayf.math.tangents import emd_tangent
from ayf.nn import MLP, Cond, FlowMap, GuidedTeacher, NetTeacher
from ayf.objectives import EMD, LMD, Batch, Consistency, State
from ayf.tasks import FlowMapDistillation


def nets(gen, classes=0, guidance_input=False):
    """A teacher and a student whose every weight is non-trivial (as after training)."""
    torch.manual_seed(0)
    teacher = FlowMap(MLP(2, 16, 2, 8), s_embedding="none", num_classes=classes).double()
    student = FlowMap(MLP(2, 16, 2, 8), num_classes=classes, guidance_input=guidance_input).double()
    with torch.no_grad():
        for p in [*teacher.parameters(), *student.parameters()]:
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return NetTeacher(teacher, unconditional=True), student


def inputs(gen, n=32):
    x0 = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64)
    s = t * torch.rand(n, generator=gen, dtype=torch.float64)
    return x0, eps, t, s


def test_emd_tangent_is_affine_in_r_and_uses_it(gen):
    teacher, student = nets(gen)
    x0, eps, t, s = inputs(gen)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    v = teacher(x_t, t)
    g = {r: emd_tangent(student, x_t, t, s, v, r=r)[1] for r in (0.0, 0.5, 1.0)}
    assert (g[1.0] - g[0.0]).norm() > 1e-3 * g[0.0].norm(), "the tangent ignores r"
    torch.testing.assert_close(g[0.5], (g[0.0] + g[1.0]) / 2, rtol=1e-10, atol=1e-12)


def test_the_tasks_warmup_r_reaches_the_loss(gen):
    teacher, student = nets(gen)
    task = FlowMapDistillation(student, teacher, init_from_teacher=False, tangent_norm=0.0)
    batch = {"x": torch.randn(64, 2, generator=gen, dtype=torch.float64)}
    losses = []
    for r in (0.0, 0.9):
        task.tangent_r = r  # what the TangentWarmup callback sets
        torch.manual_seed(1)  # the same (t, s) and noise for both
        per, _ = task.objective(task.net, task.to_batch(batch), task.objective_state())
        losses.append(per)
    assert not torch.allclose(losses[0], losses[1]), "the warmup r does not reach the tangent"


@pytest.mark.parametrize("kind", [EMD, LMD, Consistency])
def test_the_loss_regresses_onto_the_normalised_tangent(gen, kind):
    teacher, student = nets(gen)
    c = 0.3
    objective = kind(teacher, tangent_norm=c)
    x0, eps, t, s = inputs(gen)
    if kind is Consistency:
        s = torch.zeros_like(s)
    r = torch.tensor(0.7, dtype=torch.float64)
    per, stats = objective.compute(student, x0, Cond(), eps, t, s, r=r)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    _, g = objective.tangent(student, x_t, t, s, Cond(), r)
    norm = g.norm(dim=1)
    # F - stopgrad(F + g / (|g| + c)) has squared norm |g|^2 / (|g| + c)^2; the mean over D = 2
    torch.testing.assert_close(per, norm.pow(2) / (norm + c).pow(2) / 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats["tangent_norm"], norm.mean())
    assert (norm > 0.05).all()  # a normalisation that is skipped would show


def test_consistency_trains_at_s_zero_only(gen):
    teacher, _ = nets(gen)
    t, s = Consistency(teacher).pairs(torch.zeros(1000, 2))
    assert (s == 0).all() and (t > 0).all()
    t, s = EMD(teacher).pairs(torch.zeros(1000, 2))
    assert (s > 0).float().mean() > 0.5


def test_the_objective_hands_labels_and_lam_to_teacher_and_student(gen):
    strong, student = nets(gen, classes=3, guidance_input=True)
    weak, _ = nets(torch.Generator().manual_seed(5), classes=3)
    objective = EMD(GuidedTeacher(strong, weak), tangent_norm=0.0)
    x0, eps, t, s = inputs(gen)
    label = torch.randint(3, (len(t),), generator=gen)
    r = torch.tensor(0.5, dtype=torch.float64)

    def loss(cond):
        return objective.compute(student, x0, cond, eps, t, s, r=r)[0]

    base = Cond(label=label, lam=torch.full_like(t, 2.0))
    assert not torch.allclose(loss(base), loss(base.with_(label=(label + 1) % 3))), "the label is dropped"
    assert not torch.allclose(loss(base), loss(base.with_(lam=torch.full_like(t, 3.0)))), "lam is dropped"
    # the lam that draw() puts in the condition is the one the loss uses
    objective.guidance_range = (1.5, 2.5)
    cond, _ = objective.draw(Batch(x0, Cond(label=label)))
    assert cond.lam.min() >= 1.5 and cond.lam.max() <= 2.5 and torch.equal(cond.label, label)


def test_state_default_is_the_full_warmup():
    assert State().r == 0.99


@pytest.mark.parametrize("kind", [EMD, LMD])
def test_shared_primal_gives_the_same_loss_and_gradient_with_one_forward_pass_fewer(gen, kind):
    """shared_primal takes F from the JVP's own primal: same loss and parameter gradient as the
    second forward pass (float64), and the student's forward runs once per step instead of twice."""
    teacher, student = nets(gen)
    x0, eps, t, s = inputs(gen)
    calls = []
    student.register_forward_hook(lambda *_: calls.append(1))
    results = {}
    for shared in (False, True):
        objective = kind(teacher, tangent_norm=0.1, weighting="inv_gap", shared_primal=shared)
        calls.clear()
        per, _ = objective.terms(student, x0, Cond(), eps, t, s, r=torch.tensor(0.7, dtype=torch.float64))
        student.zero_grad()
        per.mean().backward()
        results[shared] = per.detach(), [p.grad.clone() for p in student.parameters()], len(calls)
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results[False], results[True]
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-14)
    assert max(g.abs().max() for g in grads0) > 1e-3, "the check needs a non-zero gradient"
    for a, b in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (calls0, calls1) == (2, 1), (calls0, calls1)


@pytest.mark.parametrize("pick", ["random", "longest"])
def test_the_semigroup_share_regresses_onto_the_two_jump_map(gen, pick):
    """semigroup: a share of the batch (its first examples, or its longest jumps) regresses onto
    the frozen student's two-jump map through the midpoint, normalised like the tangent
    (docs/maths.md §12); the rest, and pairs with s = t, keep the tangent target; the gradient
    flows through F only."""
    teacher, student = nets(gen)
    c = 0.3
    x0, eps, t, s = inputs(gen)
    k = len(t) // 2
    if pick == "random":
        chosen = torch.arange(len(t)) < k
        s[1] = t[1]  # a diagonal pair among the semigroup examples
    else:
        chosen = torch.zeros(len(t), dtype=torch.bool)
        chosen[torch.topk(t - s, k).indices] = True
    r = torch.tensor(0.7, dtype=torch.float64)
    objective = FlowMapDistillation(student, teacher, init_from_teacher=False, tangent_norm=c, semigroup=0.5,
                                    semigroup_pick=pick).objective
    assert (objective.semigroup, objective.semigroup_pick) == (0.5, pick)
    per, stats = objective.terms(student, x0, Cond(), eps, t, s, r=r)
    student.zero_grad()
    per.mean().backward()
    grads = [p.grad.clone() for p in student.parameters()]

    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    F = student(x_t, t, s)
    _, g = objective.tangent(student, x_t, t, s, Cond(), r)
    with torch.no_grad():
        u = (t + s) / 2
        F_tu = student(x_t, t, u)
        x_u = x_t + (u - t)[:, None] * F_tu
        gap = (F_tu + student(x_u, u, s)) / 2 - F
    off = chosen & (t > s)
    step = torch.where(off[:, None], gap, g)
    step = step / (step.norm(dim=1, keepdim=True) + c)
    reference = (F - (F.detach() + step)).pow(2).mean(dim=1)
    torch.testing.assert_close(per, reference, rtol=1e-10, atol=1e-12)
    assert (gap[off] - g[off]).norm(dim=1).min() > 1e-3, "the two targets must differ to tell them apart"
    torch.testing.assert_close(stats["semigroup_gap"], gap[chosen].norm(dim=1).mean())
    student.zero_grad()
    reference.mean().backward()
    for a, b in zip(grads, [p.grad for p in student.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_semigroup_settings_are_checked(gen):
    teacher, _ = nets(gen)
    with pytest.raises(ConfigError, match="share of the batch"):
        EMD(teacher, semigroup=1.5)
    with pytest.raises(ConfigError, match="consistency"):
        Consistency(teacher, semigroup=0.25)
    with pytest.raises(ConfigError, match="semigroup_pick"):
        EMD(teacher, semigroup=0.25, semigroup_pick="shortest")
