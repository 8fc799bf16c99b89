"""Multiple processes on Lightning's DDP strategy (CPU, gloo), each run as a subprocess with a
timeout, so that a hang fails the test instead of stalling the suite.

The default lane checks one optimiser step of every task against a one-process replay and runs the
toy distillation stage end to end; the `ddp` lane (``make test-ddp``) runs every shipped stage kind
through the CLI, ``ayf test`` with FidelityMetrics, and ImageShards' split over two real ranks."""
import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from ayf.cli import main
from tests.edm2_runs import convert
from tests.toy_runs import CONF, ROOT, SMALL_NET, fit_toy, stage_args, toy_args, write_image_data

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
TASKS = ("flow_matching", "distillation", "adversarial", "realignment")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, cwd, timeout):
    """Runs ``cmd`` in its own process group (one thread per process); kills the whole group on
    timeout (Lightning's rank-1 process included) and fails the test. Returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT,
               MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... hung for {timeout} s; last output:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ayf_ddp(args, cwd, timeout=240):
    """``ayf <args>`` on two CPU processes; asserts it exits 0."""
    done = run([sys.executable, "-m", "ayf", *args, *DDP], cwd, timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


# --- one step of every task: equal on both ranks, equal to one process on the combined batch ----
@pytest.fixture(scope="module")
def ddp_steps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_step")
    distilled = fit_toy(tmp / "runs", "distill_emd", "distilled", 3, SMALL_NET)
    edm2 = convert("tiny_uncond", tmp / "edm2.ckpt")
    out = tmp / "out"
    out.mkdir()
    done = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "tests.ddp_step", str(out), distilled, edm2], tmp, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def float_weights(path):
    return {k: v for k, v in torch.load(path, weights_only=True)["after"].items() if v.is_floating_point()}


@pytest.mark.parametrize("task", TASKS)
def test_one_ddp_step_equals_one_process_step_on_the_combined_batch(ddp_steps, task):
    ranks = [torch.load(ddp_steps / f"{task}_rank{r}.pt", weights_only=True) for r in (0, 1)]
    batches = [torch.load(ddp_steps / f"{task}_batch{r}.pt", weights_only=False)["x"] for r in (0, 1)]
    assert not torch.equal(batches[0], batches[1])  # the ranks saw different halves
    # and, left to themselves, would draw different times and noise for them
    streams = [torch.load(ddp_steps / f"{task}_stream{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(streams[0], streams[1])
    replay, control = float_weights(ddp_steps / f"{task}_replay.pt"), float_weights(ddp_steps / f"{task}_control.pt")
    start = {k: v for k, v in ranks[0]["initial"].items() if k in replay}
    moved = max((replay[k] - start[k]).abs().max().item() for k in replay)
    assert moved > 1e-4  # the step did something
    off_control = 0.0
    for key, want in replay.items():
        a, b = ranks[0]["after"][key], ranks[1]["after"][key]
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{task}: {key} differs between the ranks")
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6, msg=f"{task}: {key} differs from the replay")
        off_control = max(off_control, (a - control[key]).abs().max().item())
    # a step that saw only one half lands elsewhere: the comparison can tell the batches apart
    assert off_control > 1e-5, off_control


def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(ddp_steps):
    """skip_nonfinite under DDP: the decision is shared, so neither rank updates (and none hangs)."""
    for r in (0, 1):
        saved = torch.load(ddp_steps / f"skip_rank{r}.pt", weights_only=True)
        assert saved["skipped"] == 1
        for key, value in saved["initial"].items():
            assert torch.equal(saved["after"][key], value), (r, key)


# --- whole runs through the CLI --------------------------------------------------------------
def read_ckpt(run_dir):
    (path,) = glob.glob(os.path.join(str(run_dir), "version_*", "checkpoints", "last.ckpt"))
    return torch.load(path, map_location="cpu", weights_only=False)


def test_toy_distillation_runs_to_the_end_on_two_processes(tmp_path):
    """The shipped EMD stage, with its callbacks (EMA, sample plot, checkpoints), validates
    twice and ends; the checkpoint carries the EMA and the figures exist."""
    ayf_ddp(toy_args(tmp_path, "distill_emd", "ddp", steps=6, extra=[*SMALL_NET, "--trainer.val_check_interval", "3"]),
            tmp_path)
    ckpt = read_ckpt(tmp_path / "ddp")
    assert ckpt["global_step"] == 6
    assert any("EMA" in k for k in ckpt["callbacks"])
    plots = sorted(os.listdir(glob.glob(str(tmp_path / "ddp" / "version_*" / "samples"))[0]))
    assert plots == ["step_0000003.png", "step_0000006.png"]


TOY_STAGES = ["teacher", "distill_lmd", "distill_consistency", "adversarial"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny distilled toy flow map (one process), which the adversarial stage finetunes."""
    return fit_toy(tmp_path_factory.mktemp("distilled"), "distill_emd", "distill_emd", 3, SMALL_NET)


