"""A teacher of the user's own, named by class_path in a config (docs/own_models.md, "A model of
your own"): a score model of N(0, c^2 I) whose denoiser takes its own autograd gradient,
``D = x + sigma^2 grad log p``, valid up to a small sigma_max."""
import torch

from ayf.nn import DenoiserTeacher


class GaussianScore(torch.nn.Module):
    """``log p_sigma(x) = -||x||^2 / (2 (c^2 + sigma^2))``; ``D`` through its autograd gradient."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, sigma, cond=None):
        x = x.detach().requires_grad_(True)
        s2 = (sigma.to(x.dtype) ** 2)[:, None]
        (grad,) = torch.autograd.grad((-(x ** 2) / (2 * (self.c ** 2 + s2))).sum(), x)
        return x + s2 * grad


class GaussianScoreTeacher(DenoiserTeacher):
    """The score model as an ayf teacher.

    Args:
        c: the data's standard deviation.
        sigma_max: the largest noise level the model knows.
    """

    def __init__(self, c: float = 0.5, sigma_max: float = 5.0):
        super().__init__(GaussianScore(c), sigma_min=0.002, sigma_max=sigma_max, out_of_range="data_mean",
                         needs_grad=True, data_shape=[2])
