"""The checkpoint writer of ``ayf fit``: Lightning's, with local files written atomically."""
from __future__ import annotations

import io

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ayf.checkpoints import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with local files written by :func:`ayf.checkpoints.atomic_write`:
    a killed run leaves each checkpoint file whole (the previous version, or the new one).
    Lightning's own writer stages a file in the system's temporary folder and moves it, which is
    a copy, not a rename, when that folder is on another file system (a container's bind mount,
    a tmpfs). ``ayf fit`` uses it unless the config names another CheckpointIO; remote URLs go
    through Lightning's writer."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(str(path).removeprefix("file://"), lambda fh: self.write(fh, buffer.getbuffer()))

    def write(self, fh, data) -> None:
        """Writes the serialised checkpoint to the open temporary file."""
        fh.write(data)
