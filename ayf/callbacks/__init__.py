"""Callbacks: tangent warmup, EMA, sample plots, progress bar."""
from ayf.callbacks.ema import EMA
from ayf.callbacks.plots import SamplePlot
from ayf.callbacks.progress import ProgressBar
from ayf.callbacks.warmup import TangentWarmup

__all__ = ["EMA", "SamplePlot", "ProgressBar", "TangentWarmup"]
