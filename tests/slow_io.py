"""Slow pieces for tests/integration/test_kill.py, which kills `ayf fit` at chosen moments: ayf's
atomic checkpoint writer writing in slow chunks, and a callback that slows every training step.
Each leaves marker files (``<markers>/writing_<n>_step<k>``, ``done_<n>_step<k>``) that tell the
test where the run stands."""
import os
import time

import lightning as L

from ayf.commands.lightning import AtomicCheckpointIO


class SlowCheckpointIO(AtomicCheckpointIO):
    def __init__(self, markers: str, seconds: float = 1.0, chunks: int = 20):
        super().__init__()
        self.markers, self.seconds, self.chunks, self.count, self.step = markers, seconds, chunks, 0, None

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.count, self.step = self.count + 1, checkpoint["global_step"]
        super().save_checkpoint(checkpoint, path, storage_options)
        open(os.path.join(self.markers, f"done_{self.count}_step{self.step}"), "w").close()

    def write(self, fh, data):
        open(os.path.join(self.markers, f"writing_{self.count}_step{self.step}"), "w").close()
        size = max(1, len(data) // self.chunks)
        for i in range(0, len(data), size):
            fh.write(data[i: i + size])
            fh.flush()
            time.sleep(self.seconds / self.chunks)


class SlowSteps(L.Callback):
    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)
