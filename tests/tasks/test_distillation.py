import lightning as L
import pytest
import torch

from ayf.callbacks import EMA
from ayf.data import GaussianMixture
from ayf.errors import ConfigError, NonFiniteLossError
from ayf.nn import MLP, Cond, FlowMap, MixtureTeacher, Teacher
from ayf.objectives import EMD, LMD, Consistency
from ayf.tasks import FlowMapDistillation

MIX = {"means": [[-1.0, 0.0], [1.0, 0.0]], "stds": [0.3, 0.3], "weights": [0.5, 0.5]}


class NetTeacher(Teacher):
    """A network teacher built in-process (CheckpointTeacher's shape without the file)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = FlowMap(MLP(2, 32, 2, 16), s_embedding="none")
        self.data_shape = (2,)

    def forward(self, x, t, cond=None):
        return self.net.velocity(x, t)


def student():
    return FlowMap(MLP(2, 32, 2, 16), s_embedding="t_minus_s")


def data(**kw):
    return GaussianMixture(MIX, batch_size=64, train_samples=256, val_samples=128, **kw)


def trainer(tmp_path, steps=4, callbacks=()):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     default_root_dir=tmp_path, callbacks=list(callbacks), enable_model_summary=False,
                     limit_val_batches=1, num_sanity_val_steps=0)


@pytest.mark.parametrize("objective", [EMD, LMD, Consistency])
def test_teacher_gets_no_gradient_and_is_absent_from_checkpoint(tmp_path, objective):
    teacher = NetTeacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = FlowMapDistillation(student(), teacher, objective=objective())
    seen = {}

    class Spy(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            seen["teacher_grads"] = [p.grad for p in pl_module.teacher.parameters()]
            seen["student_grad"] = sum(p.grad.abs().sum() for p in pl_module.net.parameters() if p.grad is not None)
            seen["teacher_training"] = pl_module.teacher.training

    tr = trainer(tmp_path, callbacks=[Spy(), EMA(0.9)])
    tr.fit(task, datamodule=data())
    assert all(g is None for g in seen["teacher_grads"]) and seen["student_grad"] > 0
    assert seen["teacher_training"] is False
    assert all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])
    opt_params = {id(p) for g in tr.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    path = tmp_path / "x.ckpt"
    tr.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["state_dict"] and not [k for k in ckpt["state_dict"] if k.startswith("teacher")]
    assert ckpt["callbacks"]["EMA"]["ema"] is not None
    # a fresh task reloads the checkpoint (teacher keys filled from its own teacher)
    again = FlowMapDistillation(student(), NetTeacher(), objective=objective(), init_from_teacher=False)
    again.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(again.net.state_dict(), task.net.state_dict())


def test_warmup_follows_global_step_after_resume(tmp_path):
    task = FlowMapDistillation(student(), MixtureTeacher(), EMD(warmup=10))
    tr = trainer(tmp_path, steps=3)
    tr.fit(task, datamodule=data())
    tr.save_checkpoint(tmp_path / "a.ckpt")
    task2 = FlowMapDistillation(student(), MixtureTeacher(), EMD(warmup=10))
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, float(trainer.callback_metrics["train/tangent_r"])))

    tr2 = trainer(tmp_path, steps=5, callbacks=[Spy()])
    tr2.fit(task2, datamodule=data(), ckpt_path=tmp_path / "a.ckpt")
    assert seen[0][0] == 4 and seen[0][1] == pytest.approx(0.3)  # the batch of step 3 (global_step 4 after it)


def test_the_default_objective_is_emd_with_the_papers_warmup():
    task = FlowMapDistillation(student(), MixtureTeacher(MIX))
    assert type(task.objective) is EMD and task.objective.warmup == 10_000 and task.objective.ratio(5000) == 0.5


def test_mismatched_teacher_and_data_dimensions(tmp_path):
    teacher = MixtureTeacher({"means": [[0.0, 0.0, 0.0]], "stds": [1.0], "weights": [1.0]})
    task = FlowMapDistillation(student(), teacher)
    with pytest.raises(ConfigError, match=r"teacher data shape \(3,\) and data shape \(2,\) disagree"):
        trainer(tmp_path).fit(task, datamodule=data())


def test_a_missing_teacher_is_named():
    with pytest.raises(ConfigError, match="needs a teacher"):
        FlowMapDistillation(student())


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    task = FlowMapDistillation(student(), MixtureTeacher())

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    next(pl_module.net.parameters()).fill_(float("nan"))

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=1)
    tr = trainer(tmp_path, steps=10, callbacks=[Poison(), ckpt])
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 3"):
        tr.fit(task, datamodule=data())
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_compiled_loss_matches_eager_and_does_not_recompile_as_r_moves_or_in_validation():
    torch.manual_seed(0)
    teacher = NetTeacher()
    eager = FlowMapDistillation(student(), teacher)
    compiled = FlowMapDistillation(student(), teacher, EMD(compile=True))
    compiled.net.load_state_dict(eager.net.state_dict())
    x0 = torch.randn(64, 2)
    t = torch.rand(64)
    s = t * torch.rand(64)
    eps = torch.randn(64, 2)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for r in (0.0, 0.37, 0.99):
            rt = torch.tensor(r)
            want, want_stats = eager.objective.compute(eager.net, x0, Cond(), eps, t, s, rt)
            got, got_stats = compiled.objective.compute(compiled.net, x0, Cond(), eps, t, s, rt)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_stats["tangent_norm"], want_stats["tangent_norm"], rtol=1e-5, atol=1e-6)
        # validation runs without grad: eagerly, so it adds no second compilation
        with torch.no_grad():
            got, _ = compiled.objective.compute(compiled.net, x0, Cond(), eps, t, s, rt)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
