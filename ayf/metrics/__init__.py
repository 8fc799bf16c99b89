"""Evaluation: feature extractors, FD / KID / precision / recall glue, toy-mixture metrics."""
from ayf.metrics.features import ClassifierFeatures, FeatureExtractor, InceptionFeatures
from ayf.metrics.fidelity import fidelity_metrics, reference_features

__all__ = ["ClassifierFeatures", "FeatureExtractor", "InceptionFeatures", "fidelity_metrics", "reference_features"]
