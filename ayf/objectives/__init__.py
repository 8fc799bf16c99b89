"""Training objectives as objects with one signature: ``objective(net, batch, state) ->
(per-example loss (B,), stats)``. Each owns what defines it: the teacher call, the (t, s) draw,
the tangent normalisation, the weighting and the adaptive weight. Tasks wire them and log."""
from ayf.objectives.adversarial import RpGAN
from ayf.objectives.base import Batch, Objective, State
from ayf.objectives.distillation import (
    EMD,
    LMD,
    OBJECTIVES,
    AdaptiveWeight,
    Consistency,
    DistillationObjective,
    distillation_objective,
)
from ayf.objectives.flow_matching import FlowMatchingObjective
from ayf.objectives.realignment import RealignmentObjective

__all__ = ["Batch", "State", "Objective", "FlowMatchingObjective", "DistillationObjective", "EMD", "LMD",
           "Consistency", "AdaptiveWeight", "RpGAN", "RealignmentObjective", "OBJECTIVES",
           "distillation_objective"]
