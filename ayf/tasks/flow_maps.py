"""What the two flow-map tasks (distillation, adversarial finetuning) share: a student flow map,
a distillation objective bound to the frozen teacher, and sampling of both."""
from __future__ import annotations

import torch

from ayf.checkpoints import build_network, student_config, teacher_net_config
from ayf.errors import ConfigError
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import Teacher
from ayf.objectives import EMD, DistillationObjective
from ayf.sampling import generate
from ayf.tasks.base import AyfTask


def student_for(teacher: Teacher) -> tuple:
    """``(net, config)`` of a student built on the teacher's recorded architecture, with the s
    branch (and for a guided teacher the guidance input) added."""
    config = teacher_net_config(teacher)
    if config is None:
        raise ConfigError(f"a {type(teacher).__name__} records no network to build the student from: give the task a `net`")
    native = getattr(getattr(getattr(teacher, "net", None), "backbone", None), "guided", False)
    config = student_config(config, guidance_input=teacher.reads_lam and not native)  # FLUX.1-dev reads lam itself
    return build_network(config), config


class FlowMapTask(AyfTask):
    """Base of the tasks whose ``net`` is a flow map learning from a frozen teacher through a
    :class:`ayf.objectives.DistillationObjective`."""

    default_solver = "flow_map"

    def attach(self, net: FlowMap, teacher: Teacher, objective: DistillationObjective, sample_guidance) -> None:
        """Hands ``teacher`` to ``objective`` (default: AYF-EMD) and checks that ``net`` can learn from it."""
        if teacher is None:
            raise ConfigError(f"{self.kind} needs a teacher (--model.teacher)")
        objective = EMD() if objective is None else objective
        objective.bind(teacher)
        objective.check_student(net)
        self.net, self.objective = net, objective
        lam_range = objective.guidance_range
        self.sample_guidance = sum(lam_range) / 2 if lam_range is not None and sample_guidance is None else sample_guidance

    @property
    def teacher(self) -> Teacher:
        return self.objective.teacher

    def known_shapes(self, datamodule=None) -> dict:
        return {
            "teacher data shape": self.teacher.data_shape,
            "data shape": getattr(datamodule, "data_shape", None),
            "student data shape": self.net.data_shape,
        }

    def inputs(self) -> list:
        lines = self.teacher.describe()
        lines = lines if self.teacher.reads_lam else [f"teacher: {line}" for line in lines]
        source = getattr(self.net, "source", None)
        lines += [f"student: {source}"] if source else []
        base = self.net.base_record()
        if base is not None:  # a LoRA student: what it trains, and what its checkpoints hold
            state = self.net.state_dict()
            kept = [v for k, v in state.items() if not self.net.frozen_key(k)]
            size = sum(v.numel() * v.element_size() for v in kept)
            lines.append(f"student: adapters and s branch on {base['folder']}: {sum(v.numel() for v in kept) / 1e6:.3g}M "
                         f"of {sum(v.numel() for v in state.values()) / 1e6:.3g}M parameters train; checkpoints hold "
                         f"these ({size / 2**20:.3g} MiB, EMA and optimiser state beside)")
        return lines

    def setup(self, stage):
        dm = self.attached_datamodule()
        if dm is not None:
            self.teacher.bind_data(dm)
        super().setup(stage)

    def net_config(self):
        return getattr(self.net, "net_config", None) or super().net_config() or getattr(self, "_net_config", None)

    # --- sampling ---------------------------------------------------------------------------
    def sampling_model(self, lam):
        self.net.check_lam(lam)
        return self.net, lam

    @torch.no_grad()
    def teacher_generate(self, noise, steps: int, label=None, solver: str = "euler", guidance=None):
        """The teacher's own ODE samples from the same noise (the reference beside the student),
        guided at the student's sampling scale."""
        lam = (self.sample_guidance if guidance is None else guidance) if self.teacher.reads_lam else None
        return generate(self.teacher, noise, steps, self.sampling_cond(noise, label, lam), solver=solver)
