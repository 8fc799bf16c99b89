"""Settings that cannot run here each give one line (``ayf: error: ...``), before any work."""
import os
import subprocess
import sys

import pytest
import torch

from ayf.cli import main
from tests.toy_runs import ROOT, SMALL_NET, toy_args

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def one_line_error(capsys, args):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ayf: error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--trainer.strategy", "fsdp", "--trainer.devices", "2"], "strategy fsdp needs GPUs"),
    (["--trainer.devices", str((os.cpu_count() or 1) + 1)], "this machine has"),
    (["--trainer.accelerator", "gpu", "--trainer.devices", str(GPUS + 1)],
     "no GPU is visible" if GPUS == 0 else "this machine has"),
    (["--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.init_args.global_batch_size", "33"],
     "global_batch_size 33 does not split over 2 processes"),
    (["--trainer.accumulate_grad_batches", "2", "--data.init_args.global_batch_size", "33"],
     "global_batch_size 33 does not split over 1 processes x 2 accumulated batches"),
    (["--trainer.strategy", "no_such_strategy"], "trainer: "),
])
def test_impossible_device_settings(tmp_path, capsys, extra, message):
    assert message in one_line_error(capsys, toy_args(tmp_path, "teacher", steps=2, extra=[*SMALL_NET, *extra]))


def test_a_global_batch_splits_over_the_devices(tmp_path):
    """global_batch_size 64 with 2 accumulated batches trains on batches of 32."""
    import glob

    assert main(toy_args(tmp_path, "teacher", "g", steps=2, extra=[
        *SMALL_NET, "--trainer.accumulate_grad_batches", "2", "--data.init_args.global_batch_size", "64"])) == 0
    (hp,) = glob.glob(str(tmp_path / "g" / "version_0" / "config.yaml"))
    assert "global_batch_size: 64" in open(hp).read()


def test_compile_where_the_compiler_cannot_run_is_one_line(tmp_path):
    """No working C++ compiler for the CPU backend (a fresh process: the compile caches are per process)."""
    env = dict(os.environ, CXX="/nonexistent/c++", TORCHINDUCTOR_FX_GRAPH_CACHE="0", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT)
    args = toy_args(tmp_path, "teacher", steps=2, extra=[*SMALL_NET, "--model.compile", "true"])
    done = subprocess.run([sys.executable, "-m", "ayf", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("ayf: error:")]
    assert len(lines) == 1 and "torch.compile cannot compile for cpu" in lines[0] and "Traceback" not in done.stderr
