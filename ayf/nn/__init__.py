"""Modules: the FlowMap wrapper, its condition, backbones and teachers."""
from ayf.nn.backbones import MLP
from ayf.nn.cond import NULL_LABEL, Cond
from ayf.nn.discriminator import ImageDiscriminator, MLPDiscriminator
from ayf.nn.embeddings import FourierFeatures, ScalarEmbedding
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import GuidedTeacher, MixtureTeacher, NetTeacher, Teacher
from ayf.nn.unet import UNet

__all__ = ["MLP", "Cond", "NULL_LABEL", "FlowMap", "FourierFeatures", "ScalarEmbedding", "Teacher", "MixtureTeacher",
           "NetTeacher", "GuidedTeacher", "UNet", "ImageDiscriminator", "MLPDiscriminator"]
