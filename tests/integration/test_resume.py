"""Exact resume: N steps equal N/2 steps, a resume from last.ckpt and N/2 more, bit for bit (CPU,
seed_everything, deterministic mode): the weights, the EMA, the optimiser and the learning-rate
schedule, with the tangent warmup r moving at every step."""
import glob
import os

import pytest
import torch

from ayf.cli import main
from tests.toy_runs import SMALL_NET, fit_toy, toy_args

# a decaying learning rate from step 2, so that the schedule's position matters
SCHEDULE = ["--model.lr_scheduler", "ayf.tasks.WarmupStableDecay", "--model.lr_scheduler.decay_start", "2",
            "--model.lr_scheduler.decay_steps", "20", "--model.lr_scheduler.final_factor", "0.1"]
DETERMINISTIC = ["--trainer.deterministic", "true"]


def last(tmp, name):
    (path,) = glob.glob(os.path.join(str(tmp), name, "version_*", "checkpoints", "last.ckpt"))
    return path


def run(tmp, stage, name, steps, extra, ckpt=None, val_every=None):
    args = toy_args(tmp, stage, name, steps=steps, extra=[*extra, *DETERMINISTIC])
    if val_every is not None:
        args += ["--trainer.val_check_interval", str(val_every)]
    if ckpt is not None:
        args += ["--ckpt_path", ckpt]
    assert main(args) == 0
    return torch.load(last(tmp, name), map_location="cpu", weights_only=True)


def assert_same_run(a, b):
    assert a["global_step"] == b["global_step"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    (ema_a,), (ema_b,) = ([v for k, v in c["callbacks"].items() if "EMA" in k] for c in (a, b))
    assert ema_a["step"] == ema_b["step"]
    for key, value in ema_a["ema"].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(ema_b["ema"][key])), f"EMA {key}"
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for p, state in opt_a["state"].items():
            for k, v in state.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b["state"][p][k])), (p, k)
    assert a.get("lr_schedulers") == b.get("lr_schedulers")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    return fit_toy(tmp_path_factory.mktemp("distilled"), "distill_emd", "distill_emd", 3, SMALL_NET)


@pytest.mark.parametrize("stage", ["distill_emd", "adversarial"])
def test_half_a_run_then_a_resume_is_the_whole_run_bit_for_bit(tmp_path, stage, distilled):
    if stage == "adversarial":
        # 12 optimiser steps = 6 iterations; the 256 points make 8 batches an epoch
        # (this task has no learning-rate schedule)
        extra, steps, val_every = ["--model.student.init_args.ckpt_path", distilled, "--model.discriminator.init_args.width", "16"], 12, 3
    else:
        # 10 steps: the first half stops in the middle of the first epoch, the second crosses into the next
        extra, steps, val_every = [*SMALL_NET, *SCHEDULE], 10, 5
    whole = run(tmp_path, stage, "whole", steps, extra, val_every=val_every)
    run(tmp_path, stage, "half", steps // 2, extra, val_every=val_every)
    resumed = run(tmp_path, stage, "resumed", steps, extra, ckpt=last(tmp_path, "half"), val_every=val_every)
    assert_same_run(whole, resumed)
    # and the comparison can fail: a run with another seed is another run
    other = run(tmp_path, stage, "other", steps, [*extra, "--seed_everything", "1"], val_every=val_every)
    with pytest.raises(AssertionError):
        assert_same_run(whole, other)