@pytest.mark.ddp
@pytest.mark.parametrize("stage", TOY_STAGES)
def test_every_toy_stage_runs_to_the_end_on_two_processes(tmp_path, distilled, stage):
    extra = SMALL_NET
    if stage == "adversarial":  # 4 optimiser steps = 2 iterations, validation after each
        extra = ["--model.student.init_args.ckpt_path", distilled, "--model.discriminator.init_args.width", "16",
                 "--trainer.val_check_interval", "1"]
    steps = 4 if stage == "adversarial" else 3
    ayf_ddp(toy_args(tmp_path, stage, "ddp", steps=steps, extra=extra), tmp_path)
    assert read_ckpt(tmp_path / "ddp")["global_step"] == steps
    assert glob.glob(str(tmp_path / "ddp" / "version_0" / "samples" / f"step_{steps:07d}.png"))


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    with contextlib.chdir(root):
        write_image_data("digits")
        for stage in ("teacher", "teacher_edm2"):
            assert main(stage_args("digits", stage)) == 0
    return root


@pytest.mark.ddp
def test_realignment_runs_to_the_end_on_two_processes(digits_root):
    ayf_ddp(stage_args("digits", "realign"), digits_root)
    (report,) = glob.glob(str(digits_root / "runs" / "digits" / "realign" / "version_*" / "realignment.json"))
    with open(report) as fh:
        assert len(json.load(fh)["history"]) >= 2  # before, and after the validation at the end
    assert read_ckpt(digits_root / "runs" / "digits" / "realign")["global_step"] == 3


@pytest.mark.ddp
def test_fidelity_metrics_and_grids_on_two_processes_equal_one_process(digits_root):
    """Distillation with ImageGrid and a periodic FidelityMetrics on two processes, then `ayf test`
    with FidelityMetrics on one and on two: each rank generates its share of the fixed noise, and
    the figures equal the one-process run's."""
    fidelity = ["--config", os.path.join(CONF, "digits", "distill_emd_fidelity.yaml")]  # 40 samples, every 3 steps
    fit = [*stage_args("digits", "distill_emd"), *fidelity]
    ayf_ddp(fit, digits_root)
    runs = digits_root / "runs" / "digits" / "distill_emd"
    assert os.path.isfile(runs / "version_0" / "fidelity.jsonl")  # the periodic evaluation at step 3
    assert os.path.isfile(runs / "version_0" / "grids" / "step_0000003.png")
    test = ["test", *fit[1:], "--ckpt_path", str(runs / "version_0" / "checkpoints" / "last.ckpt")]
    results = {}
    for name, extra in (("one", []), ("two", DDP)):
        before = set(os.listdir(runs))
        done = run([sys.executable, "-m", "ayf", *test, *extra], digits_root, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
        (new,) = set(os.listdir(runs)) - before
        with open(runs / new / "fidelity.json") as fh:
            results[name] = json.load(fh)["results"]
    assert {"flow_map_1", "flow_map_8", "teacher_heun_4"} <= set(results["one"])
    assert results["two"].keys() == results["one"].keys()
    for setting, one in results["one"].items():
        for metric, value in one.items():
            assert results["two"][setting][metric] == pytest.approx(value, rel=1e-4, abs=1e-12), (setting, metric)


def test_the_multi_gpu_overlay_layers_over_a_stage(capsys):
    """configs/scale/gpus.yaml (the overlay the README and scripts/slurm.sh use) parses over a stage."""
    import yaml

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", os.path.join(ROOT, "configs", "fashion_mnist", "distill_emd.yaml"),
              "--config", os.path.join(ROOT, "configs", "scale", "gpus.yaml"), "--print_config"])
    assert exit_.value.code == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["strategy"], trainer["devices"], trainer["accelerator"]) == ("ddp", -1, "gpu")
