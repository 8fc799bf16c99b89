"""NVlabs/edm2's toy autoguidance models as an ayf teacher: a user module of the kind
docs/own_models.md ("A model of your own") describes, named in ``distill.yaml`` by class_path.

edm2's ``ToyModel`` is a score network: it returns ``log p_sigma(x)`` and its score is an autograd
gradient, so the denoiser ``D = x + sigma^2 grad log p`` needs ``needs_grad``; it was trained for
sigma up to 5 (t_max = 0.83), so ayf's samples from t = 1 need ``out_of_range: data_mean``. The
edm2 checkout is found through ``EDM2_DIR`` (its code is not part of ayf).
"""
import os
import sys

import torch

from ayf.nn import DenoiserTeacher, GuidedTeacher

HERE = os.path.dirname(os.path.abspath(__file__))


def toy_example():
    """edm2's ``toy_example`` module, from the checkout at ``$EDM2_DIR``."""
    folder = os.environ.get("EDM2_DIR")
    if not folder or not os.path.isfile(os.path.join(folder, "toy_example.py")):
        raise SystemExit("set EDM2_DIR to a checkout of NVlabs/edm2 (the folder of toy_example.py)")
    sys.path.insert(0, folder)
    import toy_example as module

    return module


class ToyDenoiser(torch.nn.Module):
    """``D(x; sigma) = x + sigma^2 grad log p_sigma(x)`` of an edm2 ``ToyModel`` state dict."""

    def __init__(self, path: str, hidden_dim: int):
        super().__init__()
        self.net = toy_example().ToyModel(hidden_dim=hidden_dim)
        self.net.load_state_dict(torch.load(path, weights_only=True))

    def forward(self, x, sigma, cond=None):
        return x + sigma[:, None] ** 2 * self.net.score(x, sigma)


def toy_teacher(path, hidden_dim, out_of_range, data_mean):
    return DenoiserTeacher(ToyDenoiser(path, hidden_dim), sigma_min=0.002, sigma_max=5.0, data_shape=[2],
                           needs_grad=True, out_of_range=out_of_range, data_mean=data_mean)


class EDM2ToyAutoguidance(GuidedTeacher):
    """edm2's main toy model (64 wide, 4096 iterations) guided by its guide (32 wide, 512)."""

    def __init__(self, main: str = os.path.join(HERE, "weights", "main.pt"),
                 guide: str = os.path.join(HERE, "weights", "guide.pt"),
                 out_of_range: str = "data_mean", data_mean: float = 0.0):
        super().__init__(toy_teacher(main, 64, out_of_range, data_mean), toy_teacher(guide, 32, out_of_range, data_mean))
