"""Pure tensor maths of Align Your Flow (Sabour, Fidler, Kreis 2025).

Everything here imports torch only. Time convention (docs/maths.md §1): ``t = 0`` is data,
``t = 1`` is noise, ``x_t = (1 - t) x0 + t eps`` and the velocity is ``E[eps - x0 | x_t]``.
"""
from ayf.math.analytic import GaussianOracle, MixtureOracle
from ayf.math.flow_map import apply_flow_map, average_velocity, bcast, two_jump_velocity
from ayf.math.frechet import frechet_distance, gaussian_w2, mmd_rbf
from ayf.math.guidance import guided_velocity
from ayf.math.losses import (
    adaptive_weighted_loss,
    flow_map_loss,
    flow_matching_loss,
    r1_penalty,
    rpgan_discriminator_loss,
    rpgan_generator_loss,
)
from ayf.math.path import (
    interpolate,
    sigma_to_t,
    t_to_sigma,
    velocity_target,
)
from ayf.math.samplers import (
    sample_consistency,
    sample_euler,
    sample_flow_map,
    sample_heun,
)
from ayf.math.tangents import (
    emd_tangent,
    jvp_average_velocity,
    lmd_tangent,
    normalize_tangent,
    warmup_ratio,
)
from ayf.math.times import TimePairSampler, check_grid, logit_normal, time_grid

__all__ = [name for name in dir() if not name.startswith("_")]
