"""Callbacks: tangent warmup, EMA, sample plots, progress bar."""
from ayf.callbacks.ema import EMA
from ayf.callbacks.grids import ImageGrid
from ayf.callbacks.metrics import FidelityMetrics
from ayf.callbacks.plots import SamplePlot
from ayf.callbacks.progress import ProgressBar
from ayf.callbacks.warmup import TangentWarmup

__all__ = ["EMA", "FidelityMetrics", "ImageGrid", "SamplePlot", "ProgressBar", "TangentWarmup"]
