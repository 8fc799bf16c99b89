"""Modules: the FlowMap wrapper, its condition, backbones, teachers and teacher adapters
(EDM denoisers, VP models, other flow conventions: ayf.nn.adapters; EDM2 networks: ayf.nn.edm2)."""
from ayf.nn.adapters import DenoiserTeacher, FlowTeacher, VPTeacher
from ayf.nn.backbones import MLP
from ayf.nn.cond import NULL_LABEL, Cond
from ayf.nn.discriminator import ImageDiscriminator, MLPDiscriminator
from ayf.nn.embeddings import FourierFeatures, ScalarEmbedding
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import GuidedTeacher, MixtureTeacher, NetTeacher, Teacher
from ayf.nn.unet import UNet

__all__ = ["MLP", "Cond", "NULL_LABEL", "FlowMap", "FourierFeatures", "ScalarEmbedding", "Teacher", "MixtureTeacher",
           "NetTeacher", "GuidedTeacher", "DenoiserTeacher", "VPTeacher", "FlowTeacher", "UNet", "ImageDiscriminator",
           "MLPDiscriminator"]
