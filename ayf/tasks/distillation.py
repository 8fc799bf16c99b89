"""FlowMapDistillation: a frozen teacher distilled into a flow map (docs/maths.md §3-§5)."""
from __future__ import annotations

from typing import Optional

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ayf.checkpoints import CheckpointFlowMap
from ayf.errors import ConfigError
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import Teacher
from ayf.objectives import DistillationObjective
from ayf.tasks.flow_maps import FlowMapTask, student_for


class FlowMapDistillation(FlowMapTask):
    """Distils a frozen teacher into a flow map ``f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)``.

    Args:
        net: the student FlowMap; default: the teacher's recorded architecture with the s branch
            (and, for a guided teacher, the guidance input) added.
        teacher: frozen velocity model: a CheckpointTeacher, a GuidedTeacher or the analytic MixtureTeacher.
        objective: the distillation objective, with its own settings: ``ayf.objectives.EMD``
            (AYF-EMD, default), ``ayf.objectives.LMD`` (AYF-LMD) or ``ayf.objectives.Consistency``
            (s = 0 only, a continuous-time consistency model).
        init_from_teacher: copy the teacher's weights into the student before training (default:
            when the teacher is a network and the net is not an ``ayf.checkpoints.CheckpointFlowMap``,
            which continues from a distilled checkpoint's weights).
        optimizer: optimiser factory (default Adam, lr 1e-3).
        lr_scheduler: optional learning-rate scheduler factory, stepped every batch.
        sample_guidance: lam of validation, plots and ``ayf test`` for a guided teacher (default:
            the middle of the objective's guidance_range); ``ayf test --guidance`` overrides it.
        skip_nonfinite: non-finite losses in a row to skip before training stops (0: stop at the first).
    """

    kind = "FlowMapDistillation"

    def __init__(
        self,
        net: Optional[FlowMap] = None,
        teacher: Optional[Teacher] = None,
        objective: Optional[DistillationObjective] = None,
        init_from_teacher: Optional[bool] = None,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        sample_guidance: Optional[float] = None,
        skip_nonfinite: int = 0,
    ):
        super().__init__(optimizer, lr_scheduler, skip_nonfinite)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if net is None and teacher is not None:
            net, self._net_config = student_for(teacher)
        self.attach(net, teacher, objective, sample_guidance)
        teacher_net = getattr(teacher, "net", None)
        if init_from_teacher is None:
            init_from_teacher = isinstance(teacher_net, FlowMap) and not isinstance(net, CheckpointFlowMap)
        if init_from_teacher:
            if not isinstance(teacher_net, FlowMap):
                raise ConfigError(f"init_from_teacher needs a network teacher; {type(teacher).__name__} has none "
                                  "(set init_from_teacher: false)")
            self.check_shapes()
            net.init_from_teacher(teacher_net)
