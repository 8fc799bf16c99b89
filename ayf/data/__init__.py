"""Data modules."""
from ayf.data.images import ImageShards
from ayf.data.mixture import GaussianMixture
from ayf.data.vectors import VectorData

__all__ = ["GaussianMixture", "ImageShards", "VectorData"]
