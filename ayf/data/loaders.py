"""The training loaders: resumable (a resumed run picks up at the checkpoint's batch) and the
per-device share of a global batch."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ayf.errors import ConfigError


class ResumableLoader(DataLoader):
    """A DataLoader whose order is a function of ``(seed, pass)`` and whose position can be saved
    with a checkpoint, so that N steps equal N/2 steps, a resume and N/2 more.

    The loader counts its own passes (epochs). :meth:`state_dict` gives the pass and the batches
    served in it; after :meth:`load_state_dict`, the next pass is that one, from the batch after
    those; Lightning saves that state with the checkpoint and restores it on resume. The shuffle and the
    worker seeds come from a generator seeded per pass, never from the global RNG (which the
    checkpoint restores as it stood). Under DDP, Lightning's distributed sampler takes the
    shuffle over, seeded by the trainer's epoch.

    Args:
        dataset, batch_size, shuffle, ...: as for DataLoader.
        seed: seed of the per-pass order.
    """

    def __init__(self, dataset, *args, seed: int = 0, **kwargs):
        self.order = torch.Generator()
        kwargs.setdefault("generator", self.order)
        super().__init__(dataset, *args, **kwargs)
        self.seed = int(seed)
        self._epoch, self._served, self._skip, self._next = 0, 0, 0, 0

    def prepare_epoch(self, epoch: int) -> None:
        """Makes the order of pass ``epoch`` (subclasses also tell their dataset)."""
        self.order.manual_seed(self.seed * 1_000_003 + epoch)

    def __iter__(self):
        # every pass is a new epoch, whether or not the last one was read to its end
        epoch, skip = self._next, self._skip
        self._epoch, self._next, self._skip, self._served = epoch, epoch + 1, 0, skip
        self.prepare_epoch(epoch)
        return self._serve(super().__iter__(), skip)

    def _serve(self, batches, skip: int):
        for _ in range(skip):  # the batches the checkpointed run had already trained on
            next(batches, None)
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        """``{"epoch", "batches"}``: the pass in progress and the batches it has served (a pass
        served to its end reads as the next one, not started)."""
        try:
            done = self._served >= len(self)
        except TypeError:  # no length
            done = False
        return {"epoch": self._epoch + 1, "batches": 0} if done else {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._next, self._skip = int(state["epoch"]), int(state["batches"])


def tensor_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    """The loader of an in-memory data set: training (``shuffle``) through :class:`ResumableLoader`
    (whole batches, the order seeded per epoch), evaluation in order."""
    kind, extra = (ResumableLoader, {"seed": seed}) if shuffle else (DataLoader, {})
    return kind(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle, num_workers=num_workers,
                persistent_workers=num_workers > 0, **extra)



def split_global_batch(total: int, processes: int, accumulate: int = 1) -> int:
    """The per-device share of a global batch of ``total`` over ``processes`` and ``accumulate``
    accumulated batches; a ConfigError unless it splits evenly."""
    parts = processes * accumulate
    if total < 1 or total % parts:
        raise ConfigError(f"global_batch_size {total} does not split over {processes} processes x {accumulate} "
                          f"accumulated batches ({parts} parts); choose a multiple of {parts}")
    return total // parts


def device_batch(datamodule) -> int:
    """The per-device batch of a data module: its ``batch_size``, or its ``global_batch_size``
    divided over the trainer's processes and accumulated batches."""
    total = getattr(datamodule, "global_batch_size", None)
    trainer = getattr(datamodule, "trainer", None)
    if total is None or trainer is None:
        return datamodule.batch_size
    return split_global_batch(total, trainer.world_size, trainer.accumulate_grad_batches)
