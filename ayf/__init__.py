"""ayf: Align Your Flow flow-map distillation for PyTorch Lightning."""
__version__ = "0.1.0"
