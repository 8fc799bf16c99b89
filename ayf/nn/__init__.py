"""Modules: the FlowMap wrapper, backbones and teachers."""
from ayf.nn.backbones import MLP
from ayf.nn.discriminator import ImageDiscriminator, MLPDiscriminator
from ayf.nn.embeddings import FourierFeatures, ScalarEmbedding
from ayf.nn.flow_map import FlowMap
from ayf.nn.teachers import CheckpointTeacher, GuidedTeacher, MixtureTeacher, Teacher
from ayf.nn.unet import UNet

__all__ = ["MLP", "FlowMap", "FourierFeatures", "ScalarEmbedding", "Teacher", "MixtureTeacher", "CheckpointTeacher", "GuidedTeacher", "UNet", "ImageDiscriminator",
           "MLPDiscriminator"]
