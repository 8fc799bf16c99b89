"""Slow lane (`make test-slow`): train the toy flow map and check that it learned."""
import glob

import pytest
import torch

from ayf.checkpoints import load_network
from ayf.cli import main
from ayf.math.samplers import sample_euler, sample_flow_map
from ayf.math.times import time_grid
from ayf.metrics.toy import exact_endpoints, load_mixture


@pytest.mark.slow
def test_emd_flow_map_learns_the_toy_mixture(tmp_path):
    args = ["fit", "--config", "configs/toy/distill_emd.yaml", "--trainer.max_steps", "2000",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false"]
    assert main(args) == 0
    (ckpt,) = glob.glob(str(tmp_path / "distill_emd" / "version_*" / "checkpoints" / "last.ckpt"))
    net, _ = load_network(ckpt)
    oracle = load_mixture("configs/toy/data.yaml")
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    exact = exact_endpoints(oracle, noise)
    with torch.no_grad():
        x4 = sample_flow_map(net, noise, time_grid(4).float())
        euler4 = sample_euler(lambda a, t, cond: oracle.velocity(a.double(), t.double()).float(), noise, time_grid(4).float())
    dist = lambda x: (x.double() - exact).norm(dim=1).median().item()  # noqa: E731
    assert dist(x4) < dist(euler4)  # better than the exact teacher at the same NFE
    data_logp = oracle.log_prob(oracle.sample(2000)).mean().item()
    assert oracle.log_prob(x4.double()).mean().item() > data_logp - 0.5
