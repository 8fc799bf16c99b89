"""Guided teachers (autoguidance, CFG), label dropout and lam-conditioned students (docs/maths.md §6)."""
import lightning as L
import pytest
import torch

from ayf.data import GaussianMixture
from ayf.errors import ConfigError
from ayf.math.guidance import guided_velocity
from ayf.nn import MLP, NULL_LABEL, Cond, FlowMap, GuidedTeacher, Teacher
from ayf.objectives import EMD
from ayf.tasks import FlowMapDistillation, FlowMatching

MIX = {"means": [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "stds": [0.3, 0.3, 0.3], "weights": [0.4, 0.3, 0.3]}


class NetTeacher(Teacher):
    """A class-conditional network teacher built in-process."""

    def __init__(self, seed=1, width=32, dim=2, classes=2, unconditional=True):
        super().__init__()
        torch.manual_seed(seed)
        self.net = FlowMap(MLP(dim, width, 2, 16), s_embedding="none", num_classes=classes).double()
        self.data_shape, self.num_classes, self.unconditional = (dim,), classes, unconditional

    def forward(self, x, t, cond=None):
        return self.net.velocity(x, t, cond)


def inputs(n=16, classes=2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    return x, t, Cond(label=torch.randint(classes, (n,), generator=g))


def test_guided_velocity_formula_and_lam_one():
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    lam = torch.tensor([0.0, 1.0, 1.5, 2.0, 3.0], dtype=torch.float64)
    out = guided_velocity(a, b, lam)
    for i in range(5):
        expected = [lam[i].item() * a[i, j].item() + (1 - lam[i].item()) * b[i, j].item() for j in range(3)]
        assert out[i].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert torch.equal(guided_velocity(a, b, 1.0), a)
    assert torch.equal(guided_velocity(a, b, 0.0), b)


def test_autoguidance_teacher_combines_strong_and_weak():
    strong, weak = NetTeacher(seed=1), NetTeacher(seed=2, width=8)
    guided = GuidedTeacher(strong, weak)
    x, t, label = inputs()
    lam = torch.linspace(1, 3, len(x), dtype=torch.float64)
    expected = lam[:, None] * strong(x, t, label) + (1 - lam[:, None]) * weak(x, t, label)
    torch.testing.assert_close(guided(x, t, label.with_(lam=lam)), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(guided(x, t, label.with_(lam=torch.ones_like(t))), strong(x, t, label))
    assert not torch.allclose(guided(x, t, label.with_(lam=lam)), strong(x, t, label))


def test_an_unconditional_weak_model_guides_a_conditional_teacher_and_other_tasks_are_refused():
    """EDM2's classifier-free guidance: a separate unconditional network is the weak model."""
    strong, weak = NetTeacher(seed=1), NetTeacher(seed=2, width=8, classes=0)
    guided = GuidedTeacher(strong, weak)
    x, t, label = inputs()
    expected = 2 * strong(x, t, label) - weak(x, t, Cond())
    torch.testing.assert_close(guided(x, t, label.with_(lam=torch.full_like(t, 2.0))), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="weak teacher has 3 classes but the teacher has 2"):
        GuidedTeacher(strong, NetTeacher(seed=2, classes=3))


def test_cfg_teacher_uses_the_null_label_prediction():
    strong = NetTeacher()
    guided = GuidedTeacher(strong)
    x, t, label = inputs()
    uncond = strong(x, t, Cond(label=torch.full_like(label.label, NULL_LABEL)))
    lam = Cond.build(len(x), lam=2.0, dtype=x.dtype).lam
    torch.testing.assert_close(guided(x, t, label.with_(lam=lam)), 2 * strong(x, t, label) - uncond, rtol=1e-12, atol=1e-12)
    assert torch.equal(guided(x, t, label.with_(lam=torch.ones_like(lam))), strong(x, t, label))


def test_null_label_gives_no_class_embedding():
    net = FlowMap(MLP(2, 16, 1, 8), s_embedding="none", num_classes=3).double()
    x, t, _ = inputs(4)
    null = torch.full((4,), NULL_LABEL)
    before = net.velocity(x, t, Cond(label=null))
    with torch.no_grad():
        net.label_emb.weight.normal_()
    assert torch.equal(net.velocity(x, t, Cond(label=null)), before)
    assert not torch.allclose(net.velocity(x, t, Cond(label=torch.zeros(4, dtype=torch.long))), before)


def test_label_dropout_drops_the_share_asked_for_in_training_only():
    task = FlowMatching(FlowMap(MLP(2, 8, 1, 8), s_embedding="none", num_classes=3), label_dropout=0.3)
    label = torch.randint(3, (20000,))
    text = torch.randn(20000, 2, 3)
    torch.manual_seed(0)
    cond = task.objective.drop_conditions(Cond(label=label, text=text), 20000, "cpu")
    dropped = cond.label
    share = (dropped == NULL_LABEL).float().mean().item()
    assert 0.28 < share < 0.32
    kept = dropped != NULL_LABEL
    assert torch.equal(dropped[kept], label[kept])
    assert torch.equal(cond.null_text, ~kept) and cond.text is text  # the prompt drops with the label
    task.eval()
    assert task.objective.drop_conditions(Cond(label=label), 20000, "cpu").label is label


def test_label_dropout_trains_the_unconditional_branch(tmp_path):
    torch.manual_seed(0)
    dm = GaussianMixture(MIX, batch_size=64, train_samples=256, val_samples=64)
    net = FlowMap(MLP(2, 16, 1, 8), s_embedding="none", num_classes=3)
    task = FlowMatching(net, label_dropout=0.5)
    seen = []
    net.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[3].label.clone()), with_kwargs=True)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, limit_val_batches=0).fit(task, datamodule=dm)
    labels = torch.cat(seen)
    assert len(labels) == 128 and 0.35 < (labels == NULL_LABEL).float().mean() < 0.65
    assert set(labels[labels >= 0].tolist()) == {0, 1, 2}
    task.set_sample_guidance(2.0)  # accepted: the teacher learned the unconditional velocity
    x = torch.randn(8, 2)
    assert torch.isfinite(task.generate(x, 2, label=torch.zeros(8, dtype=torch.long))).all()


