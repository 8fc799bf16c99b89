"""FlowMapDistillation: AYF-EMD / AYF-LMD / continuous consistency (docs/maths.md §3-§5)."""
from __future__ import annotations

from typing import List, Optional

from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from ayf.errors import ConfigError
from ayf.math.times import TimePairSampler
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import Teacher
from ayf.tasks.flow_maps import FlowMapTask, student_for


class FlowMapDistillation(FlowMapTask):
    """Distils a frozen teacher into a flow map ``f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)``.

    Args:
        net: the student FlowMap (the teacher's backbone with an s embedding); default: the
            teacher checkpoint's recorded architecture with the s branch (and, for a guided
            teacher, the guidance input) added.
        teacher: frozen velocity model: a CheckpointTeacher, a GuidedTeacher or the analytic MixtureTeacher.
        objective: ``emd`` (AYF-EMD, default), ``lmd`` (AYF-LMD) or ``consistency`` (s = 0 only,
            a continuous-time consistency model trained with the EMD tangent).
        weighting: per-example weight: ``none`` (F-space), ``f_space`` ((t - s)^2), ``gap`` (t - s),
            ``inv_gap`` (1 / (t - s + 0.05)) or ``adaptive`` (docs/maths.md §3).
        tangent_norm: constant c of the tangent normalisation ``g / (||g|| + c)``; 0 disables it.
        time_sampler: (t, s) pair sampler (default: logit-normal t, uniform s).
        init_from_teacher: copy the teacher's weights into the student before training (default:
            when the teacher is a network).
        optimizer: optimiser factory (default Adam, lr 1e-3).
        lr_scheduler: optional learning-rate scheduler factory, stepped every batch.
        compile: run the loss computation (teacher, JVP, forward) through ``torch.compile``;
            the first step compiles. See benchmarks/cost.py.
        guidance_range: ``[lo, hi]`` of the guidance scale lam drawn per example (uniformly) for
            a guided teacher (ayf.nn.GuidedTeacher); the student (``guidance_input: true``) learns
            every lam in it. Paper: [1, 3].
        sample_guidance: lam of validation, plots and ``ayf test`` (default: the middle of
            guidance_range); ``ayf test --guidance`` overrides it.
        mask_nonfinite: give examples whose tangent is not finite a zero loss (counted in
            ``train/masked``) instead of letting them make the batch's loss NaN.
        jvp_float32: in mixed precision, compute the student's JVP in float32 (default) rather
            than under autocast.
        shared_primal: take the trainable prediction from the JVP's own forward pass instead of
            a second one (MeanFlow-style): one forward pass fewer per step, the same gradient, but
            autograd then records the tangent arithmetic too (more memory; no gain on CPU). See
            benchmarks/throughput.py --shared_primal.
        semigroup: share of each batch trained on the student's own two-jump map (through the
            midpoint of t and s) instead of the tangent: a self-consistency target that carries
            the quality of short jumps to long ones (docs/maths.md §12). 0 (default): plain AYF.
        semigroup_pick: which examples take it: ``random`` (default) or ``longest`` (the longest
            jumps of each batch).
        nonfinite: what a non-finite loss does: ``stop`` training (default; the last checkpoint
            is untouched) or ``skip`` the step (no update; counted in ``train/skipped_steps``).
        max_skips: with ``skip``, stop after this many non-finite steps in a row.
    """

    kind = "FlowMapDistillation"

    def __init__(
        self,
        net: Optional[FlowMap] = None,
        teacher: Optional[Teacher] = None,
        objective: str = "emd",
        weighting: str = "none",
        tangent_norm: float = 0.1,
        time_sampler: Optional[TimePairSampler] = None,
        init_from_teacher: Optional[bool] = None,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        compile: bool = False,
        mask_nonfinite: bool = False,
        jvp_float32: bool = True,
        shared_primal: bool = False,
        semigroup: float = 0.0,
        semigroup_pick: str = "random",
        nonfinite: str = "stop",
        max_skips: int = 10,
        guidance_range: List[float] = (1.0, 3.0),
        sample_guidance: Optional[float] = None,
    ):
        super().__init__(optimizer, lr_scheduler, compile, nonfinite, max_skips)
        if teacher is None:
            raise ConfigError("FlowMapDistillation needs a teacher (--model.teacher)")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self._net_config = None
        if net is None:
            net, self._net_config = student_for(teacher)
        self.wire(net, teacher, objective, sample_guidance, time_sampler=time_sampler, tangent_norm=tangent_norm,
                  weighting=weighting, guidance_range=guidance_range, mask_nonfinite=mask_nonfinite,
                  jvp_float32=jvp_float32, shared_primal=shared_primal, semigroup=semigroup, semigroup_pick=semigroup_pick)
        teacher_net = getattr(teacher, "net", None)
        if init_from_teacher is None:
            init_from_teacher = isinstance(teacher_net, FlowMap)
        if init_from_teacher:
            if not isinstance(teacher_net, FlowMap):
                raise ConfigError(f"init_from_teacher needs a network teacher; {type(teacher).__name__} has none (set init_from_teacher: false)")
            self.check_shapes()
            net.init_from_teacher(teacher_net)

    def net_config(self):
        return super().net_config() or self._net_config

    def training_step(self, batch, batch_idx):
        self.log("train/tangent_r", float(self.tangent_r))
        return super().training_step(batch, batch_idx)
