import pytest
import torch

from ayf.errors import ConfigError
from ayf.tasks import WarmupStableDecay
from tests.toy_runs import SMALL_NET, fit_toy


def lrs_over(steps, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = WarmupStableDecay(opt, **kw)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    return seen, opt, sched


def test_warmup_plateau_then_linear_decay_to_the_floor():
    seen, _, _ = lrs_over(10, warmup_steps=2, decay_start=4, decay_steps=4, final_factor=0.25)
    expected = [0.0, 0.05, 0.1, 0.1, 0.1, 0.08125, 0.0625, 0.04375, 0.025, 0.025, 0.025]
    assert seen == pytest.approx(expected, abs=1e-12)


def test_state_dict_resumes_the_schedule():
    _, _, sched = lrs_over(5, decay_start=3, decay_steps=4)
    fresh_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    resumed = WarmupStableDecay(fresh_opt, decay_start=3, decay_steps=4)
    resumed.load_state_dict(sched.state_dict())
    fresh_opt.step()
    resumed.step()
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 3 / 4))


@pytest.mark.parametrize("kw", [dict(decay_start=2, decay_steps=0), dict(decay_start=1, decay_steps=2, warmup_steps=3),
                                dict(decay_start=2, decay_steps=2, final_factor=1.5)])
def test_bad_schedule_is_a_config_error(kw):
    with pytest.raises(ConfigError):
        lrs_over(0, **kw)


def test_cli_steps_the_schedule_per_batch_and_resumes_it(tmp_path):
    sched = ["--model.lr_scheduler", "ayf.tasks.WarmupStableDecay", "--model.lr_scheduler.decay_start", "3",
             "--model.lr_scheduler.decay_steps", "4", "--model.lr_scheduler.final_factor", "0.5"]
    ckpt = fit_toy(tmp_path, "teacher", "teacher", 5, [*SMALL_NET, *sched])
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["lr_schedulers"][0]["last_epoch"] == 5
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3 * (1 - 0.5 * 2 / 4))
    resumed = fit_toy(tmp_path / "resumed", "teacher", "teacher", 8, [*SMALL_NET, *sched, "--ckpt_path", ckpt])
    state = torch.load(resumed, map_location="cpu", weights_only=False)
    assert state["lr_schedulers"][0]["last_epoch"] == 8
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5)
