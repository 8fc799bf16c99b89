"""Kill-safety: `ayf fit` SIGKILLed in the middle of training, or while a checkpoint is being
written (made slow by tests/slow_io.py), then restarted with ``--ckpt_path last``: every checkpoint
file on disk loads, the restart loses no step before the last checkpoint, and the final weights
equal an uninterrupted run's."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ayf.cli import main
from tests.toy_runs import ROOT, SMALL_NET, toy_args

STEPS, EVERY = 60, 20


def overlay(tmp, slow_steps):
    """The shipped toy callbacks (configs/toy/base.yaml) with a checkpoint every EVERY steps (all
    kept, and last), and for the killed run a slow step."""
    with open(os.path.join(ROOT, "configs", "toy", "base.yaml")) as fh:
        callbacks = yaml.safe_load(fh)["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"].update(every_n_train_steps=EVERY)
    if slow_steps:
        callbacks.append({"class_path": "tests.slow_io.SlowSteps", "init_args": {"seconds": 0.05}})
    path = tmp / f"callbacks{'_slow' if slow_steps else ''}.yaml"
    path.write_text(yaml.safe_dump({"trainer.callbacks": callbacks}))
    return ["--config", str(path)]


def args(tmp, name, *extra):
    return toy_args(tmp, "distill_emd", name, steps=STEPS, extra=[*SMALL_NET, "--trainer.deterministic", "true", *extra])


def wait_for(pattern, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        found = glob.glob(pattern)
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {pattern} appeared:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"{pattern} did not appear in {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    assert main([*args(tmp, "whole"), *overlay(tmp, False)]) == 0
    (path,) = glob.glob(str(tmp / "whole" / "version_0" / "checkpoints" / "last.ckpt"))
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("moment", ["training", "checkpoint_write"])
def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted, moment):
    markers = tmp_path / "markers"
    markers.mkdir()
    killed = [*args(tmp_path, "run"), *overlay(tmp_path, True),
              "--trainer.plugins+=tests.slow_io.SlowCheckpointIO", f"--trainer.plugins.markers={markers}",
              "--trainer.plugins.seconds=1.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "ayf", *killed], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        if moment == "checkpoint_write":  # in the middle of writing the step-40 last.ckpt (the 4th file)
            wait_for(str(markers / f"writing_4_step{2 * EVERY}"), proc)
            time.sleep(0.4)
        else:  # between the step-20 checkpoints and the step-40 ones
            wait_for(str(markers / f"done_2_step{EVERY}"), proc)
            time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # every checkpoint file on disk loads, and the last one is the newest that was completed
    files = glob.glob(str(tmp_path / "run" / "version_0" / "checkpoints" / "*.ckpt"))
    steps = {os.path.basename(f): torch.load(f, map_location="cpu", weights_only=True)["global_step"] for f in files}
    done = sorted(int(m.rsplit("step", 1)[1]) for m in os.listdir(markers) if m.startswith("done_"))
    assert steps["last.ckpt"] == EVERY and steps["last.ckpt"] >= done[-1] - EVERY, (steps, done)
    leftovers = [f for f in os.listdir(tmp_path / "run" / "version_0" / "checkpoints") if ".tmp" in f]
    if moment == "checkpoint_write":  # the kill landed mid-write: the old last.ckpt is whole, the new one never appeared
        assert not any(m.startswith("done_4") for m in os.listdir(markers))
        assert steps[f"epoch=4-step={2 * EVERY}.ckpt"] == 2 * EVERY
        assert leftovers == [".last.ckpt.tmp" + str(proc.pid)]
    else:
        assert leftovers == []
    # the restart (same command, --ckpt_path last) ends where the uninterrupted run ended
    assert main([*args(tmp_path, "run"), *overlay(tmp_path, False), "--ckpt_path", "last"]) == 0
    (final,) = glob.glob(str(tmp_path / "run" / "version_1" / "checkpoints" / "last.ckpt"))
    final = torch.load(final, map_location="cpu", weights_only=True)
    assert final["global_step"] == STEPS
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key


def test_resuming_last_with_nothing_to_resume_is_a_one_line_error(tmp_path, capsys):
    assert main([*args(tmp_path, "fresh"), "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert "ayf: error: --ckpt_path last: no checkpoint matches" in err and "Traceback" not in err
