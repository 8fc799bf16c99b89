"""The terminal progress bar."""
from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """TQDM progress bar showing the loss and the tangent warm-up ratio r; hides the version number.

    Args:
        refresh_rate: update the bar every this many batches.
    """

    def __init__(self, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        r = trainer.callback_metrics.get("train/tangent_r")
        if r is not None and pl_module.training:
            items["r"] = f"{float(r):.3f}"
        return items