def test_cfg_without_label_dropout_is_rejected():
    task = FlowMatching(FlowMap(MLP(2, 8, 1, 8), s_embedding="none", num_classes=3))
    with pytest.raises(ConfigError, match="label_dropout"):
        task.set_sample_guidance(2.0)
    with pytest.raises(ConfigError, match="label_dropout"):
        GuidedTeacher(NetTeacher(unconditional=False))


@pytest.mark.parametrize("weak, match", [
    (lambda: NetTeacher(seed=2, dim=3), "data shape"),
    (lambda: NetTeacher(seed=2, classes=5), "classes"),
])
def test_weak_teacher_of_another_task_is_rejected(weak, match):
    with pytest.raises(ConfigError, match=match):
        GuidedTeacher(NetTeacher(), weak())


def guided_student(classes=2):
    return FlowMap(MLP(2, 32, 2, 16), s_embedding="t_minus_s", num_classes=classes, guidance_input=True).double()


def test_guided_student_starts_as_the_strong_teacher_for_every_lam():
    strong = NetTeacher()
    task = FlowMapDistillation(guided_student(), GuidedTeacher(strong, NetTeacher(seed=2, width=8)))
    x, t, label = inputs()
    s = t * torch.rand(len(t), dtype=torch.float64)
    for lam in (1.0, 2.0, 3.0):
        F = task.net(x, t, s, label.with_(lam=torch.full_like(t, lam)))
        torch.testing.assert_close(F, strong(x, t, label), rtol=1e-12, atol=1e-12)
    assert task.sample_guidance == 2.0


def test_student_and_teacher_must_agree_about_guidance():
    with pytest.raises(ConfigError, match="guidance_input: true"):
        FlowMapDistillation(FlowMap(MLP(2, 32, 2, 16), num_classes=2).double(), GuidedTeacher(NetTeacher()))
    with pytest.raises(ConfigError, match="not guided"):
        FlowMapDistillation(guided_student(), NetTeacher())
    with pytest.raises(ConfigError, match="guidance_range"):
        FlowMapDistillation(guided_student(), GuidedTeacher(NetTeacher()), EMD(guidance_range=[3.0, 1.0]))


def test_guided_distillation_targets_the_guided_teacher_with_lam_held_fixed(monkeypatch):
    """The loss sees lam drawn in range, the teacher's guided velocity at that lam, and a JVP
    whose lam tangent is zero (a student whose output depends on lam only through a constant)."""
    strong, weak = NetTeacher(), NetTeacher(seed=2, width=8)
    task = FlowMapDistillation(guided_student(), GuidedTeacher(strong, weak),
                               EMD(guidance_range=[1.5, 2.5], tangent_norm=0.0))
    seen = {}
    original = task.objective.terms

    def spy(net, x0, cond, *drawn):
        seen["lam"] = cond.lam
        return original(net, x0, cond, *drawn)

    monkeypatch.setattr(task.objective, "terms", spy)
    batch = {"x": torch.randn(256, 2, dtype=torch.float64), "label": torch.randint(2, (256,))}
    task.loss(batch, "train")
    lam = seen["lam"]
    assert lam.shape == (256,) and lam.min() >= 1.5 and lam.max() <= 2.5 and lam.std() > 0.2
    # at init F = v_strong for all s, so at s = t the loss is || v_strong - v_guided ||^2 / D
    x0, eps = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64)
    label = Cond(label=torch.randint(2, (8,)))
    cond = label.with_(lam=torch.full((8,), 2.0, dtype=torch.float64))
    per, _ = original(task.net, x0, cond, eps, t, t, torch.tensor(1.0, dtype=torch.float64))
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    gap = strong(x_t, t, label) - (2 * strong(x_t, t, label) - weak(x_t, t, label))
    torch.testing.assert_close(per, gap.pow(2).mean(1), rtol=1e-10, atol=1e-12)
