"""AdversarialFinetuning: separate generator / discriminator steps, resume, EMA continuation."""
import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ayf.callbacks import EMA
from ayf.checkpoints import CheckpointFlowMap, read_checkpoint
from ayf.data import GaussianMixture
from ayf.errors import AyfError, ConfigError
from ayf.nn import Cond, MixtureTeacher, MLPDiscriminator
from ayf.nn.discriminator import ImageDiscriminator, minibatch_std
from ayf.objectives import EMD, RpGAN
from ayf.tasks import AdversarialFinetuning
from tests.toy_runs import SMALL_NET, fit_toy

MIX = {"means": [[-1.0, 0.0], [1.0, 0.0]], "stds": [0.3, 0.3], "weights": [0.5, 0.5]}


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distilled")
    teacher = fit_toy(tmp, "teacher", "teacher", 3, SMALL_NET)
    return fit_toy(tmp, "distill_emd", "distill_emd", 4, [*SMALL_NET, "--model.teacher", "ayf.checkpoints.CheckpointTeacher",
                                                            "--model.teacher.ckpt_path", teacher]), teacher


def task_from(path, weights="ema", adversary=None, **kw):
    return AdversarialFinetuning(CheckpointFlowMap(path, weights), MixtureTeacher(MIX), MLPDiscriminator(2, 32, 2),
                                 adversary=adversary or RpGAN(lambda_adv=1.0), **kw)


def data():
    return GaussianMixture(MIX, batch_size=32, train_samples=256, val_samples=64)


def trainer(tmp_path, steps, callbacks=(), **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     default_root_dir=tmp_path, callbacks=list(callbacks), enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, **kw)


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


@pytest.mark.parametrize("step", ["discriminator", "generator"])
def test_each_step_changes_only_its_own_network(tmp_path, distilled, step):
    task = task_from(distilled[0])
    net0, d0 = weights(task.net), weights(task.discriminator)
    seen = {}

    def only_one(batch, batch_idx):
        getattr(task, f"{step}_step")(batch)
        seen["d_grads"] = [p.grad for p in task.discriminator.parameters()]
        seen["g_grads"] = [p.grad for p in task.net.parameters()]

    task.training_step = only_one
    trainer(tmp_path, 1, enable_checkpointing=False).fit(task, datamodule=data())
    if step == "discriminator":
        # every weight moves except the output bias, which cancels in D(real) - D(fake)
        assert changed(net0, task.net) == []
        assert set(d0) - set(changed(d0, task.discriminator)) == {"head.out.bias"}
        assert all(g is None for g in seen["g_grads"])
    else:
        assert changed(d0, task.discriminator) == [] and len(changed(net0, task.net)) > 0
        assert all(g is None for g in seen["d_grads"])
    assert all(p.requires_grad for p in task.net.parameters())
    assert all(p.requires_grad for p in task.discriminator.parameters())


def test_starts_from_the_distilled_weights_and_continues_its_ema(tmp_path, distilled):
    ckpt = read_checkpoint(distilled[0])
    ema_state = ckpt["callbacks"]["EMA"]["ema"]
    task = task_from(distilled[0])
    for k, v in task.net.state_dict().items():
        assert torch.equal(v, ema_state[k])
    raw = task_from(distilled[0], weights="raw")
    for k, v in raw.net.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"net.{k}"])
    ema = EMA(0.9)
    seen = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen["net_before"] = weights(pl_module.net)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                seen["ema_after"] = weights(ema.ema)
                seen["net_after"] = weights(pl_module.net)

    trainer(tmp_path, 2, [ema, Spy()], enable_checkpointing=False).fit(task, datamodule=data())
    assert ema.continued and ema.decay_at(0) == 0.9
    # the first update after one iteration: ema = 0.9 * distilled_ema + 0.1 * net (no warm-up)
    key = next(k for k, v in ema_state.items() if v.dtype.is_floating_point and not torch.equal(seen["net_after"][k], v))
    torch.testing.assert_close(seen["ema_after"][key], 0.9 * ema_state[key] + 0.1 * seen["net_after"][key])


