"""Data modules."""
from ayf.data.images import ImageShards
from ayf.data.mixture import GaussianMixture

__all__ = ["GaussianMixture", "ImageShards"]
