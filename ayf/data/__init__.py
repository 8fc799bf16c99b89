"""Data modules."""
from ayf.data.mixture import GaussianMixture

__all__ = ["GaussianMixture"]