def test_resume_restores_both_optimisers_and_the_ema(tmp_path, distilled):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    trainer(tmp_path, 4, [EMA(0.99), ckpt_cb]).fit(task_from(distilled[0]), datamodule=data())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4 and len(saved["optimizer_states"]) == 2
    assert saved["ayf"]["kind"] == "AdversarialFinetuning" and isinstance(saved["ayf"]["net"], dict)
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])
    assert any(k.startswith("discriminator.") for k in saved["state_dict"])
    seen = {}
    ema = EMA(0.99)

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["opts"] = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]
            seen["ema"] = weights(ema._ensure(pl_module))
            seen["step"] = trainer.global_step

    task = task_from(distilled[0])
    trainer(tmp_path, 6, [ema, Spy()], enable_checkpointing=False).fit(task, datamodule=data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert seen["step"] == 4
    for live, stored in zip(seen["opts"], saved["optimizer_states"], strict=True):
        assert len(live["state"]) == len(stored["state"]) > 0
        for i, st in stored["state"].items():
            assert torch.equal(live["state"][i]["exp_avg"], st["exp_avg"])
            assert torch.equal(live["state"][i]["exp_avg_sq"], st["exp_avg_sq"])
    for k, v in saved["callbacks"]["EMA"]["ema"].items():
        assert torch.equal(seen["ema"][k], v)
    assert saved["callbacks"]["EMA"]["continued"] is True and ema.continued


def test_a_teacher_checkpoint_is_refused(distilled):
    with pytest.raises(AyfError, match="FlowMatching checkpoint"):
        task_from(distilled[1])


def test_discriminator_must_match_the_flow_map(distilled):
    with pytest.raises(ConfigError, match="classes"):
        AdversarialFinetuning(CheckpointFlowMap(distilled[0]), MixtureTeacher(MIX), MLPDiscriminator(2, 8, 1, num_classes=3))
    with pytest.raises(ConfigError, match="data shape"):
        AdversarialFinetuning(CheckpointFlowMap(distilled[0]), MixtureTeacher(MIX), MLPDiscriminator(3, 8, 1))


def test_minibatch_std_matches_a_hand_computation():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    out = minibatch_std(x, group_size=3)  # groups {0, 2, 4} and {1, 3, 5}
    assert out.shape == (6, 4, 4, 4) and torch.equal(out[:, :3], x)
    for members in ([0, 2, 4], [1, 3, 5]):
        expected = (x[members].var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        for i in members:
            torch.testing.assert_close(out[i, 3], torch.full((4, 4), expected.item(), dtype=torch.float64))
    assert minibatch_std(torch.randn(5, 2), 4).shape == (5, 3)  # 5 examples: groups of one


def test_image_discriminator_projection_uses_the_label():
    torch.manual_seed(0)
    d = ImageDiscriminator(1, 16, channels=8, channel_mult=[1, 2], num_classes=3)
    with torch.no_grad():
        d.head.embed.weight.normal_()
    x = torch.randn(4, 1, 16, 16)
    a, b = d(x, torch.zeros(4, dtype=torch.long)), d(x, torch.ones(4, dtype=torch.long))
    assert a.shape == (4,) and not torch.allclose(a, b)
    assert len(d.blocks) == 2  # 16 -> 8 -> 4


def test_fake_steps_follow_the_schedule_from_its_global_steps():
    adversary = RpGAN(fake_steps=[1], fake_steps_schedule={8: [1, 2, 4], "4": [2]})
    # two optimiser steps per iteration; each list is used in turn from the step it starts at
    assert [adversary.steps_at(g) for g in range(0, 16, 2)] == [1, 1, 2, 2, 1, 2, 4, 1]
    assert adversary.steps_at(9) == 1 and adversary.steps_at(11) == 2
    assert RpGAN(fake_steps=[1, 8]).steps_at(3) == 8
    assert RpGAN(fake_steps=[1], fake_steps_schedule={0: [2]}).steps_at(0) == 2


@pytest.mark.parametrize("kw", [{"fake_steps": []}, {"fake_steps_schedule": {10: [0]}},
                                {"fake_steps_schedule": {-2: [1]}}, {"lambda_adv": -1.0}])
def test_bad_fake_steps_or_weights_are_refused(kw):
    with pytest.raises(ConfigError, match="fake_steps|lambda_adv"):
        RpGAN(**kw)


def test_the_regression_term_has_no_warmup_by_default_and_no_consistency_objective(distilled):
    assert task_from(distilled[0]).objective.ratio(0) == 0.99
    from ayf.objectives import Consistency

    with pytest.raises(ConfigError, match="not Consistency"):
        task_from(distilled[0], objective=Consistency())


def test_compile_runs_the_regression_term_compiled_and_matches_eager(distilled):
    eager, compiled = task_from(distilled[0]), task_from(distilled[0], objective=EMD(compile=True))
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 2, generator=gen), torch.randn(64, 2, generator=gen)
    t = torch.rand(64, generator=gen)
    s = t * torch.rand(64, generator=gen)
    torch._dynamo.reset()
    want, want_stats = eager.objective.compute(eager.net, x0, Cond(), eps, t, s, torch.tensor(0.5))
    got, got_stats = compiled.objective.compute(compiled.net, x0, Cond(), eps, t, s, torch.tensor(0.5))
    want_norm, got_norm = want_stats["tangent_norm"], got_stats["tangent_norm"]
    assert compiled.objective._compiled is not None and eager.objective._compiled is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_norm, want_norm, rtol=1e-5, atol=1e-6)
