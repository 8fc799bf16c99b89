"""The distillation objectives: the warm-up r (a function of the training step) reaches the
tangent, the tangent is normalised, and the condition (labels, lam) reaches the teacher and the
student (docs/maths.md §3-§6)."""
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


def bound(kind, teacher, **settings):
    """An objective of class ``kind`` with the teacher handed to it, as a task does."""
    objective = kind(**settings)
    objective.bind(teacher)
    return objective


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


def test_the_warmup_follows_the_training_step_into_the_loss(gen):
    teacher, student = nets(gen)
    objective = bound(EMD, teacher, tangent_norm=0.0, warmup=1000)
    batch = Batch(torch.randn(64, 2, generator=gen, dtype=torch.float64), Cond())
    losses, ratios = [], []
    for step in (0, 900, 5000):
        torch.manual_seed(1)  # the same (t, s) and noise for each
        per, stats = objective(student, batch, State(step=step))
        losses.append(per)
        ratios.append(float(stats["tangent_r"]))
    assert ratios == pytest.approx([0.0, 0.9, 0.99])
    assert not torch.allclose(losses[0], losses[1]), "the warm-up r does not reach the tangent"
    assert bound(EMD, teacher, warmup=0).ratio(0) == 0.99  # no warm-up: r_max from the first step


def test_the_task_hands_its_step_to_the_objective(gen):
    teacher, student = nets(gen)
    task = FlowMapDistillation(student, teacher, EMD(warmup=1000), init_from_teacher=False)
    assert task.state().step == 0
    task.checkpoint_step = 700  # ayf test: the schedules stand where the checkpoint's training left them
    assert task.state().step == 700


@pytest.mark.parametrize("kind", [EMD, LMD, Consistency])
def test_the_loss_regresses_onto_the_normalised_tangent(gen, kind):
    teacher, student = nets(gen)
    c = 0.3
    objective = bound(kind, teacher, tangent_norm=c)
    x0, eps, t, s = inputs(gen)
    if kind is Consistency:
        s = torch.zeros_like(s)
    r = torch.tensor(0.7, dtype=torch.float64)
    per, stats = objective.compute(student, x0, Cond(), eps, t, s, r)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    _, g = objective.tangent(student, x_t, t, s, Cond(), r)
    norm = g.norm(dim=1)
    # F - stopgrad(F + g / (|g| + c)) has squared norm |g|^2 / (|g| + c)^2; the mean over D = 2
    torch.testing.assert_close(per, norm.pow(2) / (norm + c).pow(2) / 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats["tangent_norm"], norm.mean())
    assert (norm > 0.05).all()  # a normalisation that is skipped would show


def test_consistency_trains_at_s_zero_only(gen):
    teacher, _ = nets(gen)
    t, s = bound(Consistency, teacher).pairs(torch.zeros(1000, 2))
    assert (s == 0).all() and (t > 0).all()
    t, s = bound(EMD, teacher).pairs(torch.zeros(1000, 2))
    assert (s > 0).float().mean() > 0.5


def test_the_objective_hands_labels_and_lam_to_teacher_and_student(gen):
    strong, student = nets(gen, classes=3, guidance_input=True)
    weak, _ = nets(torch.Generator().manual_seed(5), classes=3)
    objective = bound(EMD, GuidedTeacher(strong, weak), tangent_norm=0.0, guidance_range=(1.5, 2.5))
    x0, eps, t, s = inputs(gen)
    label = torch.randint(3, (len(t),), generator=gen)
    r = torch.tensor(0.5, dtype=torch.float64)

    def loss(cond):
        return objective.compute(student, x0, cond, eps, t, s, r)[0]

    base = Cond(label=label, lam=torch.full_like(t, 2.0))
    assert not torch.allclose(loss(base), loss(base.with_(label=(label + 1) % 3))), "the label is dropped"
    assert not torch.allclose(loss(base), loss(base.with_(lam=torch.full_like(t, 3.0)))), "lam is dropped"
    # the lam that draw() puts in the condition is the one the loss uses
    cond, _ = objective.draw(Batch(x0, Cond(label=label)), State())
    assert cond.lam.min() >= 1.5 and cond.lam.max() <= 2.5 and torch.equal(cond.label, label)


def test_the_student_reads_lam_where_the_guided_teacher_does_not_move_it(gen):
    """A guided teacher whose weak model is the strong one gives the same velocity at every lam:
    what lam changes in the loss then is the student's own guidance input, which the objective
    must hand it (a student called without lam would make the loss blind to it)."""
    strong, student = nets(gen, classes=3, guidance_input=True)
    objective = bound(EMD, GuidedTeacher(strong, strong), tangent_norm=0.0)
    x0, eps, t, s = inputs(gen)
    label = torch.randint(3, (len(t),), generator=gen)
    r = torch.tensor(0.5, dtype=torch.float64)
    base = Cond(label=label, lam=torch.full_like(t, 1.5))
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    torch.testing.assert_close(objective.teacher(x_t, t, base), objective.teacher(x_t, t, base.with_(lam=3 * base.lam)))
    low = objective.compute(student, x0, base, eps, t, s, r)[0]
    high = objective.compute(student, x0, base.with_(lam=3 * base.lam), eps, t, s, r)[0]
    assert (low - high).abs().max() > 1e-4 * low.abs().max(), "the student's lam does not reach the loss"


def test_state_starts_at_step_zero():
    assert State().step == 0


class FirstPick(EMD):
    """The two-jump target on the first examples of the batch (the hook that the ablation's
    random pick overrides), so that a diagonal pair can be among them."""

    def two_jump_examples(self, t, s, k):
        return torch.arange(k)


@pytest.mark.parametrize("pick", ["first", "longest"])
def test_the_semigroup_share_regresses_onto_the_two_jump_map(gen, pick):
    """semigroup: a share of the batch (its first examples, or its longest jumps) regresses onto
    the frozen student's two-jump map through the midpoint, normalised like the tangent
    (docs/maths.md §12); the rest, and pairs with s = t, keep the tangent target; the gradient
    flows through F only."""
    teacher, student = nets(gen)
    c = 0.3
    x0, eps, t, s = inputs(gen)
    k = len(t) // 2
    if pick == "first":
        chosen = torch.arange(len(t)) < k
        s[1] = t[1]  # a diagonal pair among the semigroup examples
    else:
        chosen = torch.zeros(len(t), dtype=torch.bool)
        chosen[torch.topk(t - s, k).indices] = True
    r = torch.tensor(0.7, dtype=torch.float64)
    kind = FirstPick if pick == "first" else EMD
    objective = FlowMapDistillation(student, teacher, kind(tangent_norm=c, semigroup=0.5), init_from_teacher=False).objective
    assert objective.semigroup == 0.5
    per, stats = objective.terms(student, x0, Cond(), eps, t, s, r)
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


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="share of the batch"):
        EMD(semigroup=1.5)
    with pytest.raises(ConfigError, match="consistency"):
        Consistency(semigroup=0.25)
    with pytest.raises(ConfigError, match="weighting"):
        EMD(weighting="gap")
    with pytest.raises(ConfigError, match="warmup"):
        EMD(warmup=-1)
