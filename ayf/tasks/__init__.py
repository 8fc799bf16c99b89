"""LightningModules: FlowMatching (teacher) and FlowMapDistillation (student)."""
from ayf.tasks.base import AyfTask
from ayf.tasks.distillation import FlowMapDistillation
from ayf.tasks.flow_matching import FlowMatching

__all__ = ["AyfTask", "FlowMatching", "FlowMapDistillation"]
