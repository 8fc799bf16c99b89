"""LightningModules: FlowMatching (teacher), Realignment (a converted teacher's time input
switched to t), FlowMapDistillation (student) and AdversarialFinetuning (the optional GAN stage
after distillation)."""
from ayf.tasks.adversarial import AdversarialFinetuning
from ayf.tasks.base import AyfTask
from ayf.tasks.distillation import FlowMapDistillation
from ayf.tasks.flow_maps import FlowMapTask
from ayf.tasks.flow_matching import FlowMatching
from ayf.tasks.realignment import Realignment
from ayf.tasks.schedules import WarmupStableDecay

__all__ = ["AyfTask", "FlowMatching", "FlowMapTask", "FlowMapDistillation", "AdversarialFinetuning", "Realignment",
           "WarmupStableDecay"]
