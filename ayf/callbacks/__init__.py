"""Callbacks: EMA, sample plots and grids, fidelity metrics, progress bar."""
from ayf.callbacks.ema import EMA
from ayf.callbacks.grids import ImageGrid
from ayf.callbacks.metrics import FidelityMetrics
from ayf.callbacks.plots import SamplePlot
from ayf.callbacks.progress import ProgressBar

__all__ = ["EMA", "FidelityMetrics", "ImageGrid", "SamplePlot", "ProgressBar"]
