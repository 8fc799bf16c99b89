"""Training objectives as objects with one signature: ``objective(net, batch, state) ->
(per-example loss (B,), stats)``. Each owns what defines it: the teacher call, the (t, s) draw,
the tangent and its warm-up, normalisation and weighting. Tasks take them by ``class_path``, wire
them once and log."""
from ayf.objectives.adversarial import RpGAN
from ayf.objectives.base import Batch, Objective, State
from ayf.objectives.distillation import EMD, LMD, AdaptiveWeight, Consistency, DistillationObjective
from ayf.objectives.flow_matching import FlowMatchingObjective
from ayf.objectives.realignment import RealignmentObjective

__all__ = ["Batch", "State", "Objective", "FlowMatchingObjective", "DistillationObjective", "EMD", "LMD",
           "Consistency", "AdaptiveWeight", "RpGAN", "RealignmentObjective"]
